#!/usr/bin/env python
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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, when not installed

from ssl_bocb.cli.sweep import main  # noqa: E402

if __name__ == "__main__":
    main()
