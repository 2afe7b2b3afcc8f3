#!/usr/bin/env python
"""Ablation sweeps: one YAML file -> cells (backbone x optimizer x ablation x seed ...) -> one results table.

Usage and options: ssl_bocb/cli/sweep.py (or --help).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.sweep import main  # noqa: E402

if __name__ == "__main__":
    main()
