#!/usr/bin/env python
"""The optimizer table. Usage and options: ssl_bocb/cli/optimizers.py (or --help). The same as `ssl-bocb optimizers`."""
from ssl_bocb.cli.optimizers import main

if __name__ == "__main__":
    main()
