#!/usr/bin/env python
"""Per-optimizer cost: optimizer-step time and optimizer-state memory for every entry of the optimizer table.

    python tools/bench_optim.py                                   # ResNet-18 and ViT-S/16, all entries
    python tools/bench_optim.py --models resnet18 --optimizers adamw lars sophia --steps 20 --out bench_optim

Each model gets a real forward / backward on a small random batch before every step (so Sophia's Hessian pass
has a graph to differentiate), and only ``optimizer.step()`` is timed; the step time is the mean over ``--steps``
steps after ``--warmup`` (Sophia's Hutchinson pass, every 10 steps, is amortised into its mean; the median shows
the plain step). State memory is the bytes of every tensor in ``optimizer.state`` after the steps, also shown per
parameter of the model. Writes ``<out>.json`` and ``<out>.md``. Kron compiles its kernels with torch.compile for
each tensor shape during the warm-up steps (minutes on a CPU); Muon orthogonalises in bf16, which a CPU without
native bf16 emulates (tens of times slower).
"""
import argparse
import json
import statistics
import time
import warnings


import torch
from tqdm.auto import tqdm

from ssl_bocb.engine.step import hessian_pass
from ssl_bocb.errors import UserError, cli_main
from ssl_bocb.models import create_backbone
from ssl_bocb.optim import TABLE, get_entry, param_groups
from ssl_bocb.optim.registry import build_optimizer, resolve_named

MODELS = {
    "resnet18": dict(name="resnet18", kwargs={}, image=64),
    "vit_small": dict(name="vit_small_patch16_224", kwargs={"img_size": 64}, image=64),
}


def state_bytes(optimizer) -> int:
    """Bytes of every tensor in the optimizer state, inside lists and dicts too (Kron keeps its preconditioner
    factors in a list), each storage counted once."""
    seen = set()

    def walk(v):
        if torch.is_tensor(v):
            if v.data_ptr() in seen:
                return 0
            seen.add(v.data_ptr())
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        return 0
    return sum(walk(state) for state in optimizer.state.values())


def bench_one(model_key: str, opt_name: str, steps: int, warmup: int, batch: int):
    spec = MODELS[model_key]
    torch.manual_seed(0)
    model = create_backbone(spec["name"], **spec["kwargs"])
    x = torch.randn(batch, 3, spec["image"], spec["image"])
    entry = get_entry(opt_name)
    resolved = resolve_named(opt_name)
    opt = build_optimizer(param_groups(model, resolved.weight_decay), resolved, resolved.base_lr)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times = []
    for i in range(warmup + steps):
        opt.zero_grad(set_to_none=True)
        double = entry.hessian and i % 10 == 0   # SophiaH's update_period
        with hessian_pass(double):
            loss = model(x).pow(2).mean()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss.backward(create_graph=double)
        t = time.perf_counter()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    opt.zero_grad(set_to_none=True)
    sb = state_bytes(opt)
    return dict(model=model_key, optimizer=opt_name, label=entry.label, family=entry.family,
                params_m=n_params / 1e6, step_ms_mean=1e3 * statistics.mean(times),
                step_ms_median=1e3 * statistics.median(times), state_mb=sb / 2 ** 20,
                state_bytes_per_param=sb / n_params)


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--optimizers", nargs="+", default=list(TABLE))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    ap.add_argument("--out", default="bench_optim", help="writes <out>.json and <out>.md")
    args = ap.parse_args(argv)
    for name in args.optimizers:
        get_entry(name)
    if args.steps < 1:
        raise UserError("--steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    jobs = [(m, o) for m in args.models for o in args.optimizers]
    for m, o in tqdm(jobs, desc="optimizer benchmark", unit="run"):
        rows.append(bench_one(m, o, args.steps, args.warmup, args.batch))
    lines = ["| model | optimizer | family | step ms (mean) | step ms (median) | state MB | state bytes / param |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['params_m']:.1f} M) | {r['label']} | {r['family']} | {r['step_ms_mean']:.1f} "
                     f"| {r['step_ms_median']:.1f} | {r['state_mb']:.1f} | {r['state_bytes_per_param']:.1f} |")
    text = "\n".join(lines)
    print(text)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(threads=torch.get_num_threads(), steps=args.steps, batch=args.batch, rows=rows), f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    print(f"wrote {args.out}.json and {args.out}.md")


if __name__ == "__main__":
    main()
