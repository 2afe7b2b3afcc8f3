"""Ablation sweeps: one YAML file -> cells (backbone x optimizer x ablation x seed ...) -> one results table.

    python tools/sweep.py plan    configs/sweeps/cpu_mini.yaml data.root=../shared/data   # cells, names, state
    python tools/sweep.py run     configs/sweeps/cpu_mini.yaml data.root=../shared/data   # local pool, resumable
    python tools/sweep.py status  configs/sweeps/cpu_mini.yaml data.root=../shared/data
    python tools/sweep.py collect configs/sweeps/cpu_mini.yaml data.root=../shared/data   # results.csv / .md / .png
    python tools/sweep.py submit  configs/sweeps/cpu_mini.yaml data.root=/data            # SLURM job array
    python tools/sweep.py baselines configs/sweeps/cpu_mini.yaml data.root=../shared/data # random-init kNN

key=value overrides apply to every cell (and to every stage's data keys); pass the same ones (and the same --seeds)
to every subcommand, since they are part of what the cells are (paths, worker counts and logging are not part of a
cell's hash). --seeds 0 1 2 adds seeds to a sweep without running again the cells of the seeds already done.
A finished cell is never run again; a partial one continues (resume=auto); a failed one is recorded with its
error line and skipped by later runs unless --retry-failed.
"""
import argparse
import json
import os
import sys

from ssl_bocb.engine.logs import setup_logging
from ssl_bocb.errors import UserError, cli_main
from ssl_bocb.sweep import cell_status, collect, describe, plan, run_local


def _progress(cell) -> str:
    from ssl_bocb.analysis.plots import read_jsonl
    steps = read_jsonl(os.path.join(cell.folder, "steps.jsonl")) if os.path.isdir(cell.folder) else []
    return f"step {steps[-1]['step']}" if steps else ""


def print_cells(p, with_error: bool = True) -> dict:
    counts = {}
    width = max(len(c.id) for c in p.cells)
    for c in p.cells:
        st = cell_status(c)
        counts[st["state"]] = counts.get(st["state"], 0) + 1
        left = ("committed (done elsewhere)" if st.get("committed") else "" if st["state"] == "done"
                else "left: " + ",".join(st["left"]))
        detail = st["error"] if with_error and st["state"] in ("failed", "interrupted") else _progress(c)
        print(f"{c.id:{width}s}  {st['state']:11s}  {left:32s}  {detail}".rstrip())
    print(f"{len(p.cells)} cells: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) +
          f"  (folder {p.output_dir})")
    return counts


def run_selected(p, args):
    """A sweep with a select block, one pair at a time: its grid, the points its choice adds, then its test stages
    and seeds; planned again after each round, since what a pair runs next depends on what it read."""
    outcome = {"done": [], "failed": [], "interrupted": [], "skipped": []}
    tried = set()
    while True:
        todo = [c for c in p.cells if cell_status(c)["state"] != "done" and c.id not in tried]
        if not todo:
            break
        group = p.group(todo[0])
        batch = [c for c in todo if p.group(c) == group]
        tried.update(c.id for c in batch)
        out = run_local(p, args.parallel, args.retry_failed, batch, on_done=(lambda cell: collect(p)) if p.results
                        else None)
        for k, v in out.items():
            outcome[k].extend(v)
        collect(p)
        p = plan(args.sweep, args.overrides, args.seeds)
    for group, s in p.selection.items():
        print(f"{group}: {s['key']} {s['where']}" + (f", chose {s['chosen']}" if s["chosen"] else "") +
              "; " + ", ".join(f"{k}: {v if v is None else round(v, 2)}" for k, v in s["points"].items()))
    return p, outcome


def run_command(p, args):
    """`run`: the cells not done here (a select sweep one pair at a time), then the table; exit 1 if any failed."""
    if args.parallel is not None and args.parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {args.parallel}")
    cells = [p.find(c) for c in args.cells] if args.cells else None
    try:
        # with a committed results table, each finished cell's row is written there as it comes in
        if p.selection and cells is None:
            p, outcome = run_selected(p, args)
        else:
            outcome = run_local(p, args.parallel, args.retry_failed, cells,
                                on_done=(lambda cell: collect(p)) if p.results else None)
    finally:
        paths = collect(p)
    with open(paths["md"]) as f:
        print(f.read())
    print(f"results: {paths['md']}, {paths['csv']}" + (f", {paths['png']}" if "png" in paths else ""))
    n_bad = len(outcome["failed"]) + len(outcome["skipped"]) + len(outcome["interrupted"])
    if n_bad:
        print(f"{len(outcome['failed'])} cell(s) failed, {len(outcome['skipped'])} failed before and skipped, "
              f"{len(outcome['interrupted'])} interrupted; `tools/sweep.py status {args.sweep}` shows why",
              file=sys.stderr)
        sys.exit(1)


@cli_main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    cmds = {}
    for name, text in (("plan", "list the cells, their names, hashes and state; runs nothing"),
                       ("run", "run the cells that are not done on this machine, --parallel at a time"),
                       ("submit", "submit the cells that are not done as one SLURM job array (submitit)"),
                       ("status", "state of every cell: done, running, interrupted, failed (with its error), pending"),
                       ("collect", "write results.csv, results.md, results.json, results.png and TensorBoard "
                                   "HParams"),
                       ("baselines", "kNN of every backbone variant at random init, read as the knn stage reads the "
                                     "cells: random_init.json")):
        sp = sub.add_parser(name, help=text, description=text)
        sp.add_argument("sweep", help="sweep file, e.g. configs/sweeps/cpu_mini.yaml")
        sp.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every cell")
        sp.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="run these seeds instead of the file's (cells of seeds already run are reused)")
        cmds[name] = sp
    cmds["plan"].add_argument("--json", action="store_true", help="print the plan as JSON")
    cmds["run"].add_argument("--parallel", type=int, default=None, help="cells at once (default resources.parallel)")
    for name in ("run", "submit"):
        cmds[name].add_argument("--retry-failed", action="store_true", help="run failed cells again too")
    cmds["run"].add_argument("--cells", nargs="+", metavar="CELL", help="only these cells (names or folder names)")
    cmds["submit"].add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                                help="submitit executor (default: SLURM when sbatch is there, else local)")
    cmds["submit"].add_argument("--wait", action="store_true", help="wait for the jobs and print their states")
    args = ap.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise UserError(f"'{bad[0]}' is not a key=value override (the sweep file comes first, once)")
    setup_logging(True)
    p = plan(args.sweep, args.overrides, args.seeds)

    if args.command == "plan":
        if args.json:
            print(json.dumps(describe(p), indent=2))
        else:
            print(f"sweep {p.name}: axes {', '.join(p.axes) or '(none)'}; stages per cell: pretrain" +
                  "".join(f", {s.name}" for s in p.cells[0].stages))
            print_cells(p, with_error=False)
    elif args.command == "status":
        print_cells(p)
    elif args.command == "collect":
        paths = collect(p)
        with open(paths["md"]) as f:
            print(f.read())
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    elif args.command == "baselines":
        from ssl_bocb.sweep.baselines import random_init
        print(json.dumps(random_init(p), indent=2))
    elif args.command == "run":
        run_command(p, args)
    elif args.command == "submit":
        from ssl_bocb.sweep.slurm import submit
        out = submit(p, args.cluster, args.retry_failed, args.wait)
        if not out["jobs"]:
            print("nothing to submit: every cell is done (or failed; --retry-failed submits those)")
        for cell, job in out["jobs"].items():
            state = out["states"].get(cell, "")
            print(f"{cell}  job {job}  {state}".rstrip())
