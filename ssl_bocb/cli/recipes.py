"""The recipes shipped with the package, by name: pass a name to ``--config`` (``quickstart``,
``ablations/patch_frozen``) or to a sweep (``sweeps/cpu_mini``), from any folder.

    ssl-bocb recipes                 # every name
    ssl-bocb recipes ablations       # those under a folder
    ssl-bocb recipes --path quickstart   # the file a name stands for (copy it to start your own)
"""
import argparse

from .. import recipes
from ..errors import cli_main


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("under", nargs="?", help="only the recipes under this folder (ablations, eval, optim, sweeps)")
    ap.add_argument("--path", metavar="NAME", help="print the file that NAME stands for")
    args = ap.parse_args(argv)
    if args.path:
        print(recipes.find(args.path))
        return
    for name in recipes.names(args.under):
        print(name)
