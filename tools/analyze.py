#!/usr/bin/env python
"""BOCB analysis: a finished sweep or a CSV of scores -> report.md, report.html, figures and bocb.json.

Usage and options: ssl_bocb/cli/analyze.py (or --help). The same as `ssl-bocb analyze`."""
from ssl_bocb.cli.analyze import main

if __name__ == "__main__":
    main()
