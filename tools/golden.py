"""Golden outputs of a few short runs, to show that a change to the training loop changes no number.

    python tools/golden.py record before.json          # on the code before the change
    python tools/golden.py record after.json           # on the code after it
    python tools/golden.py compare before.json after.json

``record`` runs, on the synthetic dataset in fp32 on the CPU: pretraining (ResNet-18, drop-path) uninterrupted and
stopped mid-epoch then resumed; SAM + AGC with a mid-epoch resume; a ViT with the kNN monitor and
train.host_reads=log; a fine-tune with Mixup, RandAugment and an EMA, stopped after one epoch and resumed; the kNN
and the linear probe (cached features and full, augmented) of the first pretraining run and of a random init. For
each it keeps every row of steps.jsonl and log.jsonl (less the timing fields), the SHA-256 of every tensor of every
checkpoint (model, momentum encoder, optimizer state, EMA) and of the exported backbone, and every value of the
evaluations' metrics files (less timings and paths). ``compare`` names every
value that differs; rows may gain keys (a newer loop logs more), never lose or change one.

Results are bit-identical only on one machine and one torch build. Each record names both, and the thread count (``_machine``); when
two records name the same, ``compare`` asks every value to be identical. Across machines (the suite's reference
record, tests/golden/reference.json, read on another CPU) float kernels round differently: then the same runs,
rows, keys and tensor names are asked for, every number within ``--rtol`` (1e-3) and every string identical, and
tensor digests are not compared. The line printed says which of the two comparisons ran.

    python tools/golden.py record tests/golden/reference.json   # after a change that is meant to move numbers
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile


TIMING = {"images_per_s", "seconds", "peak_mem_mb", "knn_seconds", "feature_cache_hit"}
PATHS = {"checkpoint"}
TINY = ["data.name=fake", "data.num_workers=0", "model.hidden_dim=64", "model.out_dim=32", "train.batch_size=16",
        "train.epochs=2", "train.warmup_epochs=1", "train.log_every=1", "optim.base_lr=1e-3"]
VIT = ["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={img_size: 32, patch_size: 8, depth: 2}"]
FINETUNE = ["data.name=fake", "data.num_workers=0", "batch_size=32", "data.fake_per_class=8",
            "finetune.batch_size=8", "finetune.warmup_epochs=1", "finetune.ema_decay=0.9",
            "finetune.optim.base_lr=0.01"]
PRETRAIN_RUNS = {
    "resnet_dropout": TINY + ["model.backbone_kwargs={drop_path_rate: 0.2}", "train.save_every_steps=3"],
    "sam_agc": TINY + ["optim.name=nadam", "optim.sam.rho=0.05", "optim.grad_clip_mode=agc", "optim.grad_clip=0.05",
                       "train.save_every_steps=3"],
    "vit_log_reads_monitor": TINY + VIT + ["train.host_reads=log", "train.log_every=2", "monitor.knn_every=1",
                                           "monitor.knn_train_per_class=8", "monitor.knn_test_per_class=4",
                                           "train.save_every_steps=2", "train.keep_checkpoints=0"],
}


EVAL = ["data.name=fake", "data.num_workers=0", "batch_size=32", "data.fake_per_class=8", "knn.k=5",
        "knn.ks=[1, 5]", "linear.epochs=2", "linear.batch_size=16"]
EVAL_RUNS = {  # name -> (stage, overrides); the checkpoint is the first pretraining run, or none (random init)
    "knn": ("knn", []),
    "linprobe-cached": ("linprobe", ["linear.mode=cached"]),
    "linprobe-full": ("linprobe", ["linear.mode=full"]),
    "knn-random-init": ("knn", ["model.backbone=resnet18", "init_seed=1"]),
}


def _tensor_digests(path):
    import safetensors.torch
    import torch
    out = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.endswith(".safetensors"):
            state = safetensors.torch.load_file(full)
        elif name.endswith(".bin"):
            state = _flatten(torch.load(full, weights_only=True))
        else:
            continue
        for k in sorted(state):
            v = state[k]
            if isinstance(v, torch.Tensor):
                data = v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                out[f"{name}:{k}"] = hashlib.sha256(data).hexdigest()[:16]
            else:
                out[f"{name}:{k}"] = repr(v)
    return out


def _flatten(o, prefix=""):
    if isinstance(o, dict):
        flat = {}
        for k, v in o.items():
            flat.update(_flatten(v, f"{prefix}{k}."))
        return flat
    if isinstance(o, (list, tuple)):
        flat = {}
        for i, v in enumerate(o):
            flat.update(_flatten(v, f"{prefix}{i}."))
        return flat
    return {prefix.rstrip("."): o}


def _rows(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def digest_run(run_dir):
    out = {f: _rows(os.path.join(run_dir, f)) for f in ("steps.jsonl", "log.jsonl")}
    root = os.path.join(run_dir, "checkpoints")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        out[f"checkpoints/{name}"] = _tensor_digests(os.path.join(root, name))
    export = os.path.join(run_dir, "backbone.safetensors")
    if os.path.isfile(export):
        out["backbone.safetensors"] = _tensor_digests(run_dir)
    return out


def _metrics(path):
    """An evaluation's metrics file, less its timings and paths (the protocol's transform reprs kept)."""
    with open(path) as f:
        m = json.load(f)
    return {k: v for k, v in _flatten(m).items() if k.split(".")[0] not in TIMING | PATHS}


def record_evals(tmp, checkpoint):
    from ssl_bocb import config
    from ssl_bocb.eval.stages import run_knn, run_linprobe
    out = {}
    for name, (stage, args) in EVAL_RUNS.items():
        ckpt = [] if "random" in name else [f"checkpoint={checkpoint}"]
        cfg = config.load(config.EvalConfig, [], EVAL + ckpt + args + [f"output_dir={tmp}/eval-{name}"])
        (run_knn if stage == "knn" else run_linprobe)(cfg)
        out[f"eval-{name}"] = {"metrics": _metrics(os.path.join(tmp, f"eval-{name}", f"{stage}_metrics.json"))}
    return out


def fingerprint():
    import torch
    from ssl_bocb.device import machine_name
    # the thread count too: a reduction split over other threads rounds otherwise, so only the same count is
    # compared bit for bit
    return {"machine": machine_name("cpu"), "torch": torch.__version__, "threads": torch.get_num_threads()}


def record(path):
    os.environ.setdefault("SSL_BOCB_CPU_BF16", "0")  # fp32 on every CPU, as in the tests
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the CPU's numbers, on any host
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SSL_BOCB_CACHE"] = os.path.join(tmp, "cache")
        from ssl_bocb import config
        from ssl_bocb.tasks import pretrain, run_finetune
        result = {}
        for name, args in PRETRAIN_RUNS.items():
            full = pretrain(config.load(config.PretrainConfig, [], args + [f"output_dir={tmp}/{name}-full"]))
            part = f"{tmp}/{name}-part"
            pretrain(config.load(config.PretrainConfig, [], args + [f"output_dir={part}", "train.stop_at_step=5"]))
            pretrain(config.load(config.PretrainConfig, [], args + [f"output_dir={part}", "resume=auto"]))
            result[f"{name}-full"], result[f"{name}-resumed"] = digest_run(full), digest_run(part)
        ft = f"{tmp}/finetune"
        run_finetune(config.load(config.EvalConfig, [], FINETUNE + [f"output_dir={ft}", "finetune.epochs=1"]))
        run_finetune(config.load(config.EvalConfig, [], FINETUNE + [f"output_dir={ft}", "finetune.epochs=2",
                                                                    "finetune.resume=auto"]))
        result["finetune-ema-resumed"] = digest_run(ft)
        result.update(record_evals(tmp, f"{tmp}/{next(iter(PRETRAIN_RUNS))}-full"))
    result["_machine"] = fingerprint()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print(f"wrote {path}: {len(result)} runs")


def _same(old, new, rtol):
    """Equal values; with ``rtol`` numbers may differ by that relative amount (cross-machine rounding)."""
    if rtol is None or isinstance(old, bool) or isinstance(new, bool):
        return old == new
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return abs(old - new) <= rtol * max(abs(old), abs(new), 1e-12)
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same(old[k], new[k], rtol) for k in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_same(a, b, rtol) for a, b in zip(old, new))
    return old == new


def _compare_item(run, item, old, new, rtol, digests):
    """(problems, values checked) of one log, checkpoint or metrics entry of a run."""
    problems, checked = [], 0
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            problems.append(f"{run}/{item}: {len(old)} rows against {len(new)}")
        for i, (r0, r1) in enumerate(zip(old, new)):
            for k, v in r0.items():
                checked += 1
                if not _same(v, r1.get(k, "<missing>"), rtol):
                    problems.append(f"{run}/{item} row {i}: {k} {v!r} -> {r1.get(k, '<missing>')!r}")
    elif isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            checked += 1
            if k not in old or k not in new:
                problems.append(f"{run}/{item}: {k} only in {'the first' if k in old else 'the second'} record")
            elif (digests or item == "metrics") and not _same(old[k], new[k], rtol):
                problems.append(f"{run}/{item}: {k} differs ({old[k]!r} -> {new[k]!r})")
    elif old is None and new is not None and item.endswith(".jsonl"):
        pass  # a log the older loop did not write
    elif old != new:
        problems.append(f"{run}/{item}: present in one record only")
    return problems, checked


def compare(a_path, b_path, rtol=1e-3):
    """0 when the two records agree: identically when they were made on the same machine and torch, else within
    ``rtol`` and without the tensor digests. Prints every difference (the first 50) and which comparison ran."""
    a, b = json.load(open(a_path)), json.load(open(b_path))
    ma, mb = a.pop("_machine", None), b.pop("_machine", None)
    exact = ma is not None and ma == mb
    tol = None if exact else rtol
    problems, checked = [], 0
    for run in sorted(set(a) | set(b)):
        if run not in a or run not in b:
            problems.append(f"{run}: only in {'the first' if run in a else 'the second'} record")
            continue
        for item in sorted(set(a[run]) | set(b[run])):
            p, c = _compare_item(run, item, a[run].get(item), b[run].get(item), tol, exact)
            problems += p
            checked += c
    for p in problems[:50]:
        print(p)
    how = (f"bit-identical comparison ({ma['machine']}, torch {ma['torch']})" if exact else
           f"cross-machine comparison (numbers within rtol {rtol:g}, tensor digests not compared; "
           f"{(ma or {}).get('machine', 'unknown')} against {(mb or {}).get('machine', 'unknown')})")
    print(f"{how}: {checked} values compared over {len(a)} runs: {len(problems)} differ")
    return 1 if problems else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("record").add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--rtol", type=float, default=1e-3,
                   help="relative tolerance of numbers when the records come from different machines")
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.out)
        return 0
    return compare(args.a, args.b, args.rtol)


if __name__ == "__main__":
    sys.exit(main())
