#!/usr/bin/env python
"""Linear-probe evaluation (MoCo v3 protocol; cached or full) of a pretrained or random-init backbone.

    python tools/linprobe.py checkpoint=runs/quickstart-<time> linear.mode=full
    accelerate launch tools/linprobe.py --config configs/eval/cifar10.yaml checkpoint=<run> [key=value ...]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.linprobe import main  # noqa: E402

if __name__ == "__main__":
    main()
