#!/usr/bin/env python
"""Linear-probe evaluation (MoCo v3 protocol; cached or full) of a pretrained or random-init backbone.

Usage and options: ssl_bocb/cli/linprobe.py (or --help).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.linprobe import main  # noqa: E402

if __name__ == "__main__":
    main()
