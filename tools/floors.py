#!/usr/bin/env python
"""The floors of a study: kNN of raw pixels and of each backbone at random init -> floors.json.

Usage and options: ssl_bocb/cli/floors.py (or --help). The same as `ssl-bocb floors`."""
from ssl_bocb.cli.floors import main

if __name__ == "__main__":
    main()
