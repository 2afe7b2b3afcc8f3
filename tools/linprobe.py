#!/usr/bin/env python
"""Linear-probe evaluation (MoCo v3 protocol; cached or full) of a pretrained or random-init backbone.

Usage and options: ssl_bocb/cli/linprobe.py (or --help). The same as `ssl-bocb linprobe`."""
from ssl_bocb.cli.linprobe import main

if __name__ == "__main__":
    main()
