#!/usr/bin/env python
"""The quickstart job: MoCo v3 pretraining, then kNN and a linear probe against the same backbone at random init.

Usage and options: ssl_bocb/cli/quickstart.py (or --help).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.quickstart import main  # noqa: E402

if __name__ == "__main__":
    main()
