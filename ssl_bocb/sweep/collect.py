"""One table per sweep: a row per cell (one per seed) with its axis values, every stage's top-1 / top-5, the
pretraining's final loss, images/s, peak memory and wall time, its instability events (from the run's summary.json:
gradient spikes, kNN dips, non-finite steps, rollbacks) and the fine-tune's (``finetune_*``: from the fine-tune's
summary.json, written by the same training loop, with dips of its validation top-1), its state and folder. Written as results.csv,
results.md, results.json, TensorBoard HParams (``tb_hparams/``, one run per cell) and results.png (a heatmap of the
first metric over the first axis against the others, the mean over seeds)."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
from typing import Dict, List

from ..analysis.plots import read_jsonl, read_summary
from ..files import atomic_write, write_text
from .plan import Plan
from .runner import cell_status, result_file

EVAL_STAGES = ("val_knn", "val_linprobe", "knn", "linprobe", "finetune")
METRICS = [f"{s}_{k}" for s in EVAL_STAGES for k in ("top1", "top5")]
# what the run itself recorded (config.yaml's derived block): the base lr it ran, the machine, the precision
RUN_FACTS = ["base_lr", "machine", "precision"]
STAGE_TIMES = tuple(f"{s}_s" for s in EVAL_STAGES)
PRETRAIN = ["final_loss", "images_per_s", "peak_mem_mb"]
EVENTS = ["grad_spikes", "knn_dips", "nonfinite_steps", "rollbacks"]
FINETUNE_EVENTS = ["finetune_grad_spikes", "finetune_top1_dips", "finetune_nonfinite_steps", "finetune_rollbacks"]


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _committed_row(cell) -> Dict:
    """A cell done on another machine: its row of the committed results table, numbers read back as numbers."""
    row = {}
    for k, v in cell.committed.items():
        if k in ("cell", "hash", "state", "error", "folder", "stage_hashes", "timm_model", "optim_name") or \
                k in cell.labels or v == "":
            row[k] = v if v != "" else None
            continue
        try:
            row[k] = int(v) if v.lstrip("-").isdigit() else float(v)
        except ValueError:
            row[k] = v
    return row


def cell_row(plan: Plan, cell) -> Dict:
    st = cell_status(cell)
    if st.get("committed"):
        return _committed_row(cell)
    rec = st["record"]
    row = {"cell": cell.name, "hash": cell.hash, "stage_hashes": cell.stage_hashes}
    row.update({k: v for k, v in cell.labels.items()})
    row.update(timm_model=cell.values["backbone"], optim_name=cell.values["optimizer"], state=st["state"])
    epochs = read_jsonl(os.path.join(cell.folder, "log.jsonl")) if os.path.isdir(cell.folder) else []
    if epochs:
        rates = [r["images_per_s"] for r in epochs]
        row.update(final_loss=epochs[-1]["loss"], epochs_done=epochs[-1]["epoch"],
                   images_per_s=statistics.median(rates[1:] if len(rates) > 1 else rates),
                   peak_mem_mb=max(r.get("peak_mem_mb", 0.0) for r in epochs))
    ev = read_summary(cell.folder).get("events", {})
    row.update({k: ev[k] for k in EVENTS if k in ev})
    ft = read_summary(os.path.join(cell.folder, "finetune")).get("events", {})
    row.update({k: ft[k[len("finetune_"):]] for k in FINETUNE_EVENTS if k[len("finetune_"):] in ft})
    row.update(run_facts(cell.folder))
    for stage in EVAL_STAGES:
        path = result_file(cell, stage)
        if os.path.isfile(path) and stage not in st["left"]:
            with open(path) as f:
                m = json.load(f)
            row[f"{stage}_top1"], row[f"{stage}_top5"] = m["top1"], m["top5"]
    stages = rec.get("stages", {})
    for stage, srec in stages.items():
        row[f"{stage}_s"] = srec.get("seconds")
    if row.get("pretrain_s") is None and epochs:  # run by a runner killed before it could record the time
        row["pretrain_s"] = round(sum(r.get("seconds", 0.0) for r in epochs), 2)
    timed = [row.get(f"{s}_s") for s in stages]
    row["wall_s"] = round(sum(t for t in timed if t), 1) if stages else None
    row["error"] = st["error"] if st["state"] in ("failed", "interrupted") else ""
    row["folder"] = os.path.relpath(cell.folder, plan.output_dir)  # cells/<id>: no machine's absolute path
    return row


def run_facts(folder: str) -> Dict:
    """base_lr, machine and precision from a run folder's config.yaml (its derived block); {} before it exists."""
    import yaml
    try:
        with open(os.path.join(folder, "config.yaml")) as f:
            derived = (yaml.safe_load(f) or {}).get("derived") or {}
    except (OSError, yaml.YAMLError):
        return {}
    out = {"base_lr": (derived.get("optimizer") or {}).get("base_lr"), "machine": derived.get("machine"),
           "precision": {"no": "fp32"}.get(derived.get("mixed_precision"), derived.get("mixed_precision"))}
    return {k: v for k, v in out.items() if v is not None}


def columns(plan: Plan, rows: List[Dict]) -> List[str]:
    label_keys = list(dict.fromkeys(k for c in plan.cells for k in c.labels))
    metric_cols = [m for m in METRICS if any(m in r for r in rows)]
    timing = [k for k in ("pretrain_s",) + STAGE_TIMES if any(k in r for r in rows)]
    events = [k for k in EVENTS + FINETUNE_EVENTS if any(k in r for r in rows)]
    facts = [k for k in RUN_FACTS if any(k in r for r in rows)]
    return (["cell", "hash"] + label_keys + ["timm_model", "optim_name", "state"] + facts + metric_cols + PRETRAIN +
            events + ["epochs_done"] + timing + ["wall_s", "error", "folder", "stage_hashes"])


