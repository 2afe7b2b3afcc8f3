#!/usr/bin/env python
"""kNN evaluation (DINO protocol) of a pretrained or random-init backbone.

Usage and options: ssl_bocb/cli/knn.py (or --help). The same as `ssl-bocb knn`."""
from ssl_bocb.cli.knn import main

if __name__ == "__main__":
    main()
