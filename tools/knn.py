#!/usr/bin/env python
"""kNN evaluation (DINO protocol) of a pretrained or random-init backbone.

Usage and options: ssl_bocb/cli/knn.py (or --help).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.knn import main  # noqa: E402

if __name__ == "__main__":
    main()
