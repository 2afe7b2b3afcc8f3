"""Reading a study: a sweep's results table (with its cell folders) or any CSV of (backbone, optimizer, seed, lr, wd,
score) rows, as the rows the statistics read."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


from ..errors import UserError


METRICS = ("linprobe_top1", "knn_top1", "finetune_top1", "val_knn_top1", "val_linprobe_top1")


VAL_OF = {"knn_top1": "val_knn_top1", "linprobe_top1": "val_knn_top1", "finetune_top1": "val_knn_top1"}


def family_name(letter: str) -> str:
    """'a' -> '(a) fixed lr + momentum' (the optimizer registry's family names)."""
    from ..optim.registry import FAMILIES
    if letter in ("a", "b", "c", "d"):
        return f"({letter}) {FAMILIES[letter]}"
    return FAMILIES.get(letter, "unknown family")


@dataclass
class Source:
    path: str
    kind: str                                    # "sweep" or "csv"
    metric: str
    rows: List[Dict]                             # backbone, optimizer, seed, lr, wd, score, family, folder, ...
    metrics: List[str] = field(default_factory=list)
    skipped: int = 0                             # rows without a score (cells not done)


def _num(v) -> Optional[float]:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _family(optim_name: str, given: str = "") -> str:
    """a / b / c / d (BOCB Sec. 3.2) from a table's family column (e.g. 'a_fixed_lr_momentum') or the registry."""
    if given:
        return given[0].lower() if given[0].lower() in "abcd" else given
    from ..optim.registry import get_entry
    try:
        return get_entry(optim_name).family
    except Exception:  # a name the registry does not know (a published table's label, say)
        return "?"


def load_source(path: str, metric: Optional[str] = None) -> Source:
    """A sweep folder (its results.csv, written by `tools/sweep.py run` or `collect`) or a CSV file."""
    if os.path.isdir(path):
        csv_path = os.path.join(path, "results.csv")
        if not os.path.isfile(csv_path):
            raise UserError(f"'{path}' has no results.csv; run `tools/sweep.py collect <sweep file>` first, or pass "
                            f"a CSV of backbone, optimizer, seed, lr, wd, score rows")
    elif os.path.isfile(path):
        csv_path = path
    else:
        raise UserError(f"'{path}' does not exist; pass a sweep folder (with results.csv) or a CSV file")
    try:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            raw = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read '{csv_path}' as CSV ({e})") from None
    if "timm_model" in header and "hash" in header:  # a sweep's table, also as a file (a committed study's)
        return _sweep_rows(path, header, raw, metric)
    return _csv_rows(csv_path, header, raw, metric)


def _sweep_rows(path, header, raw, metric) -> Source:
    table = path if os.path.isfile(path) else os.path.join(path, "results.csv")
    axes = header[header.index("hash") + 1:header.index("timm_model")]
    metrics = [m for m in METRICS if m in header and any(_num(r.get(m)) is not None for r in raw)]
    if metric is None:
        if not metrics:
            raise UserError(f"'{table}' has no kNN, linear-probe or fine-tune results yet; run the sweep "
                            f"(tools/sweep.py run) first")
        metric = metrics[0]
    elif metric not in header:
        raise UserError(f"metric '{metric}' is not a column of {table} (it has: {', '.join(metrics)})")
    extra_axes = [a for a in axes if a not in ("backbone", "optimizer", "seed", "lr", "wd")]
    # other axes (ablations) make backbone variants, named only by the axes that vary for that backbone
    values: Dict[Tuple[str, str], set] = {}
    for r in raw:
        for a in extra_axes:
            values.setdefault((r.get("backbone") or r["timm_model"], a), set()).add(r[a])
    val_col = VAL_OF.get(metric) if VAL_OF.get(metric) in header else None
    rows, skipped = [], 0
    for r in raw:
        score = _num(r.get(metric))
        val = _num(r.get(val_col)) if val_col else None
        if score is None:
            skipped += 1
            if val is None:
                continue
        backbone = r.get("backbone") or r["timm_model"]
        extra = " ".join(f"{a}={r[a]}" for a in extra_axes if len(values[(backbone, a)]) > 1)
        rows.append(dict(backbone=f"{backbone} {extra}".strip(), optimizer=r.get("optimizer") or r["optim_name"],
                         optim_name=r["optim_name"], family=_family(r["optim_name"]), seed=r.get("seed", "0"),
                         lr=r.get("lr") or None, wd=r.get("wd") or None, score=score, val=val, cell=r["cell"],
                         folder=_folder(table, r.get("folder", "")), images_per_s=_num(r.get("images_per_s")),
                         peak_mem_mb=_num(r.get("peak_mem_mb")), final_loss=_num(r.get("final_loss")),
                         pretrain_s=_num(r.get("pretrain_s")), timm_model=r["timm_model"],
                         table_events=_table_events(r), **{m: _num(r.get(m)) for m in metrics}))
    return Source(path, "sweep", metric, rows, metrics, skipped)


def _folder(table: str, folder: str) -> str:
    """A row's run folder: relative ones (cells/<id>) are relative to the sweep folder that holds the table."""
    if not folder or os.path.isabs(folder):
        return folder
    return os.path.join(os.path.dirname(os.path.abspath(table)), folder)


def _table_events(r: Dict) -> Optional[Dict]:
    """The stability counts a sweep's table keeps for each cell (its runner copied them from the run's summary.json),
    for a report made where the run folder is not: a committed study's table on another machine. None when the table
    has no such columns."""
    counts = {k: _num(r.get(k)) for k in ("grad_spikes", "knn_dips", "nonfinite_steps", "rollbacks")}
    if all(v is None for v in counts.values()):
        return None
    counts = {k: None if v is None else int(v) for k, v in counts.items()}
    return dict(source="results.csv", logged_steps=None, loss_spikes=None, dips=counts["knn_dips"], **counts)


def has_folder(r: Dict) -> bool:
    """Whether the row's run folder is on this machine."""
    return bool(r.get("folder")) and os.path.isdir(r["folder"])


def _csv_rows(path, header, raw, metric) -> Source:
    missing = [c for c in ("backbone", "optimizer") if c not in header]
    if missing:
        raise UserError(f"'{path}' needs the columns backbone and optimizer (missing: {', '.join(missing)}); "
                        f"optional: seed, lr, wd, family and a score column")
    candidates = [c for c in (metric, "score", "top1", *METRICS) if c and c in header]
    if metric and metric not in header:
        raise UserError(f"metric '{metric}' is not a column of '{path}' (columns: {', '.join(header)})")
    metric = candidates[0] if candidates else None
    rows, skipped = [], 0
    for r in raw:
        score = _num(r.get(metric)) if metric else None
        if metric and score is None:
            skipped += 1
        rows.append(dict(backbone=r["backbone"], optimizer=r["optimizer"], optim_name=r["optimizer"].lower(),
                         family=_family(r["optimizer"].lower(), r.get("family", "")), seed=r.get("seed", "0"),
                         lr=r.get("lr") or None, wd=r.get("wd") or None, score=score, folder=r.get("folder", "")))
    return Source(path, "csv", metric or "", rows, [metric] if metric else [], skipped)
