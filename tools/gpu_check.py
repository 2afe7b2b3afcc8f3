#!/usr/bin/env python
"""The GPU check: what the CPU tests cannot show, run on one CUDA GPU in one command (155 s on one H200).

    python tools/gpu_check.py --out gpu_check            # writes gpu_check/gpu_check.md and gpu_check.json

Checks, each reported as PASS / FAIL with its figures and peak GPU memory:

  vit-s16-bf16      short bf16 MoCo v3 pretraining of a ViT-S/16 at 224 px (synthetic images), train.host_reads=log,
                    every step after the warm-up under torch.cuda.set_sync_debug_mode("error") outside the read point
  resnet50-bf16     the same for a ResNet-50 with LARS
  optim-<name>      a few bf16 steps of SAM, Sophia, LARS, LAMB and Muon: finite losses
  resume            a run stopped at step 4 and resumed equals an uninterrupted run (losses and weights); two
                    uninterrupted runs are compared too, so that GPU non-determinism is told apart from a resume fault
  query-chunks      train.query_chunks=4 against 1 (ViT-S/16, batch 256): lower peak memory, finite losses
  knn               faiss on the GPU against the torch backend on the same features: identical top-1
                    (faiss-cpu where faiss has no GPU support, and the row says so)
  data-large        tools/bench_pretrain.py's data path on 400 ImageNet-size JPEGs (made from the synthetic set): the
                    plain PIL loader, crops (colour on the GPU) and dali (nvJPEG) in images/s, if DALI is installed
  bench             tools/bench_pretrain.py's step measurements with its MFU line (ViT-S/16, 224 px, bf16)

Exits 2 with a one-line error when no CUDA GPU is present (it never skips silently), 1 when a check fails.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

from ssl_bocb.errors import UserError, cli_main

FAKE_224 = ["data.name=fake", "data.image_size=224", "data.fake_classes=8", "data.fake_per_class=64",
            "data.num_workers=0", "train.mixed_precision=bf16", "train.epochs=2", "train.warmup_epochs=0",
            "train.save_every=0", "monitor.knn_every=0"]
VIT = ["model.backbone=vit_small_patch16_224", "optim.name=adamw", "optim.base_lr=1.5e-4"]
RESNET = ["model.backbone=resnet50", "optim.name=lars", "optim.base_lr=0.3"]
WARMUP_STEPS = 2  # steps before the sync check starts: lazy initialisation (cuBLAS handles, optimizer state)


def run_pretrain(out, overrides, sync_check_after=None):
    """tools/pretrain.py's path in this process; with ``sync_check_after`` every step after that many runs under
    sync debug mode "error", except the guard's flush (the designed read point)."""
    from ssl_bocb import config
    from ssl_bocb.engine import guard as guard_mod
    from ssl_bocb.engine import loop as loop_mod
    from ssl_bocb.tasks import pretrain
    cfg = config.load(config.PretrainConfig, [], overrides + [f"output_dir={out}"])
    if sync_check_after is None:
        return pretrain(cfg)
    step, flush = loop_mod.TrainLoop._step, guard_mod.WindowReads.flush

    def checked_step(self, batch, epoch):
        if self.step < sync_check_after:
            return step(self, batch, epoch)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(self, batch, epoch)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def open_flush(self):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            return flush(self)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    loop_mod.TrainLoop._step, guard_mod.WindowReads.flush = checked_step, open_flush
    try:
        return pretrain(cfg)
    finally:
        loop_mod.TrainLoop._step, guard_mod.WindowReads.flush = step, flush


