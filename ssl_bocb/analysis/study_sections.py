"""The report's statistics sections: the study table with its flags, the floors, the lr choices, the backbone x
optimizer interaction, hyper-parameter robustness."""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np

from . import bocb
from .document import Doc
from .figures import fig_heatmap, fig_robustness, fig_spread
from .options import Options
from .sources import family_name


def mean_ci(c: bocb.CellStat) -> str:
    s = f"{c.mean:.2f}"
    if math.isfinite(c.ci_low):
        s += f" ± {(c.ci_high - c.ci_low) / 2:.2f}"
    s += f" (n={c.n})"
    if c.flagged:
        s += " **bad?** (uncertain)" if c.uncertain else " **bad**"
    return s


def gap_text(c: bocb.CellStat) -> str:
    """The row's best minus this cell, with its Welch interval."""
    if c.gap == 0 and not math.isfinite(c.gap_low):
        return "best"
    if not math.isfinite(c.gap_low):
        return f"{c.gap:.2f} (one seed)"
    return f"{c.gap:.2f} [{c.gap_low:.2f}, {c.gap_high:.2f}]" + ("" if c.gap_low > 0 else " ~0")


def read_floors(source_path: str) -> Optional[Dict]:
    """The floors.json beside a results table (tools/floors.py), or None."""
    from .floors import read
    folder = source_path if os.path.isdir(source_path) else os.path.dirname(os.path.abspath(source_path))
    return read(os.path.join(folder, "floors.json"))


def _floor_split(metric: str) -> str:
    return "val" if metric.startswith("val_") else "test"


def floors_table(doc: Doc, result: Dict, study: bocb.Study, metric: str, floors: Dict) -> None:
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


def selection_notes(doc: Doc, study: bocb.Study) -> None:
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


def interaction_section(doc: Doc, study: bocb.Study) -> None:
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


def study_section(doc: Doc, result: Dict, scored: List[Dict], metric: str, opts: Options, threshold: float,
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
              [[b] + [mean_ci(study.cells[(b, o)]) if (b, o) in study.cells else "-" for o in study.optimizers]
               for b in study.backbones])
    doc.p(f"Difference to the row's best (its best mean minus this mean, points) with its {opts.level:.0%} Welch t "
          f"interval over seeds (unequal variances, Welch-Satterthwaite degrees of freedom); '~0' marks an interval "
          f"that reaches 0, where the gap is within seed noise. Threshold: the score under which the row flags.")
    doc.table(["backbone", "threshold", "gap a certain flag needs"] + study.optimizers,
              [[b, next(c.cut for (bb, _), c in study.cells.items() if bb == b),
                max((c.critical_gap for (bb, _), c in study.cells.items() if bb == b and c.gap > 0), default=None)]
               + [gap_text(study.cells[(b, o)]) if (b, o) in study.cells else "-" for o in study.optimizers]
               for b in study.backbones])
    doc.img(fig_heatmap(study, metric, os.path.join(fig_dir, "heatmap.png")),
            f"{metric} per backbone and optimizer (mean ± CI half-width; red boxes: bad pairings, dashed: uncertain)")
    selection_notes(doc, study)
    if floors:
        floors_table(doc, result, study, metric, floors)
    interaction_section(doc, study)
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


def hp_section(doc: Doc, result: Dict, with_hp: List[Dict], fig_dir: str) -> None:
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
