"""Choosing each pair's setting on the validation split, and growing a grid until its choice is bracketed.

A sweep file with a ``select`` block runs its grid in two phases per pair (every combination of the axes)::

    grid: {sgd: {base_lr: [0.03, 0.1, 0.3, 1.0]}, "vit-small:adamw": {base_lr: [...]}}
    seeds: [0, 1, 2]
    select:
      metric: val_knn_top1     # read on the validation split (stage val_knn)
      stages: [knn, linprobe]  # the test-split stages: run only at the chosen point, for every seed
      extend: 3                # a best point at an end of the grid adds up to 3 points past that end

1. every grid point runs at the first seed with the other stages (the validation ones);
2. once all are read, the best point is chosen (:func:`choose`). At an end of the grid it is not bracketed: the next
   point past that end is added (the grid's own ratio) until the best lies inside or ``extend`` points were added;
3. a bracketed choice gets the ``stages`` and the other seeds. An unbracketed one gets nothing more, and the
   report says so.

So the test split is read once per pair, at the setting chosen without it. The same rule, :func:`choose`, is what
the report applies to the committed table, so that a table alone gives the same choices.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from ..errors import UserError

from ..analysis.choice import BRACKETED, HIGH_END, LOW_END, choose  # noqa: F401  (the sweep's rule, also the report's)

PENDING = "pending"


@dataclass
class Selection:
    # The column the choice maximises: <stage>_top1 of a validation stage (val_knn, val_linprobe).
    metric: str = "val_knn_top1"
    # Stages run only at the chosen point, for every seed (the test-split readings).
    stages: List[str] = field(default_factory=list)
    # At most this many grid points added past an end of a grid whose best point lies at that end.
    extend: int = 2

    @property
    def stage(self) -> str:
        return self.metric.rsplit("_", 1)[0]


def parse(spec, stages: Sequence[str], grid: Dict) -> Optional[Selection]:
    """The sweep file's ``select`` block (None when absent), checked against its stages."""
    if not spec:
        return None
    if not isinstance(spec, dict) or set(spec) - {"metric", "stages", "extend"}:
        raise UserError(f"select must map metric / stages / extend, got {spec!r}")
    sel = Selection(str(spec.get("metric", "val_knn_top1")), list(spec.get("stages") or []),
                    int(spec.get("extend", 2)))
    if not sel.metric.endswith("_top1") or sel.stage not in stages:
        raise UserError(f"select.metric={sel.metric} must be <stage>_top1 of a stage of the sweep ({', '.join(stages)})")
    if not sel.stage.startswith("val_"):
        raise UserError(f"select.metric={sel.metric} reads the test split; choose on a validation stage (val_knn, "
                        f"val_linprobe) so that the test split is read only at the chosen point")
    missing = [s for s in sel.stages if s not in stages]
    if missing or sel.stage in sel.stages:
        raise UserError(f"select.stages must be stages of the sweep other than {sel.stage}, got {sel.stages}")
    if sel.extend < 0:
        raise UserError(f"select.extend must be >= 0, got {sel.extend}")
    if not grid:
        raise UserError("select needs a grid to choose from")
    return sel


def next_point(xs: Sequence[float], where: str) -> float:
    """The value past the ``where`` end of the sorted grid ``xs``, at the grid's ratio there (3 significant digits)."""
    xs = sorted(xs)
    if where == HIGH_END:
        value = xs[-1] * (xs[-1] / xs[-2])
    else:
        value = xs[0] / (xs[1] / xs[0])
    return float(f"{value:.3g}")


def cell_score(cell, metric: str) -> Optional[float]:
    """The cell's ``metric`` from its committed row, else from its folder (when that stage is done at its hash)."""
    stage = metric.rsplit("_", 1)[0]
    row = cell.committed_any or {}
    spec = next((s for s in cell.stages if s.name == stage), None)
    same = spec is not None and f"{stage}:{spec.hash}" in str(row.get("stage_hashes", "")).split()
    if same and row.get(metric) not in (None, ""):
        try:
            return float(row[metric])
        except ValueError:
            pass
    from .runner import read_record, result_file, stage_done
    path = result_file(cell, stage)
    if not os.path.isfile(path) or not stage_done(cell, stage, read_record(cell)):
        return None
    try:
        with open(path) as f:
            value = json.load(f)["top1"]
    except (OSError, ValueError, KeyError):
        return None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
