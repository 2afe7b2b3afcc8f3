#!/usr/bin/env python
"""Ablation sweeps: one YAML file -> cells (backbone x optimizer x ablation x seed ...) -> one results table.

Usage and options: ssl_bocb/cli/sweep.py (or --help). The same as `ssl-bocb sweep`."""
from ssl_bocb.cli.sweep import main

if __name__ == "__main__":
    main()
