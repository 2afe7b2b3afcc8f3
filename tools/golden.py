"""Golden outputs of a few short runs, to show that a change to the training loop changes no number.

    python tools/golden.py record before.json          # on the code before the change
    python tools/golden.py record after.json           # on the code after it
    python tools/golden.py compare before.json after.json

``record`` runs, on the synthetic dataset in fp32 on the CPU: pretraining (ResNet-18, drop-path) uninterrupted and
stopped mid-epoch then resumed; SAM + AGC with a mid-epoch resume; a ViT with the kNN monitor and
train.host_reads=log; a fine-tune with Mixup, RandAugment and an EMA, stopped after one epoch and resumed. For each
it keeps every row of steps.jsonl and log.jsonl (less the timing fields) and the SHA-256 of every tensor of every
checkpoint (model, momentum encoder, optimizer state, EMA) and of the exported backbone. ``compare`` names every
value that differs; rows may gain keys (a newer loop logs more), never lose or change one.

Results are bit-identical only on one machine and one torch build: compare two records made here, one after the
other, not against a record from another CPU.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TIMING = {"images_per_s", "seconds", "peak_mem_mb"}
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


def record(path):
    os.environ.setdefault("SSL_BOCB_CPU_BF16", "0")  # fp32 on every CPU, as in the tests
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SSL_BOCB_CACHE"] = os.path.join(tmp, "cache")
        from ssl_bocb import config
        from ssl_bocb.engine import pretrain
        from ssl_bocb.eval.finetune import run_finetune
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
    with open(path, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print(f"wrote {path}: {len(result)} runs")


def compare(a_path, b_path):
    a, b = json.load(open(a_path)), json.load(open(b_path))
    problems, checked = [], 0
    for run in sorted(set(a) | set(b)):
        if run not in a or run not in b:
            problems.append(f"{run}: only in {'the first' if run in a else 'the second'} record")
            continue
        for item in sorted(set(a[run]) | set(b[run])):
            old, new = a[run].get(item), b[run].get(item)
            if isinstance(old, list) and isinstance(new, list):
                if len(old) != len(new):
                    problems.append(f"{run}/{item}: {len(old)} rows against {len(new)}")
                for i, (r0, r1) in enumerate(zip(old, new)):
                    for k, v in r0.items():
                        checked += 1
                        if r1.get(k, "<missing>") != v:
                            problems.append(f"{run}/{item} row {i}: {k} {v!r} -> {r1.get(k, '<missing>')!r}")
            elif isinstance(old, dict) and isinstance(new, dict):
                for k in sorted(set(old) | set(new)):
                    checked += 1
                    if old.get(k) != new.get(k):
                        problems.append(f"{run}/{item}: {k} differs")
            elif old is None and new is not None and item.endswith(".jsonl"):
                continue  # a log the older loop did not write
            elif old != new:
                problems.append(f"{run}/{item}: present in one record only")
    for p in problems[:50]:
        print(p)
    print(f"{checked} values compared over {len(a)} runs: {len(problems)} differ")
    return 1 if problems else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("record").add_argument("out")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args()
    if args.cmd == "record":
        record(args.out)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
