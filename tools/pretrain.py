#!/usr/bin/env python
"""MoCo v3 pretraining. Usage and options: ssl_bocb/cli/pretrain.py (or --help)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.pretrain import main  # noqa: E402

if __name__ == "__main__":
    main()
