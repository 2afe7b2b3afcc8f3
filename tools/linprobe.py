#!/usr/bin/env python
"""Linear-probe evaluation (MoCo v3 protocol; cached or full) of a pretrained or random-init backbone.

    python tools/linprobe.py checkpoint=runs/quickstart-<time> linear.mode=full
    accelerate launch tools/linprobe.py --config configs/eval/cifar10.yaml checkpoint=<run> [key=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssl_bocb import config  # noqa: E402
from ssl_bocb.cli import parse_args  # noqa: E402
from ssl_bocb.errors import cli_main  # noqa: E402
from ssl_bocb.eval.stages import run_linprobe  # noqa: E402


@cli_main
def main(argv=None):
    files, overrides, _ = parse_args("Linear-probe evaluation (MoCo v3 protocol; cached or full) of a pretrained or random-init backbone", argv)
    run_linprobe(config.load(config.EvalConfig, files, overrides))


if __name__ == "__main__":
    main()
