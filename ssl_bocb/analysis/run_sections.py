"""The report's per-run sections, read from the cell folders: cost, stability, compute, weight diagnostics, sharpness."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np

from .document import Doc
from .figures import fig_compute, fig_histograms, fig_ridges
from .options import Options
from .runs import LAYER_METRICS, RunMeasurements, mean_layers


def cost_section(doc: Doc, runs: RunMeasurements) -> None:
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


def stability_section(doc: Doc, runs: RunMeasurements) -> None:
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


def compute_section(doc: Doc, runs: RunMeasurements, metric: str, fig_dir: str) -> None:
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


def weights_section(doc: Doc, result: Dict, runs: RunMeasurements, opts: Options, fig_dir: str) -> None:
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
            per_opt[o] = mean_layers(runs_bo)
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


def sharpness_section(doc: Doc, result: Dict, runs: RunMeasurements, opts: Options) -> None:
    doc.h(2, "Sharpness and activity")
    doc.p(f"Top Hessian eigenvalue of the MoCo v3 loss at the final weights (power iteration on Hessian-vector "
          f"products, {opts.sharpness_batch} images with fixed augmentations, seed 0, at most "
          f"{opts.sharpness_iters} iterations) and the mean fraction of activated neurons per backbone block.")
    doc.table(["run", "top Hessian eigenvalue", "iterations", "activated fraction"],
              [[k, s["hessian_top_eig"], s["hessian_iters"], s["activation_mean"]] for k, s in runs.sharp.items()])
    result["sharpness"] = runs.sharp
