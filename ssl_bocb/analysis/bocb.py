"""Backbone-optimizer coupling bias (BOCB) statistics, as defined in ../shared/SPEC.md section 3 and documented in
docs/report.md: per-cell means with a confidence interval, the bad-pairing rule (paper Eq. 1 or the
t x IQR variant), per-backbone and per-optimizer summaries with the worst result removed, and the one-hot Manhattan
hyper-parameter distances of Sec. 3.1 / A.3.

Everything here works on plain rows (dicts with ``backbone``, ``optimizer``, ``seed``, ``score`` and optionally
``lr`` / ``wd``) so that it applies to a sweep's results.csv and to any hand-made or published table alike."""
from __future__ import annotations

import functools
import math
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

Pair = Tuple[str, str]  # (backbone, optimizer)


# --- confidence intervals ------------------------------------------------------------------------------------------

def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with ``df`` degrees of freedom, which need not be whole (Welch's df), from scipy.
    t_quantile(0.975, 1) = 12.706, (0.975, 4) = 2.776, (0.975, 30) = 2.042."""
    if not 0.5 <= p < 1.0 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    from scipy import stats
    return float(stats.t.ppf(p, df))


def confidence_interval(values: Sequence[float], method: str = "t", level: float = 0.95,
                        n_boot: int = 10000, seed: int = 0) -> Tuple[float, float]:
    """Two-sided interval for the mean of ``values``: ``t`` (mean +- t_{(1+level)/2, n-1} * s / sqrt(n)) or
    ``bootstrap`` (percentile interval of ``n_boot`` resampled means, fixed ``seed``). NaN for fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (math.nan, math.nan)
    if method == "t":
        half = t_quantile(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
        return (float(x.mean() - half), float(x.mean() + half))
    if method == "bootstrap":
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
        return (float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2)))
    raise ValueError(f"unknown confidence interval method '{method}' (t or bootstrap)")


# --- cells -----------------------------------------------------------------------------------------------------------

@dataclass
class CellStat:
    backbone: str
    optimizer: str
    n: int                                  # seeds behind the mean
    mean: float
    std: float                              # sample std over seeds (nan for one seed)
    ci_low: float
    ci_high: float
    scores: List[float] = field(default_factory=list)
    lr: Optional[str] = None                # the grid point that won (when the study has an lr / wd grid)
    wd: Optional[str] = None
    flagged: bool = False
    cut: float = math.nan                   # the bad-pairing threshold of its backbone's row: flagged when mean < cut
    uncertain: bool = False                 # flagged, but not certain (seed noise could explain the gap)
    gap: float = math.nan                   # the row's best mean minus this mean (>= 0)
    gap_low: float = math.nan               # Welch t interval of that difference over seeds
    gap_high: float = math.nan
    certain: bool = False                   # flagged, and below the row's best by more than seed noise explains
    critical_gap: float = math.nan          # the gap a certain flag needs: Tukey-Kramer constant x pooled noise
    chosen_on: str = "score"                # what chose the grid point: val (the validation score) | score
    bracket: str = ""                       # where the chosen point lies in its grid: bracketed | low end |
    #                                         high end; "" without a grid
    grid: Dict[str, float] = field(default_factory=dict)  # the validation score at each grid point (chosen on val)


