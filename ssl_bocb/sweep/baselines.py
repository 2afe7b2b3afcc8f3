"""The random-init baseline of a sweep: every backbone variant's kNN top-1 before any pretraining, evaluated exactly
as the sweep's kNN stage evaluates its cells (same eval config, same bank and test images), once per seed (the
seed draws the initial weights). A study reads each cell's gain against it."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List

import numpy as np

from .. import config
from ..errors import UserError
from .plan import Cell, Plan

log = logging.getLogger(__name__)


def variant(plan: Plan, cell: Cell) -> str:
    """A cell's backbone variant as the BOCB report names it: its backbone, then ``axis=value`` of each other axis
    (not the optimizer) whose value varies among that backbone's cells."""
    extra = [a for a in plan.axes if a not in ("backbone", "optimizer", "seed", "lr", "wd")]
    backbone = cell.labels.get("backbone", cell.values["backbone"])
    same = [c for c in plan.cells if c.labels.get("backbone", c.values["backbone"]) == backbone]
    varying = [a for a in extra if len({c.labels[a] for c in same}) > 1]
    return " ".join([backbone] + [f"{a}={cell.labels[a]}" for a in varying])


def random_init(plan: Plan) -> Dict:
    """Run the kNN stage on each backbone variant at random init, for each seed of the plan; writes and returns
    ``{variant: mean top-1, ..., "per_seed": {variant: {seed: top-1}}}`` in ``<output_dir>/random_init.json`` (and
    beside the committed results table)."""
    from ..eval.stages import run_knn
    if not plan.cells or not any(s.name == "knn" for s in plan.cells[0].stages):
        raise UserError(f"sweep {plan.name} has no knn stage: the random-init baseline is read with it")
    per_seed: Dict[str, Dict[str, float]] = {}
    seen = set()
    for cell in plan.cells:
        key, seed = variant(plan, cell), cell.labels["seed"]
        if (key, seed) in seen:
            continue
        seen.add((key, seed))
        pre = config.load(config.PretrainConfig, cell.files, cell.overrides)
        model = config.to_dict(pre.model)
        stage = next(s for s in cell.stages if s.name == "knn")
        folder = os.path.join(plan.output_dir, "random_init", f"{key.replace(' ', '_').replace('=', '-')}-s{seed}")
        overrides = stage.overrides + [f"model.{k}={json.dumps(v)}" for k, v in model.items()] + [
            f"output_dir={folder}", "overwrite=true"]
        log.info("random init of %s, seed %s: kNN as the sweep's stage reads it", key, seed)
        metrics = run_knn(config.load(config.EvalConfig, stage.files, overrides))
        per_seed.setdefault(key, {})[seed] = metrics["top1"]
    out: Dict = {k: float(np.mean(list(v.values()))) for k, v in per_seed.items()}
    out["per_seed"] = per_seed
    paths: List[str] = [os.path.join(plan.output_dir, "random_init.json")]
    if plan.results:
        paths.append(os.path.join(os.path.dirname(plan.results), "random_init.json"))
    for p in paths:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "w") as f:
            json.dump(out, f, indent=2)
    return out
