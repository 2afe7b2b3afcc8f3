#!/usr/bin/env python
"""The floors of a study: kNN of raw pixels and of each backbone at random init -> floors.json.

Usage and options: ssl_bocb/cli/floors.py (or --help).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.floors import main  # noqa: E402

if __name__ == "__main__":
    main()