def _key(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _pair_point(r: Dict) -> Tuple[Pair, Tuple[str, str]]:
    """A row's (backbone, optimizer) and its (lr, wd) grid point."""
    return (str(r["backbone"]), str(r["optimizer"])), (_key(r.get("lr")), _key(r.get("wd")))


def _grid_points(rows: Iterable[Dict]) -> "OrderedDict[Pair, OrderedDict[Tuple[str, str], List[float]]]":
    """The scores of each (backbone, optimizer) at each of its (lr, wd) grid points; rows without a score left out."""
    points: "OrderedDict[Pair, OrderedDict[Tuple[str, str], List[float]]]" = OrderedDict()
    for r in rows:
        if _missing(r.get("score")):
            continue
        pair, point = _pair_point(r)
        points.setdefault(pair, OrderedDict()).setdefault(point, []).append(float(r["score"]))
    return points


def _val_points(rows: Iterable[Dict]) -> "OrderedDict[Pair, OrderedDict[Tuple[str, str], Tuple[int, float]]]":
    """The validation score of each (backbone, optimizer) at each grid point, read at that point's lowest seed (the
    seed a select sweep runs its grid at), so that every point is compared on one draw, as the sweep chose."""
    out: "OrderedDict[Pair, OrderedDict[Tuple[str, str], Tuple[int, float]]]" = OrderedDict()
    for r in rows:
        if _missing(r.get("val")):
            continue
        pair, point = _pair_point(r)
        seed = int(r.get("seed") or 0)
        have = out.setdefault(pair, OrderedDict()).get(point)
        if have is None or seed < have[0]:
            out[pair][point] = (seed, float(r["val"]))
    return out


def _choose_on_val(points: "OrderedDict[Tuple[str, str], Tuple[int, float]]") -> Tuple[Tuple[str, str], str]:
    """The grid point with the best validation score and where it lies (choice.choose: the sweep's own rule)."""
    from .choice import choose
    lrs = {p: float(p[0]) for p in points} if all(p[0] for p in points) else None
    if lrs is None or len(points) == 1:
        best = max(points, key=lambda p: points[p][1])
        return best, ""
    by_lr = {lrs[p]: points[p][1] for p in points}
    lr, where = choose(by_lr)
    return next(p for p in points if lrs[p] == lr), where


def _chosen(rows: List[Dict]) -> "OrderedDict[Pair, Dict]":
    """Per pair: its chosen grid point, what chose it (val | score), where it lies in its grid, the validation score
    per point, and the scores at the chosen point (None when that point has no score: an unseeded choice)."""
    points, vals = _grid_points(rows), _val_points(rows)
    out: "OrderedDict[Pair, Dict]" = OrderedDict()
    for pair in OrderedDict.fromkeys(list(vals) + list(points)):
        by_point = points.get(pair, OrderedDict())
        if pair in vals:
            point, bracket = _choose_on_val(vals[pair])
            out[pair] = dict(point=point, chosen_on="val", bracket=bracket, scores=by_point.get(point),
                             grid={p[0] or p[1]: v for p, (_, v) in vals[pair].items()})
        else:
            point, scores = max(by_point.items(), key=lambda kv: float(np.mean(kv[1])))
            out[pair] = dict(point=point, chosen_on="score", bracket="", scores=scores, grid={})
    return out


def cell_stats(rows: Iterable[Dict], method: str = "t", level: float = 0.95,
               chosen: Optional["OrderedDict[Pair, Dict]"] = None) -> "OrderedDict[Pair, CellStat]":
    """One statistic per (backbone, optimizer): the mean over seeds and its interval. When a pair was run at
    several (lr, wd) grid points, its result is the point chosen on the validation score (rows' ``val``, read at each
    point's first seed: the point a select sweep chose, and ``bracket`` says where it lies in the grid), else the
    best point by mean score (the tuned result, as the BOCB paper reports). A pair whose chosen point has no score
    (an unbracketed grid, left unseeded) has no statistic: :func:`unmeasured` lists it. ``chosen``: the
    :func:`_chosen` of these rows, when the caller has it already."""
    out: "OrderedDict[Pair, CellStat]" = OrderedDict()
    for pair, ch in (_chosen(list(rows)) if chosen is None else chosen).items():
        if ch["scores"] is None:
            continue
        (lr, wd), x = ch["point"], np.asarray(ch["scores"])
        lo, hi = confidence_interval(x, method, level)
        out[pair] = CellStat(pair[0], pair[1], len(x), float(x.mean()),
                             float(x.std(ddof=1)) if len(x) > 1 else math.nan, lo, hi, list(map(float, x)),
                             lr or None, wd or None, chosen_on=ch["chosen_on"], bracket=ch["bracket"],
                             grid=ch["grid"])
    return out


def unmeasured(rows: Iterable[Dict], chosen: Optional["OrderedDict[Pair, Dict]"] = None) -> List[Dict]:
    """Pairs chosen on validation whose chosen point has no score: where their best validation point lies."""
    chosen = _chosen(list(rows)) if chosen is None else chosen
    return [dict(backbone=pair[0], optimizer=pair[1], lr=ch["point"][0] or None, bracket=ch["bracket"],
                 grid=ch["grid"]) for pair, ch in chosen.items() if ch["scores"] is None]


# --- seed noise ------------------------------------------------------------------------------------------------------

def pooled_noise(cells: Iterable[CellStat]) -> Tuple[float, int]:
    """The seed noise of a study: the pooled within-cell standard deviation over every cell with two or more seeds,
    and its degrees of freedom (sum of n - 1). (nan, 0) when no cell has two seeds."""
    ss, df = 0.0, 0
    for c in cells:
        if c.n >= 2:
            x = np.asarray(c.scores, dtype=float)
            ss += float(((x - x.mean()) ** 2).sum())
            df += c.n - 1
    return (math.sqrt(ss / df), df) if df else (math.nan, 0)


@functools.lru_cache(maxsize=None)
def range_critical(k: int, df: int, alpha: float = 0.05) -> float:
    """The Tukey-Kramer constant q(1 - alpha; k, df) / sqrt(2) of the studentized range. A result is certainly below
    the best of its k when best - it > constant * s * sqrt(1/n_it + 1/n_best): in a row of k equal optimizers (only
    seed noise, sd estimated as s on ``df`` degrees of freedom) that happens for any of them with probability
    <= alpha, since the largest gap of the row is its range."""
    if k < 2 or df < 1:
        return math.inf
    from scipy import stats
    return float(stats.studentized_range.ppf(1 - alpha, k, df) / math.sqrt(2.0))


# --- bad pairings ----------------------------------------------------------------------------------------------------

def iqr(values: Sequence[float]) -> float:
    """Q0.75 - Q0.25 with numpy's default (linear interpolation) quantiles."""
    q75, q25 = np.percentile(np.asarray(values, dtype=float), [75, 25])
    return float(q75 - q25)


@dataclass
class RuleRun:
    rule: str            # "eq1" or "iqr"
    threshold: float     # gamma for eq1, t for iqr

    def describe(self) -> str:
        if self.rule == "eq1":
            return (f"BOCB Eq. 1: r flagged when r < max(R) - min(IQR(R), gamma), gamma = {self.threshold:g} "
                    f"(R: one backbone's results over its optimizers; IQR with linear-interpolation quartiles)")
        return (f"t x IQR: r flagged when max(R) - r > t * IQR(R), t = {self.threshold:g} (R: one backbone's "
                f"results over its optimizers; IQR with linear-interpolation quartiles)")


def flag_cut(results: Dict[str, float], rule: str = "eq1", threshold: float = 3.0) -> float:
    """The score below which a result of this row is a bad pairing: max(R) - min(IQR(R), gamma) (eq1) or
    max(R) - t * IQR(R) (iqr); -inf when the row has fewer than two results."""
    if rule not in ("eq1", "iqr"):
        raise ValueError(f"unknown bad-pairing rule '{rule}' (eq1 or iqr)")
    vals = list(results.values())
    if len(vals) < 2:
        return -math.inf
    best, spread = max(vals), iqr(vals)
    return best - (min(spread, threshold) if rule == "eq1" else threshold * spread)


def flag_bad_pairs(results: Dict[str, float], rule: str = "eq1", threshold: float = 3.0) -> Dict[str, bool]:
    """``results`` maps one backbone's optimizers to their scores; returns which are flagged as bad pairings."""
    cut = flag_cut(results, rule, threshold)
    return {k: v < cut for k, v in results.items()}


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """mean(a) - mean(b) and its Welch t interval (unequal variances, Welch-Satterthwaite degrees of freedom);
    (diff, nan, nan) when either side has fewer than two values. Two identical constant samples give a zero-width
    interval."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return diff, math.nan, math.nan
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0:
        return diff, diff, diff
    df = (vx + vy) ** 2 / ((vx ** 2 / (len(x) - 1) if vx else 0.0) + (vy ** 2 / (len(y) - 1) if vy else 0.0))
    half = t_quantile(0.5 + level / 2, max(df, 1.0)) * se
    return diff, diff - half, diff + half


def mark_significance(cells: "OrderedDict[Pair, CellStat]", backbone: str, cut: float, level: float,
                      noise: Tuple[float, int] = (math.nan, 0)) -> None:
    """For one backbone's row: each cell's gap to the row's best (Welch t over seeds), and whether its flag is
    certain: flagged by the rule, and below the best by more than seed noise explains, by the Tukey-Kramer range test
    at 1 - ``level`` with the study's pooled seed noise ``noise`` = (s, df), so that a row of equal optimizers gets a
    certain flag with probability <= 1 - ``level``, and by its own Welch interval to the best (which must exclude
    0). A flag that is not certain is uncertain."""
    row = [c for (b, _), c in cells.items() if b == backbone]
    best = max(row, key=lambda c: c.mean)
    s, df = noise
    crit = range_critical(len(row), df, round(1 - level, 10)) if math.isfinite(s) else math.inf
    for c in row:
        c.cut = cut
        c.gap, c.gap_low, c.gap_high = ((0.0, math.nan, math.nan) if c is best else
                                        welch_interval(best.scores, c.scores, level))
        c.critical_gap = crit * s * math.sqrt(1 / c.n + 1 / best.n) if math.isfinite(crit) else math.inf
        # the range test assumes one noise level; a pair much noisier than the rest also needs its own Welch
        # interval to exclude 0, so that the pooled estimate never vouches for a gap its own seeds do not show
        own = math.isfinite(c.gap_low) and c.gap_low > 0
        c.certain = c.flagged and c is not best and c.gap > c.critical_gap and own
        c.uncertain = c.flagged and not c.certain


# --- summaries -------------------------------------------------------------------------------------------------------

@dataclass
class Summary:
    name: str
    n: int               # results summarised (before dropping the worst)
    best: float
    worst: float
    mean: float          # after dropping the single worst result
    std: float           # sample std (ddof 1) after dropping the worst; nan when one result is left
    range: float         # max - min after dropping the worst
    worst_of: str        # which optimizer (or backbone) gave the worst result
    flagged: int         # results flagged as bad pairings


def summarize(name: str, results: Dict[str, float], flags: Dict[str, bool]) -> Summary:
    """Mean / std / range of ``results`` with its single worst result removed (paper Sec. 3.1)."""
    items = sorted(results.items(), key=lambda kv: kv[1])
    worst_of, worst = items[0]
    kept = np.asarray([v for _, v in items[1:]], dtype=float)
    if len(kept) == 0:
        mean = std = rng = math.nan
    else:
        mean = float(kept.mean())
        std = float(kept.std(ddof=1)) if len(kept) > 1 else math.nan
        rng = float(kept.max() - kept.min())
    return Summary(name, len(items), float(items[-1][1]), float(worst), mean, std, rng, worst_of,
                   int(sum(bool(flags.get(k)) for k in results)))


def interaction(cells: "OrderedDict[Pair, CellStat]", noise: Tuple[float, int], level: float = 0.95) -> Dict:
    """The backbone x optimizer interaction, which is what coupling means: whether an optimizer's advantage depends
    on the backbone. From the cell means and the pooled seed noise (s, df):

    - ``effects``: each cell's interaction effect g_ij = m_ij - m_i. - m_.j + m_.. (unweighted means), a contrast
      of the cell means with weights (d_ik - 1/a)(d_jl - 1/b), with its t interval (variance s^2 sum w^2 / n_kl);
    - ``f``, ``p``: the two-way test of "no interaction", F = (sum of n_ij g_ij^2 with the harmonic mean n) /
      ((a - 1)(b - 1)) / s^2 on ((a - 1)(b - 1), df) degrees of freedom (exact when every cell has the same seeds).

    Needs every backbone x optimizer cell (a full table) and noise with df >= 1; otherwise ``reason`` says why not."""
    backbones = list(OrderedDict.fromkeys(b for b, _ in cells))
    optimizers = list(OrderedDict.fromkeys(o for _, o in cells))
    a, b = len(backbones), len(optimizers)
    s, df = noise
    if a < 2 or b < 2:
        return dict(reason="needs at least 2 backbones and 2 optimizers")
    if any((bb, o) not in cells for bb in backbones for o in optimizers):
        return dict(reason="needs every backbone x optimizer cell")
    if not df or not math.isfinite(s):
        return dict(reason="needs seed noise (cells with two or more seeds)")
    m = np.array([[cells[(bb, o)].mean for o in optimizers] for bb in backbones])
    n = np.array([[cells[(bb, o)].n for o in optimizers] for bb in backbones], dtype=float)
    g = m - m.mean(axis=1, keepdims=True) - m.mean(axis=0, keepdims=True) + m.mean()
    t = t_quantile(0.5 + level / 2, df)
    effects = []
    for i, bb in enumerate(backbones):
        for j, o in enumerate(optimizers):
            w = (np.eye(a)[i][:, None] - 1 / a) * (np.eye(b)[j][None, :] - 1 / b)
            half = t * s * math.sqrt(float((w ** 2 / n).sum()))
            effects.append(dict(backbone=bb, optimizer=o, effect=float(g[i, j]), low=float(g[i, j] - half),
                                high=float(g[i, j] + half)))
    df1 = (a - 1) * (b - 1)
    n_h = float(len(n.ravel()) / (1 / n).sum())
    f = float(n_h * (g ** 2).sum() / df1 / s ** 2) if s > 0 else math.inf
    from scipy import stats
    p = float(stats.f.sf(f, df1, df)) if math.isfinite(f) else 0.0
    return dict(f=f, df1=df1, df2=df, p=p, noise_sd=s, level=level, effects=effects,
                balanced=bool((n == n.flat[0]).all()))


@dataclass
class Study:
    cells: "OrderedDict[Pair, CellStat]"
    backbones: List[str]
    optimizers: List[str]
    rule: RuleRun
    per_backbone: List[Summary]
    per_optimizer: List[Summary]
    noise: Tuple[float, int] = (math.nan, 0)                # pooled seed sd and its degrees of freedom
    interaction: Dict = field(default_factory=dict)
    unmeasured: List[Dict] = field(default_factory=list)    # pairs whose chosen point has no score

    def matrix(self, attr: str = "mean") -> np.ndarray:
        m = np.full((len(self.backbones), len(self.optimizers)), np.nan)
        for (b, o), c in self.cells.items():
            m[self.backbones.index(b), self.optimizers.index(o)] = getattr(c, attr)
        return m

    def to_json(self) -> Dict:
        return dict(rule=asdict(self.rule) | {"text": self.rule.describe()},
                    backbones=self.backbones, optimizers=self.optimizers,
                    cells=[asdict(c) for c in self.cells.values()],
                    per_backbone=[asdict(s) for s in self.per_backbone],
                    per_optimizer=[asdict(s) for s in self.per_optimizer],
                    noise=dict(sd=self.noise[0], df=self.noise[1]), interaction=self.interaction,
                    unmeasured=self.unmeasured)


def analyze_study(rows: Iterable[Dict], rule: str = "eq1", threshold: float = 3.0, ci: str = "t",
                  level: float = 0.95) -> Study:
    """The study tables of one metric: cell means with intervals, bad-pairing flags per backbone, and summaries
    per backbone (over its optimizers) and per optimizer (over backbones: optimizer generality)."""
    chosen = _chosen(list(rows))
    cells = cell_stats([], ci, level, chosen)
    if not cells:
        raise ValueError("no scored rows to analyse")
    noise = pooled_noise(cells.values())
    backbones = list(OrderedDict.fromkeys(b for b, _ in cells))
    optimizers = list(OrderedDict.fromkeys(o for _, o in cells))
    per_backbone = []
    for b in backbones:
        res = {o: c.mean for (bb, o), c in cells.items() if bb == b}
        flags = flag_bad_pairs(res, rule, threshold)
        for o, f in flags.items():
            cells[(b, o)].flagged = f
        mark_significance(cells, b, flag_cut(res, rule, threshold), level, noise)
        per_backbone.append(summarize(b, res, flags))
    per_optimizer = []
    for o in optimizers:
        res = {b: c.mean for (b, oo), c in cells.items() if oo == o}
        flags = {b: cells[(b, o)].flagged for b in res}
        per_optimizer.append(summarize(o, res, flags))
    return Study(cells, backbones, optimizers, RuleRun(rule, threshold), per_backbone, per_optimizer, noise,
                 interaction(cells, noise, level), unmeasured([], chosen))


# --- hyper-parameter robustness --------------------------------------------------------------------------------------

def mode(values: Sequence, order: Optional[Sequence] = None):
    """Most frequent value; a tie goes to the value that comes first in ``order`` (default: first seen)."""
    counts = Counter(values)
    top = max(counts.values())
    tied = [v for v in (order if order is not None else list(OrderedDict.fromkeys(values))) if counts.get(v) == top]
    return tied[0]


def onehot_distance(a, b, grid: Optional[Sequence] = None) -> int:
    """Manhattan distance between the one-hot codes of two grid values: 0 when equal, 2 otherwise (whatever the
    grid, as long as both values lie on it)."""
    if grid is not None and (a not in grid or b not in grid):
        raise ValueError(f"{a!r} or {b!r} is not on the grid {list(grid)}")
    return 0 if a == b else 2


@dataclass
class Robustness:
    reading: str                            # "backbone" (mode over optimizers per backbone) or "optimizer"
    modes: Dict[str, Tuple[str, str]]       # group -> (mode lr, mode wd)
    distances: Dict[Pair, int]              # (backbone, optimizer) -> lr distance + wd distance

    def per_group(self, by: str) -> Dict[str, List[int]]:
        i = 0 if by == "backbone" else 1
        out: Dict[str, List[int]] = OrderedDict()
        for pair, d in self.distances.items():
            out.setdefault(pair[i], []).append(d)
        return out


def hp_robustness(best: Dict[Pair, Tuple[str, str]], reading: str = "backbone") -> Robustness:
    """``best`` maps (backbone, optimizer) to its best (lr, wd). ``reading="backbone"``: the default setting of a
    backbone is the mode of its optimizers' optima (paper A.3, "across all optimizers for each backbone");
    ``"optimizer"``: the default of an optimizer is the mode of its optima across backbones. lr and wd take their
    modes separately; a pair's cost is the sum of the two one-hot Manhattan distances (0, 2 or 4)."""
    if reading not in ("backbone", "optimizer"):
        raise ValueError(f"unknown reading '{reading}' (backbone or optimizer)")
    i = 0 if reading == "backbone" else 1
    groups: Dict[str, List[Pair]] = OrderedDict()
    for pair in best:
        groups.setdefault(pair[i], []).append(pair)
    modes, dist = {}, OrderedDict()
    for g, pairs in groups.items():
        lrs = [best[p][0] for p in pairs]
        wds = [best[p][1] for p in pairs]
        modes[g] = (mode(lrs), mode(wds))
    for pair, (lr, wd) in best.items():
        m_lr, m_wd = modes[pair[i]]
        dist[pair] = onehot_distance(lr, m_lr) + onehot_distance(wd, m_wd)
    return Robustness(reading, modes, dist)


def best_settings(rows: Iterable[Dict]) -> Dict[Pair, Tuple[str, str]]:
    """Best (lr, wd) per (backbone, optimizer) from rows that carry ``lr`` and ``wd`` (and ``score`` when several
    grid points were run; a row without a score is taken as the stated optimum, as in the paper's tables)."""
    cells = cell_stats([dict(r, score=0.0 if r.get("score") is None else r["score"]) for r in rows
                        if _key(r.get("lr")) or _key(r.get("wd"))])
    return OrderedDict((pair, (c.lr or "", c.wd or "")) for pair, c in cells.items())


@dataclass
class Sensitivity:
    """How much one pair's result moves over its (lr, wd) grid: the mean over seeds at each grid point (sorted by lr,
    then wd), and the spread, its best mean minus its worst. Compare spreads between optimizers only over grids that
    span the same factor (``span``: the largest lr over the smallest)."""
    backbone: str
    optimizer: str
    points: List[Tuple[str, str, float, int]]  # (lr, wd, mean score, seeds)
    spread: float
    span: Optional[float]

    def to_json(self) -> Dict:
        return asdict(self)


def _as_float(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        return math.nan


def hp_sensitivity(rows: Iterable[Dict]) -> "OrderedDict[Pair, Sensitivity]":
    """Per (backbone, optimizer) run at two or more (lr, wd) grid points, its mean score at each and the spread."""
    points = _grid_points(rows)
    out: "OrderedDict[Pair, Sensitivity]" = OrderedDict()
    for pair, by_point in points.items():
        if len(by_point) < 2:
            continue
        pts = sorted(((lr, wd, float(np.mean(v)), len(v)) for (lr, wd), v in by_point.items()),
                     key=lambda p: (_as_float(p[0]), p[0], _as_float(p[1]), p[1]))
        means = [p[2] for p in pts]
        lrs = [_as_float(p[0]) for p in pts if p[0]]
        span = max(lrs) / min(lrs) if lrs and all(x > 0 for x in lrs) and len(set(lrs)) > 1 else None
        out[pair] = Sensitivity(pair[0], pair[1], pts, float(max(means) - min(means)), span)
    return out
