"""Where a grid's best point lies: the one rule by which the sweep extends an lr grid (``sweep.select``) and the
report reads each pair at its chosen point (``analysis.bocb``)."""
from typing import Dict, Tuple

BRACKETED, LOW_END, HIGH_END = "bracketed", "low end", "high end"


def choose(points: Dict[float, float]) -> Tuple[float, str]:
    """(the best point, where it lies: bracketed | low end | high end). A tie goes to the smaller value."""
    if not points:
        raise ValueError("choose needs at least one point")
    xs = sorted(points)
    best = max(xs, key=lambda x: (points[x], -x))
    if len(xs) < 3:
        return best, LOW_END if best == xs[0] else HIGH_END
    return best, LOW_END if best == xs[0] else HIGH_END if best == xs[-1] else BRACKETED