def markdown(plan: Plan, rows: List[Dict], cols: List[str]) -> str:
    shown = [c for c in cols if c not in ("cell", "hash", "folder", "timm_model", "optim_name", "epochs_done", "machine",
                                           "pretrain_s", "stage_hashes") and c not in STAGE_TIMES]
    head = {"final_loss": "final loss", "images_per_s": "img/s", "peak_mem_mb": "peak MB", "wall_s": "wall s",
            "grad_spikes": "grad spikes", "knn_dips": "kNN dips", "nonfinite_steps": "NaN steps",
            "rollbacks": "rollbacks", "finetune_grad_spikes": "FT grad spikes", "finetune_top1_dips": "FT top-1 dips",
            "finetune_nonfinite_steps": "FT NaN steps", "finetune_rollbacks": "FT rollbacks"}
    lines = ["| " + " | ".join(head.get(c, c.replace("_", " ")) for c in shown) + " |",
             "| " + " | ".join("---" for _ in shown) + " |"]
    for r in rows:
        cells = []
        for c in shown:
            v = r.get(c)
            digits = 4 if c == "final_loss" else (0 if c in ("peak_mem_mb", "wall_s") else (1 if c == "images_per_s"
                                                                                             else 2))
            text = format(v, "g") if c == "base_lr" and isinstance(v, float) else _fmt(v, digits)
            cells.append(text.replace("|", "/")[:160])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def hparams(plan: Plan, rows: List[Dict], out: str) -> str:
    """TensorBoard HParams: one run per cell under ``tb_hparams/`` (rewritten on every collect)."""
    from torch.utils.tensorboard import SummaryWriter
    folder = os.path.join(out, "tb_hparams")
    shutil.rmtree(folder, ignore_errors=True)
    for r, cell in zip(rows, plan.cells):
        hp = {k: str(v) for k, v in cell.labels.items()}
        hp.update(timm_model=r["timm_model"], optim_name=r["optim_name"], state=r["state"])
        metrics = {f"hparam/{k}": float(r[k]) for k in METRICS + PRETRAIN + EVENTS + FINETUNE_EVENTS + ["wall_s"]
                   if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])}
        w = SummaryWriter(os.path.join(folder, cell.id))
        w.add_hparams(hp, metrics, run_name=".")
        w.close()
    return folder


def heatmap(plan: Plan, rows: List[Dict], out: str):
    """results.png: the first metric present, rows = the first axis's values, columns = the other axes' values,
    the mean over seeds and grid points. None when there is no metric yet."""
    metric = next((m for m in ("knn_top1", "val_knn_top1", "linprobe_top1", "finetune_top1") if any(m in r for r in rows)), None)
    if metric is None or not plan.axes:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    first, rest = plan.axes[0], plan.axes[1:]
    ys = list(dict.fromkeys(r[first] for r in rows))
    xs = list(dict.fromkeys(" / ".join(str(r[a]) for a in rest) or "all" for r in rows))
    vals: Dict = {}
    for r in rows:
        if metric in r:
            vals.setdefault((r[first], " / ".join(str(r[a]) for a in rest) or "all"), []).append(r[metric])
    grid = [[statistics.mean(vals[(y, x)]) if (y, x) in vals else float("nan") for x in xs] for y in ys]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(xs), 1.0 + 0.6 * len(ys)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(ys)), ys, fontsize=8)
    ax.set_xlabel(" / ".join(rest) or "")
    ax.set_ylabel(first)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label=metric.replace("_", " ") + " (%)")
    ax.set_title(f"sweep {plan.name}: {metric.replace('_', ' ')}, mean over seeds")
    fig.tight_layout()
    path = os.path.join(out, "results.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_csv(path: str, rows: List[Dict], cols: List[str]) -> None:
    with atomic_write(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def write_committed(plan: Plan, rows: List[Dict], cols: List[str]) -> str:
    """The sweep's committed results table: this plan's done cells, and the rows of cells it does not plan now
    (other seeds, say) kept as they were."""
    from .plan import read_committed
    ids = {f"{c.name}-{c.hash}" for c in plan.cells}
    kept = [r for k, r in read_committed(plan.results).items() if k not in ids]
    done = [r for r in rows if r.get("state") == "done"]
    os.makedirs(os.path.dirname(plan.results), exist_ok=True)
    write_csv(plan.results, done + kept, cols)
    return plan.results


def collect(plan: Plan) -> Dict[str, str]:
    out = plan.output_dir
    os.makedirs(out, exist_ok=True)
    rows = [cell_row(plan, c) for c in plan.cells]
    cols = columns(plan, rows)
    paths = {}
    paths["csv"] = os.path.join(out, "results.csv")
    write_csv(paths["csv"], rows, cols)
    if plan.results:
        paths["committed"] = write_committed(plan, rows, cols)
    paths["md"] = os.path.join(out, "results.md")
    write_text(paths["md"], markdown(plan, rows, cols))
    paths["json"] = os.path.join(out, "results.json")
    write_text(paths["json"], json.dumps(rows, indent=2))
    paths["tensorboard"] = hparams(plan, rows, out)
    png = heatmap(plan, rows, out)
    if png:
        paths["png"] = png
    return paths
