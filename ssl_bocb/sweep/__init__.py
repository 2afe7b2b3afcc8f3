"""Sweeps: plan (cells from a sweep file), run (local pool / SLURM), status and collect (one results table)."""
from .collect import collect
from .plan import Cell, Plan, describe, plan
from .runner import cell_status, run_cell, run_local

__all__ = ["collect", "Cell", "Plan", "describe", "plan", "cell_status", "run_cell", "run_local"]
