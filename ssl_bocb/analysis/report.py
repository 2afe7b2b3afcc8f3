"""From a finished sweep (its results.csv and cell folders) or any CSV of (backbone, optimizer, seed, lr, wd, score)
rows to report.md, a self-contained report.html, PNG figures and bocb.json (every number in them)."""
from __future__ import annotations

import base64
import csv
import html
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import UserError
from ..files import strict, write_text
from . import bocb
from .plots import _pyplot, read_jsonl

METRICS = ("linprobe_top1", "knn_top1", "finetune_top1", "val_knn_top1", "val_linprobe_top1")
# the validation reading a test metric's grid point is chosen on (a select sweep's rule)
VAL_OF = {"knn_top1": "val_knn_top1", "linprobe_top1": "val_knn_top1", "finetune_top1": "val_knn_top1"}
LAYER_METRICS = ("alpha", "matrix_entropy", "value_entropy", "l2_norm", "pca_energy")


def family_name(letter: str) -> str:
    """'a' -> '(a) fixed lr + momentum' (the optimizer registry's family names)."""
    from ..optim.registry import FAMILIES
    if letter in ("a", "b", "c", "d"):
        return f"({letter}) {FAMILIES[letter]}"
    return FAMILIES.get(letter, "unknown family")


# --- input -----------------------------------------------------------------------------------------------------------

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


def _has_folder(r: Dict) -> bool:
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


# --- per-run measurements --------------------------------------------------------------------------------------------

def _cache_key(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}-{int(st.st_mtime_ns)}"


def weight_rows(folder: str, cache_dir: str, pca_frac: float, bins: int) -> Optional[List[Dict]]:
    """Per-layer diagnostics of a run's exported backbone (cached by file size and time under ``cache_dir``)."""
    weights = os.path.join(folder, "backbone.safetensors")
    if not os.path.isfile(weights):
        return None
    key = f"{_cache_key(weights)}-{pca_frac}-{bins}"
    cache = os.path.join(cache_dir, os.path.basename(os.path.normpath(folder)) + ".weights.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved["layers"]
    from ..models.export import load_backbone
    from .spectral import model_metrics
    layers = model_metrics(load_backbone(folder), bins=bins, pca_frac=pca_frac)
    write_text(cache, json.dumps(dict(key=key, layers=layers)))
    return layers


def optimizer_state_mb(folder: str) -> Optional[float]:
    """Size of the optimizer state (its tensors) in the run's newest checkpoint, MB."""
    from ..engine.checkpoint import latest_checkpoint
    ckpt = latest_checkpoint(folder) if folder and os.path.isdir(folder) else None
    path = os.path.join(ckpt, "optimizer.bin") if ckpt else ""
    if not os.path.isfile(path):
        return None
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    total = 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(state.get("state", {}))
    return total / 2 ** 20


def run_config(folder: str) -> Dict:
    """A run's saved config.yaml as a plain dict ({} when there is none)."""
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        return {}
    import yaml
    with open(path) as f:
        return yaml.safe_load(f) or {}


def images_seen(folder: str, c: Dict) -> Optional[int]:
    epochs = read_jsonl(os.path.join(folder, "log.jsonl"))
    if not epochs or not c:
        return None
    d = c.get("derived", {})
    batch = d.get("per_device_batch", 0) * d.get("world_size", 1)
    return int(epochs[-1]["step"]) * int(batch) if batch else None


def pretrain_flops(folder: str, c: Dict, images: Optional[int]) -> Optional[float]:
    """Approximate pretraining compute: forward FLOPs of the backbone on one image (torch's FLOP counter, at the
    run's image size) x 8 per image (two views, each a forward and a backward of about twice its cost, plus the
    momentum encoder's forward) x images seen. Heads are left out; with no momentum encoder it is x 6."""
    if not images or not c or not os.path.isfile(os.path.join(folder, "backbone.safetensors")):
        return None
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..models.export import load_backbone
    size = int(c.get("data", {}).get("image_size", 224))
    per_image = 8 if float(c.get("moco", {}).get("momentum", 0.99)) > 0 else 6
    model = load_backbone(folder).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops()) * per_image * images


# --- figures ---------------------------------------------------------------------------------------------------------

