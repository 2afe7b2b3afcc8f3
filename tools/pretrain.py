#!/usr/bin/env python
"""MoCo v3 pretraining.

    accelerate launch tools/pretrain.py --config configs/cifar10_resnet18.yaml [key=value ...]
    python tools/pretrain.py --config configs/quickstart.yaml          # one process, no launcher needed
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.pretrain import main  # noqa: E402

if __name__ == "__main__":
    main()
