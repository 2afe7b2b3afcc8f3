"""The instability rules, shared by the training loop (online, ``engine.telemetry``) and the report (offline, read
off a run's logs by ``analysis.stability``): gradient-norm and loss spikes, kNN-monitor dips.

- spike: a value above ``factor`` x the median of the ``window`` values before it (needs at least ``min_history``
  of them), so a slowly falling or rising series never counts, and a spike does not hide the next one for long;
- dip: a monitor reading more than ``drop`` points below the best reading before it;
- event: a run of consecutive spiking values (or dipping readings) counts once, at its first value."""
from __future__ import annotations

import math
from collections import deque
from typing import Dict, List, Sequence, Tuple

import numpy as np

SPIKE_FACTOR = 3.0
SPIKE_WINDOW = 20
SPIKE_MIN_HISTORY = 5
DIP_DROP = 2.0


class SpikeDetector:
    """Online form of the spike rule: feed values in order; ``update`` says whether each one spikes. Its state (the
    last ``window`` values) is a plain list, so a checkpoint can carry it and a resumed run detects the same spikes."""

    def __init__(self, factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW,
                 min_history: int = SPIKE_MIN_HISTORY, history: Sequence[float] = ()):
        self.factor, self.window, self.min_history = factor, window, min_history
        self.history = deque(history, maxlen=window)

    def update(self, x: float) -> Tuple[bool, float]:
        """(spike?, median of the finite values in the window before ``x``; nan while there are too few)."""
        past = [v for v in self.history if math.isfinite(v)]
        med = float(np.median(past)) if len(past) >= self.min_history else math.nan
        spike = math.isfinite(x) and math.isfinite(med) and x > self.factor * med
        self.history.append(float(x))
        return bool(spike), med

    def state(self) -> Dict:
        return dict(history=[float(v) for v in self.history])

    def load(self, state: Dict) -> None:
        self.history = deque(state["history"], maxlen=self.window)


class DipDetector:
    """Online form of the dip rule: a reading more than ``drop`` below the best reading before it."""

    def __init__(self, drop: float = DIP_DROP, best: float = -math.inf):
        self.drop, self.best = drop, best

    def update(self, v) -> bool:
        if v is None or not math.isfinite(v):
            return False
        dip = v < self.best - self.drop
        self.best = max(self.best, v)
        return bool(dip)


def spikes(values: Sequence[float], factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW,
           min_history: int = SPIKE_MIN_HISTORY) -> List[int]:
    """Indices of the values above ``factor`` x the running median of the previous ``window`` values."""
    det = SpikeDetector(factor, window, min_history)
    return [i for i, v in enumerate(values) if det.update(float(v) if v is not None else math.nan)[0]]


def dips(values: Sequence[float], drop: float = DIP_DROP) -> List[int]:
    """Indices of the readings more than ``drop`` below the best reading before them."""
    det = DipDetector(drop)
    return [i for i, v in enumerate(values) if det.update(v)]


def onsets(indices: Sequence[int]) -> List[int]:
    """The first index of each run of consecutive indices: consecutive spiking (or dipping) values are one event."""
    return [i for k, i in enumerate(indices) if k == 0 or indices[k - 1] != i - 1]