def fig_heatmap(study: bocb.Study, metric: str, path: str) -> str:
    plt = _pyplot()
    m = study.matrix("mean")
    fig, ax = plt.subplots(figsize=(1.6 + 1.25 * len(study.optimizers), 1.2 + 0.55 * len(study.backbones)))
    im = ax.imshow(m, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(study.optimizers)), study.optimizers, rotation=30, ha="right")
    ax.set_yticks(range(len(study.backbones)), study.backbones, fontsize=8)
    for (b, o), c in study.cells.items():
        i, j = study.backbones.index(b), study.optimizers.index(o)
        half = (c.ci_high - c.ci_low) / 2 if math.isfinite(c.ci_low) else None
        text = f"{c.mean:.1f}" + (f"\n±{half:.1f}" if half is not None else "")
        ax.text(j, i, text, ha="center", va="center", color="w", fontsize=7)
        if c.flagged:
            # inset, so that the boxes of neighbouring cells do not share (and blur) an edge
            ax.add_patch(plt.Rectangle((j - 0.45, i - 0.45), 0.9, 0.9, fill=False, ec="red", lw=2.5,
                                       ls="--" if c.uncertain else "-"))
    fig.colorbar(im, ax=ax, label=f"{metric} (%)")
    ax.set_title(f"{metric}: mean over seeds (red box: bad pairing, dashed: uncertain; {study.rule.rule})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_spread(study: bocb.Study, metric: str, path: str) -> str:
    """Violin + points of each backbone's results over optimizers, and of each optimizer's over backbones."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(5 + 0.9 * (len(study.backbones) + len(study.optimizers)), 4))
    for ax, names, idx, title in ((axes[0], study.backbones, 0, "per backbone (over optimizers)"),
                                  (axes[1], study.optimizers, 1, "per optimizer (over backbones)")):
        data = [[c.mean for k, c in study.cells.items() if k[idx] == n] for n in names]
        ok = [i for i, d in enumerate(data) if len(d) > 1]
        if ok:
            ax.violinplot([data[i] for i in ok], positions=[i + 1 for i in ok], showmedians=True)
        ax.boxplot([np.asarray(d, dtype=float) for d in data], positions=range(1, len(names) + 1), widths=0.15)
        for i, d in enumerate(data):
            ax.scatter([i + 1] * len(d), d, s=12, color="k", zorder=3)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=8)
        ax.set(title=title, ylabel=f"{metric} (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_robustness(robust: Dict[str, bocb.Robustness], path: str) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, (reading, r) in zip(axes, robust.items()):
        by = "backbone" if reading == "backbone" else "optimizer"
        groups = r.per_group(by)
        ax.boxplot([np.asarray(v, dtype=float) for v in groups.values()], positions=range(1, len(groups) + 1))
        ax.set_xticks(range(1, len(groups) + 1), list(groups), rotation=60, ha="right", fontsize=7)
        ax.set(title=f"mode per {reading}: one-hot distance to the mode", ylabel="distance (0, 2 or 4)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_ridges(backbone: str, per_opt: "OrderedDict[str, List[Dict]]", path: str) -> str:
    """Layer-wise ridge plot: a panel per metric, in each one ridge (the metric along the layers) per optimizer,
    stacked; each ridge is the mean over the seeds run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(LAYER_METRICS), figsize=(3.3 * len(LAYER_METRICS), 1.2 + 0.7 * len(per_opt)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes, LAYER_METRICS):
        curves = OrderedDict((o, np.array([np.nan if r[key] is None else r[key] for r in layers], dtype=float))
                             for o, layers in per_opt.items())
        finite = np.concatenate([c[np.isfinite(c)] for c in curves.values()] or [np.array([0.0])])
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        span = (hi - lo) or 1.0
        for k, (o, c) in enumerate(curves.items()):
            y = (c - lo) / span * 0.9 + k
            x = np.arange(len(c))
            ax.fill_between(x, k, np.where(np.isfinite(y), y, k), alpha=0.5, color=colors[k % len(colors)], step="mid")
            ax.plot(x, y, color=colors[k % len(colors)], lw=1, drawstyle="steps-mid")
        ax.set_yticks(range(len(curves)), list(curves), fontsize=8)
        ax.set(title=f"{key} ({lo:.3g} .. {hi:.3g})", xlabel="layer")
    fig.suptitle(f"{backbone}: layer-wise weight diagnostics, one ridge per optimizer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fig_histograms(backbone: str, per_opt: "OrderedDict[str, List[Dict]]", path: str) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(LAYER_METRICS), figsize=(3.3 * len(LAYER_METRICS), 3))
    for ax, key in zip(axes, LAYER_METRICS):
        allv = [np.array([r[key] for r in layers if r[key] is not None and math.isfinite(r[key])])
                for layers in per_opt.values()]
        finite = np.concatenate(allv) if allv else np.array([])
        if finite.size == 0:
            continue
        bins = np.histogram_bin_edges(finite, bins=15)
        for o, v in zip(per_opt, allv):
            ax.hist(v, bins=bins, histtype="step", lw=1.5, label=o)
        ax.set(title=key, ylabel="layers")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{backbone}: distribution over layers, per optimizer", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fig_compute(points: List[Tuple[str, str, float, float]], metric: str, path: str, xlabel: str) -> str:
    """metric vs compute on log-log axes, one series per backbone."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for b in OrderedDict.fromkeys(p[0] for p in points):
        xs = [p[2] for p in points if p[0] == b]
        ys = [p[3] for p in points if p[0] == b]
        ax.scatter(xs, ys, label=b, s=18)
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=f"{metric} (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- markdown / html -------------------------------------------------------------------------------------------------

class Doc:
    """A report as blocks, rendered both as Markdown (figures linked) and as HTML (figures embedded)."""

    def __init__(self):
        self.blocks: List[Tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: List[str], rows: List[List]):
        self.blocks.append(("table", header, [[_cell(v) for v in r] for r in rows]))

    def img(self, path: str, caption: str):
        self.blocks.append(("img", path, caption))

    def figures(self) -> List[str]:
        return [b[1] for b in self.blocks if b[0] == "img"]

    def markdown(self, base: str) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append("| " + " | ".join(b[1]) + " |\n| " + " | ".join("---" for _ in b[1]) + " |\n" +
                           "\n".join("| " + " | ".join(r) + " |" for r in b[2]))
            else:
                out.append(f"![{b[2]}]({os.path.relpath(b[1], base)})\n\n*{b[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0;font-size:13px}"
                 "td,th{border:1px solid #bbb;padding:3px 7px;text-align:right}"
                 "th{background:#eee}td:first-child{text-align:left}img{max-width:100%}"
                 "figcaption{font-style:italic;color:#444}</style></head><body>"]
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{_inline(c)}</th>" for c in b[1])
                body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            else:
                with open(b[1], "rb") as f:
                    data = base64.b64encode(f.read()).decode()
                parts.append(f"<figure><img alt='{html.escape(b[2], quote=True)}' "
                             f"data-file='{html.escape(os.path.basename(b[1]), quote=True)}' "
                             f"src='data:image/png;base64,{data}'><figcaption>{html.escape(b[2])}</figcaption>"
                             f"</figure>")
        parts.append("</body></html>\n")
        return "\n".join(parts)


def _inline(text: str) -> str:
    """HTML of a Markdown line with **bold** and `code` only."""
    import re
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 0.1 and v != 0 else f"{v:.2f}"
    return str(v).replace("|", "/")


# --- the report ------------------------------------------------------------------------------------------------------

@dataclass
class Options:
    metric: Optional[str] = None
    rule: str = "eq1"
    threshold: Optional[float] = None       # gamma (eq1) or t (iqr); None = 3 (eq1) / 1.5 (iqr)
    ci: str = "t"
    level: float = 0.95
    weights: bool = True
    sharpness: bool = False
    sharpness_batch: int = 64
    sharpness_iters: int = 20
    pca_frac: float = 0.1
    bins: int = 100


def _mean_ci(c: bocb.CellStat) -> str:
    s = f"{c.mean:.2f}"
    if math.isfinite(c.ci_low):
        s += f" ± {(c.ci_high - c.ci_low) / 2:.2f}"
    s += f" (n={c.n})"
    if c.flagged:
        s += " **bad?** (uncertain)" if c.uncertain else " **bad**"
    return s


def _gap(c: bocb.CellStat) -> str:
    """The row's best minus this cell, with its Welch interval."""
    if c.gap == 0 and not math.isfinite(c.gap_low):
        return "best"
    if not math.isfinite(c.gap_low):
        return f"{c.gap:.2f} (one seed)"
    return f"{c.gap:.2f} [{c.gap_low:.2f}, {c.gap_high:.2f}]" + ("" if c.gap_low > 0 else " ~0")


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
        _study_section(doc, result, scored, src.metric, opts, threshold, fig_dir, _floors(source_path))
    with_hp = [r for r in src.rows if (r.get("lr") or r.get("wd")) and r.get("score") is not None]
    if with_hp:
        _hp_section(doc, result, with_hp, fig_dir)
    folders = [r for r in src.rows if _has_folder(r) or r.get("table_events")]
    if folders:
        runs = _measure_runs(folders, opts, out_dir, progress)
        result.update(stability=runs.events, optimizer_state_mb=runs.opt_mb, images_seen=runs.seen,
                      pretrain_flops=runs.flops)
        if runs.finetune_events:
            result["finetune_stability"] = runs.finetune_events
        _cost_section(doc, runs)
        _stability_section(doc, runs)
        _compute_section(doc, runs, src.metric, fig_dir)
        if runs.weights:
            _weights_section(doc, result, runs, opts, fig_dir)
        if runs.sharp:
            _sharpness_section(doc, result, runs, opts)
    return _write_report(doc, result, source_path, out_dir, fig_dir, t0)


def _floors(source_path: str) -> Optional[Dict]:
    """The floors.json beside a results table (tools/floors.py), or None."""
    from .floors import read
    folder = source_path if os.path.isdir(source_path) else os.path.dirname(os.path.abspath(source_path))
    return read(os.path.join(folder, "floors.json"))


def _floor_split(metric: str) -> str:
    return "val" if metric.startswith("val_") else "test"


def _floors_table(doc: Doc, result: Dict, study: bocb.Study, metric: str, floors: Dict) -> None:
    """Every cell against the pixel floor and its backbone's random-init floor, on the metric's split."""
    block = floors.get("splits", {}).get(_floor_split(metric))
    if block is None or not metric.endswith("knn_top1"):
        return
    rand = block["random_init"]
    doc.h(2, "Against the floors")
    doc.p(f"kNN of raw normalised pixels: **{block['pixels']:.2f}**; each backbone at random init (mean over "
          f"{len(floors.get('init_seeds', []))} init seeds), on the same evaluation ({block['split']} split, bank "
          f"{block['bank_per_class'] or 'all'} per class, {block['num_queries']} queries; `floors.json`). Each cell: "
          f"its mean minus the floor, in points. A cell at or below the pixel floor has learned nothing the pixels "
          f"did not hold.")
    rows, out = [], []
    for b in study.backbones:
        key = next((k for k in rand if b == k or b.startswith(k + " ") or k.startswith(b + " ")), None)
        line = [b, rand.get(key) if key else None]
        for o in study.optimizers:
            c = study.cells.get((b, o))
            if c is None:
                line.append("-")
                continue
            vs_pix = c.mean - block["pixels"]
            vs_rand = c.mean - rand[key] if key else math.nan
            line.append(f"{c.mean:.2f} ({vs_pix:+.2f} / {vs_rand:+.2f})" + (" **below pixels**" if vs_pix <= 0
                                                                              else ""))
            out.append(dict(backbone=b, optimizer=o, mean=c.mean, minus_pixels=vs_pix, minus_random=vs_rand))
        rows.append(line)
    doc.table(["backbone", "random init"] + [f"{o} (− pixels / − random)" for o in study.optimizers], rows)
    result["floors"] = dict(pixels=block["pixels"], random_init=rand, split=_floor_split(metric), cells=out)


def _selection_notes(doc: Doc, study: bocb.Study) -> None:
    """Which grid point each pair was read at, chosen on validation, and a warning for every unbracketed grid."""
    chosen = [c for c in study.cells.values() if c.chosen_on == "val"]
    if not chosen and not study.unmeasured:
        return
    doc.h(2, "Chosen settings (on the validation split)")
    doc.p("Each pair is read at the grid point with its best validation score (at the grid's first seed), the "
          "point the sweep chose before reading the test split; the flags compare each pair at its own chosen point "
          "with the row's best at its own. A choice at an end of its grid is not bracketed: the true optimum may lie "
          "beyond, and that pair's result is a lower bound.")
    rows = []
    for c in chosen:
        grid = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(c.grid.items(), key=lambda kv: float(kv[0])))
        rows.append([c.backbone, c.optimizer, c.lr, c.bracket or "-", grid])
    for u in study.unmeasured:
        grid = ", ".join(f"{k}: {v:.2f}" for k, v in sorted(u["grid"].items(), key=lambda kv: float(kv[0])))
        rows.append([u["backbone"], u["optimizer"], u["lr"], f"{u['bracket']} (not seeded, no test reading)", grid])
    doc.table(["backbone", "optimizer", "chosen lr", "where", "validation score per lr"], rows)
    loose = [c for c in chosen if c.bracket not in ("bracketed", "")] + study.unmeasured
    for c in loose:
        b, o, where = (c.backbone, c.optimizer, c.bracket) if isinstance(c, bocb.CellStat) else (
            c["backbone"], c["optimizer"], c["bracket"])
        doc.p(f"**Warning:** {b} x {o}: the best validation point is at the {where} of its grid (not bracketed); "
              f"extend the grid past it.")


def _interaction_section(doc: Doc, study: bocb.Study) -> None:
    it = study.interaction
    doc.h(2, "Coupling: the backbone x optimizer interaction")
    if "reason" in it:
        doc.p(f"Not computed: {it['reason']}.")
        return
    doc.p(f"Coupling means that an optimizer's advantage depends on the backbone. Two-way test of no interaction on "
          f"the cell means with the pooled seed noise (s = {it['noise_sd']:.3f} points, {it['df2']} degrees of "
          f"freedom): F({it['df1']}, {it['df2']}) = {it['f']:.2f}, p = {it['p']:.3g}"
          + ("" if it["balanced"] else " (unequal seeds: harmonic-mean approximation)") + ". Interaction effect of "
          f"each cell (its mean less its backbone's and its optimizer's mean effects), points, with its "
          f"{it['level']:.0%} t interval; an interval that excludes 0 is a coupling.")
    cells = {(e["backbone"], e["optimizer"]): e for e in it["effects"]}
    doc.table(["backbone"] + study.optimizers,
              [[b] + [f"{cells[(b, o)]['effect']:+.2f} [{cells[(b, o)]['low']:+.2f}, {cells[(b, o)]['high']:+.2f}]"
                      + ("" if cells[(b, o)]["low"] <= 0 <= cells[(b, o)]["high"] else " **coupled**")
                      for o in study.optimizers] for b in study.backbones])


def _study_section(doc: Doc, result: Dict, scored: List[Dict], metric: str, opts: Options, threshold: float,
                   fig_dir: str, floors: Optional[Dict] = None) -> None:
    study = bocb.analyze_study(scored, opts.rule, threshold, opts.ci, opts.level)
    result["study"] = study.to_json()
    scored = [r for r in scored if r.get("score") is not None]
    seeds = sorted({str(r["seed"]) for r in scored})
    ci_text = ("Student t interval, mean ± t(0.975, n-1) · s / √n" if opts.ci == "t"
               else "percentile bootstrap of the mean (10,000 resamples, seed 0)")
    doc.h(2, "Study table")
    doc.p(f"Mean over seeds ({', '.join(seeds)}) ± half-width of the {opts.level:.0%} confidence interval "
          f"({ci_text}; none with one seed). Bad-pairing rule that ran: {study.rule.describe()}. "
          f"A flagged cell is **bad** (certain) when it is also below the row's best by more than seed noise "
          f"explains: the Tukey-Kramer range test at {1 - opts.level:.0%}, with the pooled seed noise "
          f"of the whole study (s = {study.noise[0]:.3f} points on {study.noise[1]} degrees of freedom), which keeps "
          f"the chance of a certain flag in a row of equal optimizers under {1 - opts.level:.0%}, and whose own "
          f"Welch interval to the best (next table) excludes 0; else **bad?** "
          f"(uncertain): seed noise alone could have put it there." + (
              " Where a pair was run on an lr / wd grid, its result is its grid point chosen on the validation split "
              "(below)." if any(r.get("val") is not None for r in scored) else
              " Where a pair was run on an lr / wd grid, its result is its best grid point."
              if any(r.get("lr") or r.get("wd") for r in scored) else ""))
    doc.table(["backbone"] + study.optimizers,
              [[b] + [_mean_ci(study.cells[(b, o)]) if (b, o) in study.cells else "-" for o in study.optimizers]
               for b in study.backbones])
    doc.p(f"Difference to the row's best (its best mean minus this mean, points) with its {opts.level:.0%} Welch t "
          f"interval over seeds (unequal variances, Welch-Satterthwaite degrees of freedom); '~0' marks an interval "
          f"that reaches 0, where the gap is within seed noise. Threshold: the score under which the row flags.")
    doc.table(["backbone", "threshold", "gap a certain flag needs"] + study.optimizers,
              [[b, next(c.cut for (bb, _), c in study.cells.items() if bb == b),
                max((c.critical_gap for (bb, _), c in study.cells.items() if bb == b and c.gap > 0), default=None)]
               + [_gap(study.cells[(b, o)]) if (b, o) in study.cells else "-" for o in study.optimizers]
               for b in study.backbones])
    doc.img(fig_heatmap(study, metric, os.path.join(fig_dir, "heatmap.png")),
            f"{metric} per backbone and optimizer (mean ± CI half-width; red boxes: bad pairings, dashed: uncertain)")
    _selection_notes(doc, study)
    if floors:
        _floors_table(doc, result, study, metric, floors)
    _interaction_section(doc, study)
    doc.h(2, "Per backbone (over its optimizers, worst result removed)")
    doc.table(["backbone", "optimizers", "best", "worst (optimizer)", "mean", "std", "range", "bad pairings"],
              [[s.name, s.n, s.best, f"{s.worst:.2f} ({s.worst_of})", s.mean, s.std, s.range, s.flagged]
               for s in study.per_backbone])
    doc.h(2, "Per optimizer: generality across backbones (worst result removed)")
    fam = {r["optimizer"]: r["family"] for r in scored}
    doc.table(["optimizer", "family", "backbones", "best", "worst (backbone)", "mean", "std", "range",
               "bad pairings"],
              [[s.name, family_name(fam.get(s.name, "?")), s.n, s.best,
                f"{s.worst:.2f} ({s.worst_of})", s.mean, s.std, s.range, s.flagged] for s in study.per_optimizer])
    families = list(OrderedDict.fromkeys(sorted(fam.get(o, "?") for o in study.optimizers)))
    fam_rows = []
    for b in study.backbones:
        row = [b]
        for f in families:
            vals = [c.mean for (bb, o), c in study.cells.items() if bb == b and fam.get(o, "?") == f]
            row.append(float(np.mean(vals)) if vals else None)
        fam_rows.append(row)
    doc.h(2, "By optimizer family (BOCB Sec. 3.2)")
    doc.table(["backbone"] + [family_name(f) for f in families], fam_rows)
    result["families"] = {o: fam.get(o, "?") for o in study.optimizers}
    doc.img(fig_spread(study, metric, os.path.join(fig_dir, "spread.png")),
            "spread of the results: per backbone over optimizers, per optimizer over backbones")


def _hp_section(doc: Doc, result: Dict, with_hp: List[Dict], fig_dir: str) -> None:
    best = bocb.best_settings(with_hp)
    robust = OrderedDict((reading, bocb.hp_robustness(best, reading)) for reading in ("backbone", "optimizer"))
    result["hp_robustness"] = {k: dict(modes=v.modes, distances=[dict(backbone=b, optimizer=o, distance=d,
                                                                      lr=best[(b, o)][0], wd=best[(b, o)][1])
                                                                 for (b, o), d in v.distances.items()])
                               for k, v in robust.items()}
    doc.h(2, "Hyper-parameter robustness (BOCB Sec. 3.1 / A.3)")
    doc.p("Each pair's best lr and wd, one-hot encoded over its grid; the cost is the Manhattan distance to the "
          "mode (lr and wd summed: 0, 2 or 4). Two readings of the mode: per backbone across its optimizers "
          "(paper A.3) and per optimizer across backbones. lr and wd take their modes separately; a tie goes "
          "to the value met first in the table.")
    for reading, r in robust.items():
        by = "backbone" if reading == "backbone" else "optimizer"
        groups = r.per_group(by)
        doc.table([by, "mode lr", "mode wd", "pairs", "mean distance", "pairs at 0", "pairs at 4"],
                  [[g, r.modes[g][0], r.modes[g][1], len(d), float(np.mean(d)), sum(x == 0 for x in d),
                    sum(x == 4 for x in d)] for g, d in groups.items()])
    doc.img(fig_robustness(robust, os.path.join(fig_dir, "hp_robustness.png")),
            "one-hot distance of each pair's best (lr, wd) to the mode, both readings")
    sens = bocb.hp_sensitivity(with_hp)
    if sens:
        result["hp_sensitivity"] = [s.to_json() for s in sens.values()]
        doc.h(3, "Sensitivity over the grid")
        doc.p("Per pair run at two or more grid points: the mean score at each (lr / wd, low to high), the "
              "spread (best minus worst) and the factor the lr grid spans. A larger spread over the same span is a "
              "more hyper-parameter-sensitive pairing; with one seed per point, a spread no larger than the pair's "
              "seed-to-seed spread is not a finding.")
        doc.table(["backbone", "optimizer", "score by lr / wd", "best lr", "spread", "lr span"],
                  [[s.backbone, s.optimizer,
                    ", ".join(f"{lr or '-'}{'/' + wd if wd else ''}: {m:.2f}" for lr, wd, m, _ in s.points),
                    max(s.points, key=lambda p: p[2])[0] or None, s.spread,
                    None if s.span is None else f"x{s.span:g}"] for s in sens.values()])


@dataclass
class RunMeasurements:
    """What the report measures in each run folder, keyed by cell (or folder name)."""
    by_key: Dict[str, Dict]
    pairs: List[Tuple[str, str]]
    events: Dict = field(default_factory=OrderedDict)
    finetune_events: Dict = field(default_factory=OrderedDict)
    opt_mb: Dict = field(default_factory=OrderedDict)
    seen: Dict = field(default_factory=OrderedDict)
    flops: Dict = field(default_factory=OrderedDict)
    weights: Dict = field(default_factory=OrderedDict)
    sharp: Dict = field(default_factory=OrderedDict)

    def pair_mean(self, values: Dict[str, Optional[float]], pair) -> Optional[float]:
        v = [x for k, x in values.items() if x is not None and
             (self.by_key[k]["backbone"], self.by_key[k]["optimizer"]) == pair]
        return float(np.mean(v)) if v else None


def _measure_runs(folders: List[Dict], opts: Options, out_dir: str, progress: bool) -> RunMeasurements:
    from tqdm import tqdm
    from .stability import run_events
    runs = RunMeasurements(by_key={(r.get("cell") or os.path.basename(r["folder"])): r for r in folders},
                           pairs=list(OrderedDict.fromkeys((r["backbone"], r["optimizer"]) for r in folders)))
    cache_dir = os.path.join(out_dir, "cache")
    bar = tqdm(folders, desc="run folders", unit="run", disable=not progress)
    for r in bar:
        bar.set_postfix_str(os.path.basename(r["folder"])[:40])
        key = r.get("cell") or os.path.basename(r["folder"])
        if not _has_folder(r):  # only the table's counts: no folder here
            runs.events[key] = dict(r["table_events"])
            continue
        runs.events[key] = run_events(r["folder"])
        finetune = os.path.join(r["folder"], "finetune")
        if os.path.isfile(os.path.join(finetune, "summary.json")):
            runs.finetune_events[key] = run_events(finetune)
        runs.opt_mb[key] = optimizer_state_mb(r["folder"])
        cfg = run_config(r["folder"])
        runs.seen[key] = images_seen(r["folder"], cfg)
        runs.flops[key] = pretrain_flops(r["folder"], cfg, runs.seen[key])
        if opts.weights:
            w = weight_rows(r["folder"], cache_dir, opts.pca_frac, opts.bins)
            if w is not None:
                runs.weights[key] = w
        if opts.sharpness:
            from .sharpness import run_sharpness
            runs.sharp[key] = run_sharpness(r["folder"], opts.sharpness_batch, opts.sharpness_iters)
    bar.close()
    return runs


def _cost_section(doc: Doc, runs: RunMeasurements) -> None:
    doc.h(2, "Cost")
    doc.p("Per pair, the mean over its runs: pretraining images/s (median epoch), peak memory, the optimizer's "
          "state in the last checkpoint, and the pretraining wall time. Compare speeds only within one machine "
          "and one sweep run.")
    by_key, mean = runs.by_key, runs.pair_mean
    cost = {k: {kk: by_key[kk].get(k) for kk in by_key} for k in ("images_per_s", "peak_mem_mb", "pretrain_s")}
    doc.table(["backbone", "optimizer", "images/s", "peak MB", "optimizer state MB", "pretrain s",
               "pretrain PFLOPs"],
              [[b, o, mean(cost["images_per_s"], (b, o)), mean(cost["peak_mem_mb"], (b, o)),
                mean(runs.opt_mb, (b, o)), mean(cost["pretrain_s"], (b, o)),
                None if mean(runs.flops, (b, o)) is None else mean(runs.flops, (b, o)) / 1e15]
               for b, o in runs.pairs])


def _first_layers(e: Dict) -> Optional[str]:
    counts = e.get("first_layers") or {}
    return ", ".join(f"{n} x{c}" for n, c in counts.items()) or None


def _events_tables(doc: Doc, runs: RunMeasurements, events: Dict, dips: str) -> None:
    """The per-run event counts, then their means per (backbone, optimizer)."""
    doc.table(["run", "source", "steps", "grad-norm spikes", "loss spikes", dips, "non-finite steps",
               "rollbacks", "spiked first"],
              [[k, e["source"], e.get("logged_steps"), e.get("grad_spikes"), e.get("loss_spikes"),
                e.get("dips"), e.get("nonfinite_steps"), e.get("rollbacks"), _first_layers(e)]
               for k, e in events.items()])
    if len(runs.pairs) > 1 or len(runs.by_key) > len(runs.pairs):
        doc.p("Per (backbone, optimizer), the mean over its runs.")
        doc.table(["backbone", "optimizer", "grad-norm spikes", dips, "non-finite steps", "rollbacks"],
                  [[b, o] + [runs.pair_mean({k: e.get(n) for k, e in events.items() if k in runs.by_key}, (b, o))
                             for n in ("grad_spikes", "dips", "nonfinite_steps", "rollbacks")]
                   for b, o in runs.pairs])


def _stability_section(doc: Doc, runs: RunMeasurements) -> None:
    doc.h(2, "Stability")
    doc.p("Per run, from its summary.json (counted online by the training loop on every step), for a run "
          "that wrote none from its logs, and for a run whose folder is not on this machine from the counts the "
          "sweep's table kept (source results.csv: no step or loss-spike counts): gradient-norm and loss spikes "
          "(a value above 3 x the median of the 20 before it; consecutive spiking steps are one event), "
          "kNN-monitor dips (a reading more than 2 points below the best before it; '-' when the run had no "
          "monitor), steps skipped for a non-finite loss or gradient, rollbacks to an earlier checkpoint, and the layer whose gradient norm spiked first.")
    _events_tables(doc, runs, runs.events, "kNN dips")
    if runs.finetune_events:
        doc.h(3, "Fine-tuning")
        doc.p("The same counts for the runs' fine-tuning (its summary.json, written by the same training loop); "
              "dips are of the validation top-1 read after each epoch.")
        _events_tables(doc, runs, runs.finetune_events, "top-1 dips")


def _compute_section(doc: Doc, runs: RunMeasurements, metric: str, fig_dir: str) -> None:
    by_key = runs.by_key
    for values, name, label in ((runs.seen, "images", "images seen in pretraining"),
                                (runs.flops, "flops", "pretraining FLOPs (approximate: 8 x backbone forward)")):
        pts = [(by_key[k]["backbone"], by_key[k]["optimizer"], float(v), by_key[k]["score"])
               for k, v in values.items() if v and by_key[k].get("score")]
        if len({round(p[2], -6) for p in pts}) > 1:
            doc.img(fig_compute(pts, metric, os.path.join(fig_dir, f"compute_{name}.png"), label),
                    f"{metric} against {label} (log-log)")
        elif pts and name == "images":
            doc.p(f"Every run saw the same number of images in pretraining ({int(pts[0][2]):,}).")


def _weights_section(doc: Doc, result: Dict, runs: RunMeasurements, opts: Options, fig_dir: str) -> None:
    weights, by_key = runs.weights, runs.by_key
    doc.h(2, "Weight diagnostics")
    doc.p("Per layer (Linear and Conv2d weights of the exported backbone): PL exponent alpha and matrix entropy "
          "as WeightWatcher 0.7.7 computes them, the entropy of the histogram of weight values "
          f"({opts.bins} bins, nats), the L2 norm and the top-k PCA energy (k = {opts.pca_frac:g} x rank). "
          "Table: mean over layers (and seeds); figures: one ridge per optimizer along the layers, and the "
          "distribution over layers.")
    table = []
    for b in OrderedDict.fromkeys(by_key[k]["backbone"] for k in weights):
        per_opt: "OrderedDict[str, List[Dict]]" = OrderedDict()
        for o in OrderedDict.fromkeys(by_key[k]["optimizer"] for k in weights if by_key[k]["backbone"] == b):
            runs_bo = [weights[k] for k in weights if by_key[k]["backbone"] == b and by_key[k]["optimizer"] == o]
            per_opt[o] = _mean_layers(runs_bo)
            table.append([b, o, len(runs_bo), len(per_opt[o])] + [
                float(np.nanmean([x[key] if x[key] is not None else np.nan for x in per_opt[o]]))
                if any(x[key] is not None for x in per_opt[o]) else None for key in LAYER_METRICS])
        slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in b)
        doc.img(fig_ridges(b, per_opt, os.path.join(fig_dir, f"ridge_{slug}.png")),
                f"{b}: layer-wise ridges, one per optimizer")
        doc.img(fig_histograms(b, per_opt, os.path.join(fig_dir, f"hist_{slug}.png")),
                f"{b}: distribution over layers per optimizer")
    doc.table(["backbone", "optimizer", "runs", "layers"] + list(LAYER_METRICS), table)
    result["weights"] = weights


def _mean_layers(runs: List[List[Dict]]) -> List[Dict]:
    """Layer by layer, the mean of each weight metric over runs (non-finite values left out)."""
    layers = []
    for i in range(len(runs[0])):
        layer = dict(name=runs[0][i]["name"])
        for key in LAYER_METRICS:
            vals = [run[i][key] for run in runs if run[i][key] is not None and math.isfinite(run[i][key])]
            layer[key] = float(np.mean(vals)) if vals else None
        layers.append(layer)
    return layers


def _sharpness_section(doc: Doc, result: Dict, runs: RunMeasurements, opts: Options) -> None:
    doc.h(2, "Sharpness and activity")
    doc.p(f"Top Hessian eigenvalue of the MoCo v3 loss at the final weights (power iteration on Hessian-vector "
          f"products, {opts.sharpness_batch} images with fixed augmentations, seed 0, at most "
          f"{opts.sharpness_iters} iterations) and the mean fraction of activated neurons per backbone block.")
    doc.table(["run", "top Hessian eigenvalue", "iterations", "activated fraction"],
              [[k, s["hessian_top_eig"], s["hessian_iters"], s["activation_mean"]] for k, s in runs.sharp.items()])
    result["sharpness"] = runs.sharp


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
