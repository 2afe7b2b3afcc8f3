#!/usr/bin/env python
"""The quickstart job: MoCo v3 pretraining, then kNN and a linear probe against the same backbone at random init.

Usage and options: ssl_bocb/cli/quickstart.py (or --help). The same as `ssl-bocb quickstart`."""
from ssl_bocb.cli.quickstart import main

if __name__ == "__main__":
    main()
