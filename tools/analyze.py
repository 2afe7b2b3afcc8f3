#!/usr/bin/env python
"""BOCB analysis: a finished sweep or a CSV of scores -> report.md, report.html, figures and bocb.json.

Usage and options: ssl_bocb/cli/analyze.py (or --help).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.analyze import main  # noqa: E402

if __name__ == "__main__":
    main()