def steps_of(run_dir):
    with open(os.path.join(run_dir, "steps.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_pretrain(tmp, name, extra, steps=10):
    out = os.path.join(tmp, name)
    t = time.time()
    run_pretrain(out, FAKE_224 + extra + ["train.batch_size=64", "train.host_reads=log", "train.log_every=5",
                                          f"train.stop_at_step={steps}"], sync_check_after=WARMUP_STEPS)
    rows = steps_of(out)
    losses = [r["loss"] for r in rows]
    ok = len(rows) == steps // 5 and all(map(_finite, losses))
    return ok, (f"{steps} steps of batch 64 in {time.time() - t:.1f} s (first {WARMUP_STEPS} unchecked), no host sync "
                f"outside the read points; logged losses {', '.join(f'{v:.4f}' for v in losses)}; "
                f"last logged {rows[-1]['images_per_s']:.0f} img/s")


def check_optimizer(tmp, name):
    extra = {"sam": ["optim.name=sgd", "optim.base_lr=0.05", "optim.sam.rho=0.05"],
             "sophia": ["optim.name=sophia"], "lars": ["optim.name=lars"], "lamb": ["optim.name=lamb"],
             "muon": ["optim.name=muon"]}[name]
    out = os.path.join(tmp, f"optim-{name}")
    vit = ["model.backbone=vit_small_patch16_224", "model.backbone_kwargs={depth: 4}"]
    run_pretrain(out, FAKE_224 + vit + extra + ["train.batch_size=32", "train.stop_at_step=6", "train.log_every=1"])
    losses = [r["loss"] for r in steps_of(out)]
    return len(losses) == 6 and all(map(_finite, losses)), "losses " + ", ".join(f"{v:.4f}" for v in losses)


def check_resume(tmp):
    import safetensors.torch
    base = FAKE_224 + ["model.backbone=vit_small_patch16_224", "train.batch_size=32", "train.epochs=1",
                       "train.save_every_steps=4", "train.log_every=1",
                       "data.fake_per_class=32", "model.backbone_kwargs={depth: 4, drop_path_rate: 0.1}"]
    a, b, c = (os.path.join(tmp, f"resume-{k}") for k in "abc")
    run_pretrain(a, base)
    run_pretrain(b, base)
    run_pretrain(c, base + ["train.stop_at_step=4"])
    run_pretrain(c, base + ["resume=auto"])
    la, lb, lc = ([r["loss"] for r in steps_of(d)] for d in (a, b, c))
    wa, wb, wc = (safetensors.torch.load_file(os.path.join(d, "backbone.safetensors")) for d in (a, b, c))

    def diff(x, y):
        return max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    repeat_same = la == lb and diff(wa, wb) == 0
    resume_same = la == lc and diff(wa, wc) == 0
    what = (f"{len(la)} steps; resumed at step 4 vs uninterrupted: losses {'identical' if la == lc else 'differ'}, "
            f"weights max |diff| {diff(wa, wc):.3g}; two uninterrupted runs: losses "
            f"{'identical' if la == lb else 'differ'}, weights max |diff| {diff(wa, wb):.3g}")
    return resume_same or (not repeat_same and la[:4] == lc[:4]), what


def check_query_chunks(tmp):
    """train.query_chunks on the GPU: the same 4 steps of ViT-S/16 at batch 256 with K = 1 and K = 4; peak memory
    must fall, the losses stay close (the heads' BN normalises per chunk, so not equal)."""
    peaks, logged = {}, {}
    for k in (1, 4):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out = os.path.join(tmp, f"chunks-{k}")
        run_pretrain(out, FAKE_224 + VIT + ["train.batch_size=256", "train.stop_at_step=4", "train.log_every=1",
                                            f"train.query_chunks={k}"])
        peaks[k] = torch.cuda.max_memory_allocated() / 2 ** 30
        logged[k] = [r["loss"] for r in steps_of(out)]
    ok = peaks[4] < peaks[1] and all(map(_finite, logged[4]))
    return ok, (f"ViT-S/16, batch 256, 4 steps: peak {peaks[1]:.2f} GiB at K = 1, {peaks[4]:.2f} GiB at K = 4; "
                f"losses {', '.join(f'{v:.4f}' for v in logged[1])} / {', '.join(f'{v:.4f}' for v in logged[4])}")


def check_knn():
    import faiss
    from ssl_bocb.eval.knn import faiss_gpu_device, knn_classify
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(100, 384, generator=g)
    ytr, yte = torch.randint(0, 100, (50000,), generator=g), torch.randint(0, 100, (5000,), generator=g)
    ftr = centres[ytr] + 4.0 * torch.randn(50000, 384, generator=g)
    fte = centres[yte] + 4.0 * torch.randn(5000, 384, generator=g)
    device = faiss_gpu_device()
    t = time.time()
    fa = knn_classify(ftr, ytr, fte, yte, ks=[20, 200], backend="faiss")
    t_faiss = time.time() - t
    t = time.time()
    to = knn_classify(ftr.cuda(), ytr.cuda(), fte.cuda(), yte.cuda(), ks=[20, 200], backend="torch")
    t_torch = time.time() - t
    same = all(fa[k]["top1"] == to[k]["top1"] for k in fa)
    where = f"faiss {faiss.__version__} on GPU {device}" if device is not None else \
        f"faiss {faiss.__version__} WITHOUT GPU support (faiss-cpu; faiss-gpu not installed here)"
    return same, (f"{where} vs torch on cuda, 50000 x 384 bank, 5000 queries: top-1 k=20 {fa[20]['top1']:.2f} / "
                  f"{to[20]['top1']:.2f}, k=200 {fa[200]['top1']:.2f} / {to[200]['top1']:.2f}; "
                  f"{t_faiss:.2f} s / {t_torch:.2f} s")


def check_bench(tmp):
    out = os.path.join(tmp, "bench")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_pretrain.py"), "--config",
           os.path.join(ROOT, "configs", "imagenet_vit_small_adamw.yaml"), "--only", "plain-step", "project-step",
           "--steps", "10", "--out", out] + [o for o in FAKE_224 if not o.startswith("train.epochs")] + \
        ["train.batch_size=256"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    if proc.returncode != 0:
        return False, "bench_pretrain failed: " + proc.stderr.strip().splitlines()[-1][:300]
    lines = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines()
             if "MFU" in line or "images/s, peak" in line]  # bench runs in its own processes: its peaks are these
    return True, " | ".join(lines)[:600] or proc.stdout[-600:]


def check_data_large(tmp):
    from ssl_bocb.data.pipeline import dali_available
    pipelines = ["crops"] + (["dali"] if dali_available() else [])
    cmd = [sys.executable, os.path.join(ROOT, "tools", "bench_pretrain.py"), "--config",
           os.path.join(ROOT, "configs", "imagenet_vit_small_adamw.yaml"), "data.name=fake", "data.fake_classes=8",
           "data.fake_per_class=50", "train.batch_size=128", f"data.cache_dir={tmp}/cache", "--large-jpegs", "50",
           "--only", "plain-data", "--batches", "12", "--pipelines", *pipelines, "--out", os.path.join(tmp, "data")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    if proc.returncode != 0:
        return False, "bench_pretrain failed: " + proc.stderr.strip().splitlines()[-1][:300]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "KiB" in line]
    note = "" if "dali" in pipelines else " (DALI not installed: dali not measured)"
    return len(rows) >= 1 + len(pipelines), (" || ".join(rows) + note)[:900]


def _finite(v):
    return v is not None and v == v and abs(v) != float("inf")


CHECKS = (["vit-s16-bf16", "resnet50-bf16"] + [f"optim-{n}" for n in ("sam", "sophia", "lars", "lamb", "muon")]
          + ["resume", "query-chunks", "knn", "data-large", "bench"])


def run_check(name, tmp):
    if name == "vit-s16-bf16":
        return check_pretrain(tmp, name, VIT)
    if name == "resnet50-bf16":
        return check_pretrain(tmp, name, RESNET)
    if name.startswith("optim-"):
        return check_optimizer(tmp, name[len("optim-"):])
    if name == "resume":
        return check_resume(tmp)
    if name == "knn":
        return check_knn()
    if name == "query-chunks":
        return check_query_chunks(tmp)
    if name == "data-large":
        return check_data_large(tmp)
    return check_bench(tmp)


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check", help="folder for gpu_check.md and gpu_check.json")
    ap.add_argument("--only", nargs="+", choices=CHECKS, default=list(CHECKS))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("tools/gpu_check.py needs a CUDA GPU and torch.cuda.is_available() is False here; run it on "
                        "a GPU machine (the CPU test suite covers the rest)")
    os.makedirs(args.out, exist_ok=True)
    name = torch.cuda.get_device_name()
    head = (f"GPU check on {name}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(head, flush=True)
    results = []
    t_all = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SSL_BOCB_CACHE", os.path.join(tmp, "cache"))
        for check in args.only:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            t = time.time()
            try:
                ok, what = run_check(check, tmp)
            except Exception as e:  # a check's failure is its row, the others still run
                ok, what = False, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                traceback.print_exc()
            row = dict(check=check, ok=bool(ok), seconds=round(time.time() - t, 1),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2), what=what)
            results.append(row)
            print(f"{'PASS' if ok else 'FAIL'} {check} ({row['seconds']} s, peak {row['peak_gib']} GiB): {what}",
                  flush=True)
    lines = [f"# {head}", "", f"{sum(r['ok'] for r in results)} of {len(results)} checks passed in "
             f"{time.time() - t_all:.0f} s.", "", "| check | result | s | peak GiB | what |", "|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {'PASS' if r['ok'] else 'FAIL'} | {r['seconds']} | {r['peak_gib']} | "
              f"{r['what'].replace('|', '/')} |" for r in results]
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, results=results), f, indent=1)
    print("\n".join(lines))
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
