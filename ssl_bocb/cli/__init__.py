"""Shared command-line parsing for tools/*.py: ``--config FILE [--config FILE ...] [key=value ...]``."""
import argparse
import os
from typing import List, Tuple


def parse_args(description: str, argv=None, schema=None) -> Tuple[List[str], List[str], str]:
    """Returns (config files, key=value overrides, a run name taken from the last config file). With ``schema``,
    ``--help-config`` prints every key of it (type, default, values, bounds, documentation) and exits."""
    parser = argparse.ArgumentParser(description=description,
                                     epilog="Overrides use dotted keys, e.g. train.epochs=10 optim.name=lars. "
                                            "Later --config files override earlier ones.")
    parser.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                        help="YAML recipe; repeat to overlay (e.g. a recipe, then configs/optim/lars.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    if schema is not None:
        parser.add_argument("--help-config", action="store_true",
                            help="list every config key: type, default, allowed values, bounds, what it does")
    args = parser.parse_args(argv)
    if schema is not None and args.help_config:
        from ..config import describe
        try:
            print(describe(schema))
        except BrokenPipeError:  # piped into head
            pass
        parser.exit(0)
    name = os.path.splitext(os.path.basename(args.config[-1]))[0] if args.config else "run"
    if len(args.config) > 1:
        name = "-".join(os.path.splitext(os.path.basename(c))[0] for c in args.config)
    return args.config, args.overrides, name
