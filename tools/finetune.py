#!/usr/bin/env python
"""Fine-tune a pretrained (or random-init) backbone on a downstream dataset.

Usage and options: ssl_bocb/cli/finetune.py (or --help).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.finetune import main  # noqa: E402

if __name__ == "__main__":
    main()
