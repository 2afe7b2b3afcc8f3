"""From a finished sweep (its results.csv and cell folders) or any CSV of (backbone, optimizer, seed, lr, wd, score)
rows to report.md, a self-contained report.html, PNG figures and bocb.json (every number in them)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Dict

import numpy as np

from ..errors import UserError
from ..files import strict, write_text
from .document import Doc
from .options import Options
from .run_sections import compute_section, cost_section, sharpness_section, stability_section, weights_section
from .runs import measure_runs
from .sources import has_folder, load_source
from .study_sections import hp_section, read_floors, study_section

# the validation reading a test metric's grid point is chosen on (a select sweep's rule)


# --- input -----------------------------------------------------------------------------------------------------------


# --- per-run measurements --------------------------------------------------------------------------------------------


# --- figures ---------------------------------------------------------------------------------------------------------


# --- markdown / html -------------------------------------------------------------------------------------------------


# --- the report ------------------------------------------------------------------------------------------------------

def analyze(source_path: str, out_dir: str, opts: Options = Options(), progress: bool = True) -> Dict[str, str]:
    """Write report.md, report.html, bocb.json and the figures of ``source_path`` into ``out_dir``: the study table
    and its bad pairings, hyper-parameter robustness, then (for rows with run folders) cost, stability, compute,
    weight diagnostics and sharpness, each section from its own function."""
    t0 = time.time()
    src = load_source(source_path, opts.metric)
    if opts.rule not in ("eq1", "iqr"):
        raise UserError(f"--rule must be eq1 or iqr, got '{opts.rule}'")
    if opts.ci not in ("t", "bootstrap"):
        raise UserError(f"--ci must be t or bootstrap, got '{opts.ci}'")
    threshold = opts.threshold if opts.threshold is not None else (3.0 if opts.rule == "eq1" else 1.5)
    os.makedirs(out_dir, exist_ok=True)
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    doc = Doc()
    result: Dict = dict(source=os.path.abspath(source_path), kind=src.kind, metric=src.metric,
                        rows=len(src.rows), rows_without_score=src.skipped)
    doc.h(1, f"BOCB report: {os.path.basename(os.path.normpath(source_path))}")
    doc.p(f"Source `{source_path}` ({src.kind}, {len(src.rows)} scored rows"
          + (f", {src.skipped} without a score left out" if src.skipped else "") + f"). Metric: `{src.metric}`"
          + (f" (also available: {', '.join(m for m in src.metrics if m != src.metric)})"
             if len(src.metrics) > 1 else "") + ".")
    scored = [r for r in src.rows if r.get("score") is not None or r.get("val") is not None]
    if any(r.get("score") is not None for r in scored):
        study_section(doc, result, scored, src.metric, opts, threshold, fig_dir, read_floors(source_path))
    with_hp = [r for r in src.rows if (r.get("lr") or r.get("wd")) and r.get("score") is not None]
    if with_hp:
        hp_section(doc, result, with_hp, fig_dir)
    folders = [r for r in src.rows if has_folder(r) or r.get("table_events")]
    if folders:
        runs = measure_runs(folders, opts, out_dir, progress)
        result.update(stability=runs.events, optimizer_state_mb=runs.opt_mb, images_seen=runs.seen,
                      pretrain_flops=runs.flops)
        if runs.finetune_events:
            result["finetune_stability"] = runs.finetune_events
        cost_section(doc, runs)
        stability_section(doc, runs)
        compute_section(doc, runs, src.metric, fig_dir)
        if runs.weights:
            weights_section(doc, result, runs, opts, fig_dir)
        if runs.sharp:
            sharpness_section(doc, result, runs, opts)
    return _write_report(doc, result, source_path, out_dir, fig_dir, t0)


def _write_report(doc: Doc, result: Dict, source_path: str, out_dir: str, fig_dir: str, t0: float) -> Dict[str, str]:
    seconds = time.time() - t0
    doc.p(f"Written by `tools/analyze.py` in {seconds:.1f} s on {time.strftime('%Y-%m-%d %H:%M')}.")
    result["seconds"] = round(seconds, 2)
    paths = dict(md=os.path.join(out_dir, "report.md"), html=os.path.join(out_dir, "report.html"),
                 json=os.path.join(out_dir, "bocb.json"))
    for key, text in (("md", doc.markdown(out_dir)), ("html", doc.html(f"BOCB report: {source_path}")),
                      ("json", json.dumps(strict(result), indent=2, default=_json_default))):
        write_text(paths[key], text)
    paths["figures"] = fig_dir
    paths["n_figures"] = str(len(doc.figures()))
    return paths


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(type(o))
