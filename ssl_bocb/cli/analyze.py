"""BOCB analysis: a finished sweep (or any CSV of backbone, optimizer, seed, lr, wd, score rows) -> report.md,
a self-contained report.html, PNG figures and bocb.json.

    python tools/analyze.py runs/sweeps/cpu_mini                      # metric: linear probe, else kNN, else fine-tune
    python tools/analyze.py runs/sweeps/cpu_mini --metric knn_top1 --rule iqr --threshold 1.5
    python tools/analyze.py runs/sweeps/cpu_mini --sharpness          # + top Hessian eigenvalue and activity per run
    python tools/analyze.py ../shared/data/bocb_cifar100_best_lr_wd.csv   # the paper's tuned lr / wd: robustness

Rules and definitions: ../shared/SPEC.md section 3 and docs/report.md. The output folder defaults to
<sweep folder>/analysis (or <csv name>-analysis beside the CSV); per-run weight diagnostics are cached there.
"""
import argparse
import os

from ssl_bocb.engine.logs import setup_logging
from ssl_bocb.errors import UserError, cli_main


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="sweep folder (holding results.csv) or a CSV file")
    ap.add_argument("--out", default=None, help="output folder (default: <sweep>/analysis or <csv>-analysis)")
    ap.add_argument("--metric", default=None, help="score column: linprobe_top1, knn_top1, finetune_top1 (default: "
                                                   "the first of these the sweep has) or a CSV column")
    ap.add_argument("--rule", default="eq1", choices=("eq1", "iqr"),
                    help="bad-pairing rule: eq1 (paper Eq. 1, r < max - min(IQR, gamma)) or iqr (max - r > t * IQR)")
    ap.add_argument("--threshold", type=float, default=None,
                    help="gamma for eq1 (default 3, the paper's CIFAR value; 1 for ImageNet) or t for iqr (default 1.5)")
    ap.add_argument("--ci", default="t", choices=("t", "bootstrap"), help="confidence interval of a cell's mean")
    ap.add_argument("--level", type=float, default=0.95, help="confidence level")
    ap.add_argument("--no-weights", action="store_true", help="skip the per-layer weight diagnostics")
    ap.add_argument("--pca-frac", type=float, default=0.1, help="top-k PCA energy with k = frac x rank")
    ap.add_argument("--bins", type=int, default=100, help="histogram bins of the weight-value entropy")
    ap.add_argument("--sharpness", action="store_true",
                    help="also the top Hessian eigenvalue of the MoCo v3 loss and the activation fractions per run "
                         "(a few double-backward passes per run, on the CPU)")
    ap.add_argument("--sharpness-batch", type=int, default=64, help="images in the fixed sharpness batch")
    ap.add_argument("--sharpness-iters", type=int, default=20, help="power iterations at most")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if not 0 < args.level < 1:
        raise UserError(f"--level must be between 0 and 1, got {args.level}")
    if not 0 < args.pca_frac <= 1:
        raise UserError(f"--pca-frac must be in (0, 1], got {args.pca_frac}")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    setup_logging(True)
    from ssl_bocb.analysis.report import Options, analyze
    src = args.source.rstrip("/")
    out = args.out or (os.path.join(src, "analysis") if os.path.isdir(src) else os.path.splitext(src)[0] + "-analysis")
    opts = Options(metric=args.metric, rule=args.rule, threshold=args.threshold, ci=args.ci, level=args.level,
                   weights=not args.no_weights, sharpness=args.sharpness, sharpness_batch=args.sharpness_batch,
                   sharpness_iters=args.sharpness_iters, pca_frac=args.pca_frac, bins=args.bins)
    paths = analyze(src, out, opts)
    with open(paths["md"]) as f:
        text = f.read()
    print(text.split("\n## ", 2)[1] if "\n## " in text else text)
    print(f"report: {paths['md']}, {paths['html']} ({paths['n_figures']} figures embedded), {paths['json']}")
