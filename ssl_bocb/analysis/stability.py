"""Instability events read off a run's logs (the rules of ``engine.stability``). A run's own ``summary.json`` counts
(written by runs that detect events while training) take precedence over counts recomputed here from steps.jsonl /
log.jsonl, which see only the logged steps."""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

from ..engine.stability import dips, onsets, spikes
from .plots import read_jsonl, read_summary


def run_events(run_dir: str) -> Dict:
    """Spike and dip events of one run (and the steps where they began), with where they came from."""
    s = read_summary(run_dir)
    ev = s.get("events", s)
    if any(k in ev for k in ("grad_spikes", "loss_spikes", "knn_dips")):
        out = dict(source="summary.json", logged_steps=s.get("step"))
        out.update({k: ev.get(k) for k in ("grad_spikes", "loss_spikes", "knn_dips", "nonfinite_steps",
                                           "overflow_skips", "rollbacks")})
        # the dips of whatever the run watched: pretraining's kNN monitor (knn_dips), a fine-tune's validation
        # top-1 (top1_dips)
        dip_keys = [k for k in ev if k.endswith("_dips")]
        out["dips"] = ev.get(dip_keys[0]) if dip_keys else None
        out["first_layers"] = s.get("first_layer_counts")
        return out
    steps = read_jsonl(os.path.join(run_dir, "steps.jsonl"))
    epochs = read_jsonl(os.path.join(run_dir, "log.jsonl"))
    grad = [r.get("grad_norm", np.nan) for r in steps]
    loss = [r.get("loss", np.nan) for r in steps]
    knn = [r["knn_top1"] for r in epochs if "knn_top1" in r]
    gs, ls, ds = onsets(spikes(grad)), onsets(spikes(loss)), onsets(dips(knn))
    return dict(source="logs", grad_spikes=len(gs), loss_spikes=len(ls),
                knn_dips=len(ds) if knn else None, dips=len(ds) if knn else None, grad_spike_steps=[steps[i]["step"] for i in gs],
                loss_spike_steps=[steps[i]["step"] for i in ls], logged_steps=len(steps), knn_readings=len(knn))
