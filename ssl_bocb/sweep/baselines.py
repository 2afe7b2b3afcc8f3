"""The random-init baseline of a sweep: every backbone variant's kNN top-1 before any pretraining, evaluated exactly
as the sweep's kNN stage evaluates its cells (same eval config, same bank and test images). The evaluation tools
draw a random-init backbone with seed 0 whatever ``seed`` says (``eval.features.load_eval_backbone``: one baseline
every result is read against), so there is one reading per variant. A study reads each cell's gain against it."""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List

from .. import config
from ..errors import UserError
from ..files import write_text
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


def random_init(plan: Plan) -> Dict[str, float]:
    """Run the kNN stage on each backbone variant at random init; writes and returns ``{variant: top-1}`` in
    ``<output_dir>/random_init.json`` (and beside the committed results table)."""
    from ..eval.stages import run_knn
    if not plan.cells or not any(s.name == "knn" for s in plan.cells[0].stages):
        raise UserError(f"sweep {plan.name} has no knn stage: the random-init baseline is read with it")
    out: Dict[str, float] = {}
    for cell in plan.cells:
        key = variant(plan, cell)
        if key in out:
            continue
        pre = config.load(config.PretrainConfig, cell.files, cell.overrides)
        model = config.to_dict(pre.model)
        stage = next(s for s in cell.stages if s.name == "knn")
        folder = os.path.join(plan.output_dir, "random_init", key.replace(" ", "_").replace("=", "-"))
        overrides = stage.overrides + [f"model.{k}={json.dumps(v)}" for k, v in model.items()] + [
            f"output_dir={folder}", "overwrite=true"]
        log.info("random init of %s: kNN as the sweep's stage reads it", key)
        out[key] = run_knn(config.load(config.EvalConfig, stage.files, overrides))["top1"]
    paths: List[str] = [os.path.join(plan.output_dir, "random_init.json")]
    if plan.results:
        paths.append(os.path.join(os.path.dirname(plan.results), "random_init.json"))
    for p in paths:
        write_text(p, json.dumps(out, indent=2))
    return out
