#!/usr/bin/env python
"""MoCo v3 pretraining.

    accelerate launch tools/pretrain.py --config configs/cifar10_resnet18.yaml [key=value ...]
    python tools/pretrain.py --config configs/quickstart.yaml          # one process, no launcher needed
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssl_bocb import config  # noqa: E402
from ssl_bocb.cli import parse_args  # noqa: E402
from ssl_bocb.tasks import pretrain  # noqa: E402
from ssl_bocb.errors import cli_main  # noqa: E402


@cli_main
def main(argv=None):
    files, overrides, name = parse_args("MoCo v3 self-supervised pretraining", argv)
    cfg = config.load(config.PretrainConfig, files, overrides)
    pretrain(cfg, name)


if __name__ == "__main__":
    main()
