"""The optimizer table: every optimizer the toolkit runs, its family, source, options and defaults.

    ssl-bocb optimizers              # plain text
    ssl-bocb optimizers --markdown   # the table of docs/optimizers.md
    ssl-bocb optimizers --json       # every field
"""
import argparse
import json

from ssl_bocb.errors import cli_main
from ssl_bocb.optim.registry import table_rows

COLUMNS = ("name", "label", "family", "source", "base_lr", "weight_decay", "options", "weight_decay_kind",
           "lr_scaling", "trust_ratio", "defaults_from")


def _fmt(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="a Markdown table")
    ap.add_argument("--json", action="store_true", help="all fields as JSON")
    args = ap.parse_args(argv)
    rows = table_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    cells = [[_fmt(r[c]) for c in COLUMNS] for r in rows]
    if args.markdown:
        print("| " + " | ".join(COLUMNS) + " |\n|" + " --- |" * len(COLUMNS))
        for row in cells:
            print("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
        return
    shown = COLUMNS[:-1]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(shown)]
    print("  ".join(c.ljust(w) for c, w in zip(shown, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print("\nFamilies: a fixed lr + momentum, b adaptive lr + momentum, c estimated lr + momentum, d adaptive lr with "
          "the current gradient (BOCB, arXiv 2410.06373, Sec. 3.2); new: after the study.\nDefaults per 256 images "
          "for MoCo v3 pretraining; --markdown or --json show where each comes from.")

