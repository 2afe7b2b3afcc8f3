#!/usr/bin/env python
"""MoCo v3 pretraining. Usage and options: ssl_bocb/cli/pretrain.py (or --help). The same as `ssl-bocb pretrain`."""
from ssl_bocb.cli.pretrain import main

if __name__ == "__main__":
    main()
