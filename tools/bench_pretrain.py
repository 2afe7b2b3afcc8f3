#!/usr/bin/env python
"""Pretraining throughput (images/s) and peak memory of recipes at each precision.

    python tools/bench_pretrain.py --config configs/cifar10_resnet18.yaml --config configs/cifar10_vit_tiny.yaml \
        --precisions no bf16 --steps 12

Each run trains `--steps` steps on the recipe's data (data.root / SSL_BOCB_DATA) into a temporary folder and
reports the mean images/s of the logged intervals after the first (start-up excluded) and the peak memory
(process resident memory on CPU, allocated memory on GPU).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ssl_bocb.engine.logs import read_jsonl  # noqa: E402
from ssl_bocb.errors import UserError, cli_main  # noqa: E402


@cli_main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", required=True)
    ap.add_argument("--precisions", nargs="+", default=["no", "bf16"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    rows = []
    for recipe in args.config:
        for prec in args.precisions:
            with tempfile.TemporaryDirectory() as tmp:
                # one process per run, so that each peak-memory figure is its own
                cmd = [sys.executable, os.path.join(ROOT, "tools", "pretrain.py"), "--config", recipe,
                       f"output_dir={tmp}/run", f"train.mixed_precision={prec}", f"train.stop_at_step={args.steps}",
                       "train.log_every=2", "monitor.knn_every=0", *args.overrides]
                proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if proc.returncode:
                    raise UserError(f"{os.path.basename(recipe)} at {prec} failed: {proc.stderr.strip()[-300:]}")
                steps = read_jsonl(os.path.join(tmp, "run", "steps.jsonl"))
                batch = yaml.safe_load(open(os.path.join(tmp, "run", "config.yaml")))["train"]["batch_size"]
            timed = steps[1:] or steps
            rows.append(dict(recipe=os.path.basename(recipe), precision=prec, batch=batch,
                             images_per_s=sum(r["images_per_s"] for r in timed) / len(timed),
                             peak_mem_mb=max(r["peak_mem_mb"] for r in steps)))
    print("\n| recipe | precision | batch | images/s | peak memory (MB) |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['recipe']} | {r['precision']} | {r['batch']} | {r['images_per_s']:.1f} | {r['peak_mem_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
