#!/usr/bin/env python
"""Short pretraining with each optimizer at its table defaults: does any of them break on this recipe?

    python tools/optim_check.py --config configs/quickstart.yaml --out runs/optim-check \
        data.subset=500 train.epochs=2 train.warmup_epochs=0.5
    python tools/optim_check.py --config configs/quickstart.yaml --optimizers adamw lars --out runs/check2

Runs ``tools/pretrain.py`` once per optimizer (one process each, ``optim.name=<name>`` and nothing else about the
optimizer, so the table's defaults apply) into ``<out>/<name>/``, then prints and writes ``<out>/optim_check.md``
and ``.json``: the loss of the first and the last logged step, the kNN monitor's top-1 after the last epoch,
images/s and wall time. A finished optimizer folder is read, not run again. This is a health check, not a study
(one seed, no tuning); sweeps come from the sweep runner.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tqdm.auto import tqdm

from ssl_bocb.engine.logs import read_jsonl
from ssl_bocb.errors import UserError, cli_main
from ssl_bocb.optim import TABLE, get_entry

BOCB_20 = [n for n, e in TABLE.items() if e.family in "abcd"]


def summarise(name: str, run_dir: str, seconds: float, error: str = "") -> dict:
    e = TABLE[name]
    row = dict(optimizer=name, label=e.label, family=e.family, run_dir=run_dir, seconds=seconds, error=error)
    steps = read_jsonl(os.path.join(run_dir, "steps.jsonl")) if os.path.isdir(run_dir) else []
    epochs = read_jsonl(os.path.join(run_dir, "log.jsonl")) if os.path.isdir(run_dir) else []
    if steps:
        row.update(first_loss=steps[0]["loss"], last_loss=steps[-1]["loss"], steps=steps[-1]["step"],
                   images_per_s=sum(r["images_per_s"] for r in steps[1:] or steps) / len(steps[1:] or steps))
    if epochs:
        row.update(knn_top1=epochs[-1].get("knn_top1"))
    return row


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", required=True, help="recipe file(s), as for tools/pretrain.py")
    ap.add_argument("--optimizers", nargs="+", default=BOCB_20, help="table names (default: the 20 BOCB ones)")
    ap.add_argument("--out", required=True, help="folder for one run per optimizer and the summary")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args(argv)
    for name in args.optimizers:
        if get_entry(name).name not in TABLE:
            raise UserError(f"{name} is not in the optimizer table (no defaults to check)")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in tqdm(args.optimizers, desc="optimizers", unit="run"):
        run_dir = os.path.join(args.out, name)
        t0 = time.time()
        error = ""
        if not os.path.isfile(os.path.join(run_dir, "backbone.safetensors")):
            cmd = [sys.executable, os.path.join(ROOT, "tools", "pretrain.py"),
                   *[a for c in args.config for a in ("--config", c)], f"output_dir={run_dir}", f"optim.name={name}",
                   "resume=auto", *args.overrides]
            proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode:
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                error = lines[-1] if lines else f"exit code {proc.returncode}"
        rows.append(summarise(name, run_dir, time.time() - t0, error))
    lines = ["| optimizer | family | first loss | last loss | steps | kNN top-1 | images/s | seconds | error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def f(r, k, fmt):
        return format(r[k], fmt) if r.get(k) is not None else "-"
    for r in rows:
        lines.append(f"| {r['label']} | {r['family']} | {f(r, 'first_loss', '.4f')} | {f(r, 'last_loss', '.4f')} | "
                     f"{r.get('steps', '-')} | {f(r, 'knn_top1', '.2f')} | {f(r, 'images_per_s', '.1f')} | "
                     f"{r['seconds']:.0f} | {r['error'][:120]} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(args.out, "optim_check.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(args.out, "optim_check.json"), "w") as fh:
        json.dump(rows, fh, indent=2)
    if any(r["error"] for r in rows):
        raise UserError(f"{sum(bool(r['error']) for r in rows)} optimizer run(s) failed; see the table above")


if __name__ == "__main__":
    main()
