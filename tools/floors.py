#!/usr/bin/env python
"""The floors of a study: kNN of raw normalised pixels and of each backbone at random init (mean over init seeds),
read with exactly the sweep's val_knn / knn evaluation; writes floors.json beside its committed results.

    python tools/floors.py configs/sweeps/<study>.yaml data.root=../shared/data [--init-seeds 0 1 2]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.floors import main  # noqa: E402

if __name__ == "__main__":
    main()
