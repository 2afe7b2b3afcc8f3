#!/usr/bin/env python
"""The quickstart job: MoCo v3 pretraining, then kNN and a cached linear probe of the result and of the same
backbone at random init, printed side by side.

    python tools/quickstart.py                       # configs/quickstart.yaml
    python tools/quickstart.py --config configs/quickstart.yaml train.epochs=1
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ssl_bocb import config, quickstart  # noqa: E402
from ssl_bocb.cli import parse_args  # noqa: E402
from ssl_bocb.errors import cli_main  # noqa: E402


@cli_main
def main(argv=None):
    files, overrides, name = parse_args("Quickstart: pretrain, then kNN and linear probe vs random init", argv)
    files = files or [os.path.join(ROOT, "configs", "quickstart.yaml")]
    name = name if name != "run" else "quickstart"
    quickstart.run(config.load(config.PretrainConfig, files, overrides), name)


if __name__ == "__main__":
    main()
