#!/usr/bin/env python
"""BOCB analysis: a finished sweep (or any CSV of backbone, optimizer, seed, lr, wd, score rows) -> report.md,
a self-contained report.html, PNG figures and bocb.json.

    python tools/analyze.py runs/sweeps/cpu_mini                      # metric: linear probe, else kNN, else fine-tune
    python tools/analyze.py runs/sweeps/cpu_mini --metric knn_top1 --rule iqr --threshold 1.5
    python tools/analyze.py runs/sweeps/cpu_mini --sharpness          # + top Hessian eigenvalue and activity per run
    python tools/analyze.py ../shared/data/bocb_cifar100_best_lr_wd.csv   # the paper's tuned lr / wd: robustness

Rules and definitions: ../shared/SPEC.md section 3 and the README ("BOCB analysis"). The output folder defaults to
<sweep folder>/analysis (or <csv name>-analysis beside the CSV); per-run weight diagnostics are cached there.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.analyze import main  # noqa: E402

if __name__ == "__main__":
    main()
