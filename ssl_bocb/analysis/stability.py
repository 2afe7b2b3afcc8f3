"""Instability events read off a run's logs: gradient-norm and loss spikes, kNN-monitor dips.

- spike: a value above ``factor`` x the median of the ``window`` values before it (needs at least ``min_history``
  of them), so a slowly falling or rising series never counts, and a spike does not hide the next one for long;
- dip: a monitor reading more than ``drop`` points below the best reading before it.

A run's own ``summary.json`` counts (written by runs that detect events while training) take precedence over
counts recomputed here from steps.jsonl / log.jsonl, which see only the logged steps."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import numpy as np

from .plots import read_jsonl

SPIKE_FACTOR = 3.0
SPIKE_WINDOW = 20
SPIKE_MIN_HISTORY = 5
DIP_DROP = 2.0


def spikes(values: Sequence[float], factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW,
           min_history: int = SPIKE_MIN_HISTORY) -> List[int]:
    """Indices of the values above ``factor`` x the running median of the previous ``window`` values."""
    x = np.asarray(values, dtype=float)
    out = []
    for i in range(min_history, len(x)):
        past = x[max(0, i - window):i]
        past = past[np.isfinite(past)]
        if len(past) >= min_history and np.isfinite(x[i]) and x[i] > factor * np.median(past):
            out.append(i)
    return out


def dips(values: Sequence[float], drop: float = DIP_DROP) -> List[int]:
    """Indices of the readings more than ``drop`` below the best reading before them."""
    best, out = -np.inf, []
    for i, v in enumerate(values):
        if v is None or not np.isfinite(v):
            continue
        if v < best - drop:
            out.append(i)
        best = max(best, v)
    return out


def run_events(run_dir: str) -> Dict:
    """Spike and dip counts of one run (and the steps where they happened), with where they came from."""
    summary = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary):
        with open(summary) as f:
            s = json.load(f)
        ev = s.get("events", s)
        if any(k in ev for k in ("grad_spikes", "loss_spikes", "knn_dips")):
            return dict(source="summary.json", grad_spikes=ev.get("grad_spikes"), loss_spikes=ev.get("loss_spikes"),
                        knn_dips=ev.get("knn_dips"), nonfinite_steps=ev.get("nonfinite_steps"),
                        rollbacks=ev.get("rollbacks"))
    steps = read_jsonl(os.path.join(run_dir, "steps.jsonl"))
    epochs = read_jsonl(os.path.join(run_dir, "log.jsonl"))
    grad = [r.get("grad_norm", np.nan) for r in steps]
    loss = [r.get("loss", np.nan) for r in steps]
    knn = [r["knn_top1"] for r in epochs if "knn_top1" in r]
    gs, ls, ds = spikes(grad), spikes(loss), dips(knn)
    return dict(source="logs", grad_spikes=len(gs), loss_spikes=len(ls),
                knn_dips=len(ds) if knn else None, grad_spike_steps=[steps[i]["step"] for i in gs],
                loss_spike_steps=[steps[i]["step"] for i in ls], logged_steps=len(steps), knn_readings=len(knn))
