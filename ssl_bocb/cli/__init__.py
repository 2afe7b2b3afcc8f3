"""Shared command-line parsing for tools/*.py: ``--config FILE [--config FILE ...] [key=value ...]``."""
import argparse
import os
from typing import List, Tuple


def parse_args(description: str, argv=None) -> Tuple[List[str], List[str], str]:
    """Returns (config files, key=value overrides, a run name taken from the last config file)."""
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Overrides use dotted keys, e.g. train.epochs=10 optim.name=lars. "
                                            "Later --config files override earlier ones.")
    parser.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                        help="YAML recipe; repeat to overlay (e.g. a recipe, then configs/optim/lars.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    name = os.path.splitext(os.path.basename(args.config[-1]))[0] if args.config else "run"
    if len(args.config) > 1:
        name = "-".join(os.path.splitext(os.path.basename(c))[0] for c in args.config)
    return args.config, args.overrides, name
