#!/usr/bin/env python
"""Pretraining speed of the project against a plain loop written here, on one recipe and one machine.

    python tools/bench_pretrain.py --config configs/quickstart.yaml --out bench/quickstart

The plain baseline is what a user would write without this toolkit: a torchvision PIL DataLoader of the SPEC
section 1 recipe (data.num_workers workers) and an eager fp32 step (the same model, optimizer and batch; contiguous
layout; no telemetry; timm's convolutions). The project side is tools/pretrain.py's own path: data.pipeline, the
precision, layout and compile settings that auto picks on this device, the guard and telemetry. Each measurement
runs in its own process (one after the other, never two at once), so that its peak memory is its own:

  data      images/s of the two-view data path alone (batches of both views ready on the training device)
  step      images/s of the training step alone, on one fixed batch
  e2e       images/s end to end (the plain loop here; the project through tools/pretrain.py, logged intervals
            after the first)

The data path on ImageNet-size JPEGs (the crops, dali and PIL paths against the plain loader, with the bytes each
sends from its workers to the training process):

    python tools/bench_pretrain.py --config configs/imagenet_vit_small_adamw.yaml data.root=../shared/data \
        data.name=imagenette --large-jpegs 50 --only plain-data --pipelines crops dali pil --out bench/large

Writes <out>/bench.json and <out>/bench.md (figures, ratios project / plain, the CPU model and its flags).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from ssl_bocb import config
from ssl_bocb.errors import UserError, cli_main
from ssl_bocb.optim.schedules import scaled_lr

KINDS = ("data", "step", "e2e")
# dense bf16 / fp32 (TF32) peak FLOP/s of the GPUs MFU is reported for
PEAK = {"H100": {"bf16": 989e12, "no": 494e12}, "H200": {"bf16": 989e12, "no": 494e12},
        "A100": {"bf16": 312e12, "no": 156e12}}


def cpu_info() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), model)
        flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    except OSError:
        flags = set()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return dict(model=model, cores=os.cpu_count(), flags=[f for f in wanted if f in flags])


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest DataLoader worker
    return (own + workers) / 1024


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- the plain baseline
def plain_loader(cfg, batch):
    """torchvision's PIL recipe of SPEC section 1 in a DataLoader: what the baseline feeds its step with."""
    from PIL import ImageFilter
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms as T

    from ssl_bocb.data import build_base, norm_stats, per_class_subset
    d = cfg.data
    mean, std = norm_stats(d)
    blur = d.blur if d.blur is not None else d.image_size >= 64

    class Blur:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            if torch.rand(()) < self.p:
                return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(()).uniform_(0.1, 2.0))))
            return img

    def view(blur_p, solarize_p):
        return T.Compose([T.RandomResizedCrop(d.image_size, scale=(d.crop_min, 1.0)),
                          T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                          Blur(blur_p if blur else 0.0), T.RandomSolarize(128, p=solarize_p if d.solarize else 0.0),
                          T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

    class Pairs(Dataset):
        def __init__(self):
            self.base = build_base(d, d.train_split)
            self.keep = per_class_subset(list(self.base.targets), d.subset)
            self.t1, self.t2 = view(1.0, 0.0), view(0.1, 0.2)

        def __len__(self):
            return len(self.keep)

        def __getitem__(self, i):
            img, y = self.base[self.keep[i]]
            img = img.convert("RGB")
            return self.t1(img), self.t2(img), y

    from ssl_bocb.data.pipeline import num_workers
    workers = num_workers(d)
    return DataLoader(Pairs(), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0)


def plain_model(cfg, device):
    from ssl_bocb.losses import contrastive_loss
    from ssl_bocb.models import build_moco
    from ssl_bocb.optim import optimizer_from_cfg, resolve
    from ssl_bocb.models.backbones import CentreTapConv2d
    model = build_moco(cfg.model).to(device)
    for m in model.modules():  # the convolutions as timm builds them (the project's 1x1-map shortcut undone)
        if type(m) is CentreTapConv2d:
            m.__class__ = torch.nn.Conv2d
    resolved = resolve(cfg.optim)
    opt = optimizer_from_cfg(model, cfg.optim, scaled_lr(resolved.base_lr, cfg.train.batch_size,
                                                                resolved.lr_scaling), resolved)

    def step(x1, x2):
        q1, q2, _, _ = model(x1, x2)
        with torch.no_grad():
            model.update_momentum(cfg.moco.momentum)
            k1, k2 = model.forward_momentum(x1), model.forward_momentum(x2)
        loss = contrastive_loss(q1, k2, cfg.moco.temperature) + contrastive_loss(q2, k1, cfg.moco.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss
    return step


def measure_plain(cfg, kind, n, device):
    batch = cfg.train.batch_size
    torch.manual_seed(cfg.seed)
    if kind == "step":
        step = plain_model(cfg, device)
        x1, x2, _ = next(iter(plain_loader(cfg, batch)))
        x1, x2 = x1.to(device), x2.to(device)
        return timed(lambda: step(x1, x2), n, batch, device, flops=lambda: count_flops(lambda: step(x1, x2)))
    loader = plain_loader(cfg, batch)
    step = plain_model(cfg, device) if kind == "e2e" else None
    it = _forever(loader)

    def one():
        x1, x2, _ = next(it)
        x1, x2 = x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
        if step is not None:
            step(x1, x2)
    out = timed(one, n, batch, device)
    if kind == "data":
        out.update(pipeline="plain PIL", workers=loader.num_workers,
                   bytes_per_image=2 * 3 * cfg.data.image_size ** 2 * 4)  # two float32 views
    return out


# --------------------------------------------------------------------------------------------------- the project
def batch_bytes(obj) -> int:
    """Bytes of the arrays in a batch: what a DataLoader worker sends to the training process."""
    if torch.is_tensor(obj):
        return obj.nelement() * obj.element_size()
    if hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    if isinstance(obj, (list, tuple)):
        return sum(batch_bytes(o) for o in obj)
    return 0


def measure_project_data(cfg, n, device):
    """The two-view data path: the loader alone (what the workers deliver), then loader + views on ``device``."""
    from torch.utils.data import DataLoader

    from ssl_bocb.data.pipeline import two_view_data
    data = two_view_data(cfg.data, cfg.seed, device)
    loader = DataLoader(data.dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                        pin_memory=device.type == "cuda", **data.loader_kwargs)
    it = _forever(loader)
    sent = []

    def fetch():
        batch = next(it)
        sent.append(batch_bytes(batch[0]) / cfg.train.batch_size)
        return batch
    workers = timed(fetch, n, cfg.train.batch_size, torch.device("cpu"))
    crop_only = None
    if getattr(data.dataset, "finish", False):  # crops on a CPU device: also the workers as they run for a GPU
        import copy
        ds = copy.copy(data.dataset)
        ds.finish = False
        crop_it = _forever(DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                                      **data.loader_kwargs))
        crop_only = timed(lambda: next(crop_it), n, cfg.train.batch_size, torch.device("cpu"))["images_per_s"]
        del crop_it

    def one():
        inputs, labels, bad = fetch()
        if data.kind in ("batched", "crops"):  # uint8 images or crops to the device (dali decodes onto it)
            inputs = (inputs[0].to(device, non_blocking=True), inputs[1])
        x1, x2, _ = data.views((inputs, labels, bad), 0)
        x1.to(device, non_blocking=True), x2.to(device, non_blocking=True)
    out = timed(one, n, cfg.train.batch_size, device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out.update(pipeline=data.kind, reason=data.reason, workers=loader.num_workers, cpus=cpus,
               loader_images_per_s=workers["images_per_s"], crop_only_images_per_s=crop_only,
               bytes_per_image=(sum(sent) / len(sent)) if data.loader_kwargs.get("num_workers") else 0.0)
    return out


def measure_project_step(cfg, n, device):
    """The training loop's own step (``TrainLoop.train_step``) on one fixed batch of the pretraining task: the same
    inputs, schedules, momentum update, loss, guard, telemetry and host reads as a run."""
    from ssl_bocb.engine import epoch_batches, make_accelerator
    from ssl_bocb.engine.loop import TrainLoop
    from ssl_bocb.tasks.pretrain import PretrainTask
    accelerator = make_accelerator(cfg.train, cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        task = PretrainTask(cfg, accelerator, tmp)
        loop = TrainLoop(task, task.loop_settings())
        batch = next(iter(epoch_batches(accelerator, task.loader, task.dataset, 0, 0)))
        task.model.train()
        loop.guard.start()
        out = timed(lambda: loop.train_step(batch, 0), n, cfg.train.batch_size, accelerator.device,
                    flops=lambda: count_flops(lambda: loop.train_step(batch, 0)))
    out.update(precision=accelerator.mixed_precision, channels_last=task.channels_last,
               query_chunks=task.query_chunks)
    return out


def measure_project_e2e(cfg_files, overrides, n):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, os.path.join(ROOT, "tools", "pretrain.py")] + sum([["--config", c] for c in cfg_files],
                                                                              [])
        cmd += [f"output_dir={tmp}/run", f"train.stop_at_step={n + 2}", "train.log_every=1", "monitor.knn_every=0",
                *overrides]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise UserError(f"tools/pretrain.py failed: {proc.stderr.strip()[-400:]}")
        from ssl_bocb.engine.logs import read_jsonl
        steps = read_jsonl(os.path.join(tmp, "run", "steps.jsonl"))
    timed_rows = steps[2:] or steps  # the first intervals hold start-up (decoding, first-step allocations)
    return dict(images_per_s=sum(r["images_per_s"] for r in timed_rows) / len(timed_rows),
                peak_mem_mb=max(r["peak_mem_mb"] for r in steps), steps=len(timed_rows))


# ------------------------------------------------------------------------------------------------------- helpers
def _forever(loader):
    while True:
        yield from loader


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def timed(fn, n, batch, device, flops=None) -> dict:
    """images/s of ``n`` calls of ``fn`` after two warm-up calls."""
    fn()
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    seconds = time.perf_counter() - t
    out = dict(images_per_s=n * batch / seconds, seconds=seconds, calls=n, peak_mem_mb=peak_mb(device))
    if flops is not None:
        per_step = flops()
        out.update(flops_per_step=per_step, achieved_tflops=per_step * n / seconds / 1e12)
    return out


def run_one(args) -> dict:
    """One measurement (in this process)."""
    cfg = config.load(config.PretrainConfig, args.config, args.overrides)
    side, kind = args.measure.split("-")
    if side == "project" and kind == "e2e":
        return measure_project_e2e(args.config, args.overrides, args.steps)
    from accelerate.state import PartialState
    device = PartialState(cpu=cfg.train.cpu).device
    n = args.batches if kind == "data" else args.steps
    if side == "plain":
        return measure_plain(cfg, kind, n, device)
    return measure_project_data(cfg, n, device) if kind == "data" else measure_project_step(cfg, n, device)


def markdown(result) -> str:
    rows = result["rows"]
    c, dev = result["cpu"], result["device"]
    lines = [f"Recipe {result['recipe']}, batch {result['batch']}, device {dev}; CPU {c['model']} ({c['cores']} "
             f"cores; flags: {', '.join(c['flags']) or 'none of avx2/avx512/amx'}); torch {result['torch']}."]
    if any(f"plain-{kind}" in rows and f"project-{kind}" in rows for kind in KINDS):
        lines += ["", "| measure | plain images/s | project images/s | project / plain | plain peak MB | project peak MB |",
                  "| --- | --- | --- | --- | --- | --- |"]
    for kind in KINDS:
        p, q = rows.get(f"plain-{kind}"), rows.get(f"project-{kind}")
        if not (p and q):
            continue
        lines.append(f"| {kind} | {p['images_per_s']:.1f} | {q['images_per_s']:.1f} | "
                     f"{q['images_per_s'] / p['images_per_s']:.2f}x | {p['peak_mem_mb']:.0f} | "
                     f"{q['peak_mem_mb']:.0f} |")
    data_rows = [(k, r) for k, r in rows.items() if k == "plain-data" or k.startswith("project-data")]
    if data_rows:
        plain = rows.get("plain-data", {}).get("images_per_s")
        cpus = next((r["cpus"] for _, r in data_rows if "cpus" in r), c["cores"])
        lines += ["", f"Data path alone ({cpus} CPUs for this process and its workers; 'workers only': the batches "
                      f"as the DataLoader delivers them; 'to views': with the device-side augmentation on {dev}):", "",
                  "| path | workers | workers only images/s | to views images/s | images/s per CPU | x plain | "
                  "bytes per image between processes |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for k, r in data_rows:
            if r.get("crop_only_images_per_s"):  # the workers' share when the colour runs on a GPU
                rate = r["crop_only_images_per_s"]
                lines.append(f"| crops, workers as for a GPU (decode + crop only; colour on the GPU) | "
                             f"{r.get('workers', '')} | {rate:.1f} | | {rate / cpus:.1f} | "
                             f"{f'{rate / plain:.2f}x' if plain else ''} | {r['bytes_per_image'] / 1024:.0f} KiB |")
            loader = r.get("loader_images_per_s")
            ratio = f"{r['images_per_s'] / plain:.2f}x" if plain else ""
            sent = r.get("bytes_per_image", 0)
            lines.append(f"| {r.get('pipeline', k)} | {r.get('workers', '')} | "
                         f"{f'{loader:.1f}' if loader else ''} | {r['images_per_s']:.1f} | "
                         f"{r['images_per_s'] / cpus:.1f} | {ratio} | "
                         f"{f'{sent / 1024:.0f} KiB' if sent else 'none (no workers)'} |")
    step = rows.get("project-step", {})
    if step:
        lines += ["", f"Project settings: data.pipeline -> {rows.get('project-data', {}).get('pipeline', '?')}, "
                      f"precision {step.get('precision')}, channels_last {step.get('channels_last')}."]
    for side in ("plain", "project"):
        s = rows.get(f"{side}-step", {})
        if "achieved_tflops" in s:
            mfu = s.get("mfu")
            lines.append(f"{side} step: {s['flops_per_step'] / 1e9:.1f} GFLOP per step, {s['achieved_tflops']:.3f} "
                         f"TFLOP/s achieved" + (f", MFU {100 * mfu:.1f} %" if mfu is not None else ""))
    return "\n".join(lines) + "\n"


@cli_main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (step and e2e), after warm-up")
    ap.add_argument("--batches", type=int, default=20, help="timed batches of the data path alone, after warm-up")
    ap.add_argument("--only", nargs="+", default=[f"{s}-{k}" for s in ("plain", "project") for k in KINDS],
                    help="which measurements (plain-data plain-step plain-e2e project-data project-step project-e2e)")
    ap.add_argument("--out", default="", help="folder for bench.json and bench.md (default: print only)")
    ap.add_argument("--measure", default="", help=argparse.SUPPRESS)  # internal: run one measurement
    ap.add_argument("--pipelines", nargs="+", default=[],
                    help="measure project-data once per data.pipeline value given (e.g. crops dali pil)")
    ap.add_argument("--large-jpegs", type=int, default=0, metavar="PER_CLASS",
                    help="first write PER_CLASS ImageNet-size JPEGs per class (320-640 px, from the config's dataset, "
                         "under the cache) and benchmark on that folder")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.large_jpegs and not args.measure:
        from ssl_bocb.data.archive import default_cache_dir
        from ssl_bocb.data.large_jpegs import make_large_jpegs
        src = config.load(config.PretrainConfig, args.config, args.overrides)
        tree = os.path.join(default_cache_dir(src.data.cache_dir), "large_jpegs",
                            f"{src.data.name}-{args.large_jpegs}")
        print(f"{make_large_jpegs(src.data, tree, args.large_jpegs)} large JPEGs in {tree}", file=sys.stderr)
        args.overrides = args.overrides + ["data.name=imagefolder", f"data.root={tree}", "data.subset=0"]
    if args.measure:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    cfg = config.load(config.PretrainConfig, args.config, args.overrides)
    bad = [m for m in args.only if m.count("-") != 1 or m.split("-")[0] not in ("plain", "project")
           or m.split("-")[1] not in KINDS]
    if bad:
        raise UserError(f"--only {' '.join(bad)}: not a measurement; choose from plain-/project- data, step, e2e")
    rows = {}
    runs = [(m, []) for m in args.only if not (args.pipelines and m == "project-data")]
    runs += [(f"project-data[{p}]", [f"data.pipeline={p}"]) for p in args.pipelines]
    for m, extra in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--measure", m.split("[")[0], "--steps", str(args.steps),
               "--batches", str(args.batches)] + sum([["--config", c] for c in args.config], []) + \
            args.overrides + extra
        print(f"{m} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise UserError(f"{m} failed: {proc.stderr.strip()[-400:]}")
        rows[m] = json.loads(line[len("RESULT "):])
        print(f"{m}: {rows[m]['images_per_s']:.1f} images/s, peak {rows[m]['peak_mem_mb']:.0f} MB", file=sys.stderr)
    from accelerate.state import PartialState
    device = PartialState(cpu=cfg.train.cpu).device
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    for side in ("plain", "project"):
        s = rows.get(f"{side}-step", {})
        peak = next((v for k, v in PEAK.items() if k in gpu), None)
        if peak and "achieved_tflops" in s:
            s["mfu"] = s["achieved_tflops"] * 1e12 / peak["bf16" if s.get("precision") == "bf16" else "no"]
    result = dict(recipe=" + ".join(args.config), overrides=args.overrides, batch=cfg.train.batch_size,
                  device=gpu or str(device), cpu=cpu_info(), torch=torch.__version__, rows=rows)
    for kind in KINDS:
        if f"plain-{kind}" in rows and f"project-{kind}" in rows:
            result[f"{kind}_ratio"] = rows[f"project-{kind}"]["images_per_s"] / rows[f"plain-{kind}"]["images_per_s"]
    for k, r in rows.items():
        if k.startswith("project-data[") and "plain-data" in rows:
            result[f"data_ratio{k[len('project-data'):]}"] = r["images_per_s"] / rows["plain-data"]["images_per_s"]
    md = markdown(result)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write(md)
        print(f"wrote {args.out}/bench.json and bench.md", file=sys.stderr)


if __name__ == "__main__":
    main()
