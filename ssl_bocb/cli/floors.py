"""The floors of a study: kNN of raw normalised pixels and of each backbone at random init (mean over init seeds),
read with exactly the sweep's val_knn / knn evaluation; writes floors.json beside its committed results.

    python tools/floors.py configs/sweeps/<study>.yaml data.root=../shared/data [--init-seeds 0 1 2]
"""
import argparse
import json

from ssl_bocb.engine.logs import setup_logging
from ssl_bocb.errors import UserError, cli_main
from ssl_bocb.sweep import plan
from ssl_bocb.sweep.floors import measure, paths


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="sweep file whose evaluation the floors are read with")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="the overrides the sweep runs with")
    ap.add_argument("--init-seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                    help="random-init draws per backbone variant (at least 3; default 0 1 2)")
    args = ap.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"'{bad[0]}' is not a key=value override (the sweep file comes first, once)")
    setup_logging(True)
    p = plan(args.sweep, args.overrides)
    floors = measure(p, args.init_seeds)
    print(json.dumps({k: floors[k] for k in ("pixels", "bank_per_class", "random_init")}, indent=2))
    for split, block in floors["splits"].items():
        print(f"{split} ({block['split']}, bank {block['bank_per_class']}/class, {block['num_queries']} queries): "
              f"pixels {block['pixels']:.2f}; random init " +
              ", ".join(f"{k} {v:.2f}" for k, v in block["random_init"].items()))
    print("written: " + ", ".join(paths(p)))
