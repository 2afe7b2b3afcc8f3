"""The report's PNG figures (matplotlib, Agg): heatmap, spread, robustness, ridges, histograms, compute."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Tuple

import numpy as np

from . import bocb
from .plots import _pyplot
from .runs import LAYER_METRICS


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
