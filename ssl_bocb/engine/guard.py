"""The non-finite guard: when the loop reads a step's loss and gradient norms off the device, and what it does
with a step whose values are not finite. Two host-read modes behind one interface (``train.host_reads``):

- ``StepReads`` ("step"): every step's values are read before its optimizer step; a non-finite step is skipped
  (no update, BatchNorm statistics put back).
- ``WindowReads`` ("log", auto on GPUs): steps are applied at once and their values read together at the next read
  point (log step, checkpoint, epoch end, stop), so the device queue never waits on the host; a window holding a
  non-finite step is undone from a device copy of the whole state taken at the window's start.

``submit`` returns None between read points, else one ``Outcome`` per step read. Status: None (applied), "nonfinite"
(skipped, or the step of the window that broke it), "overflow" (fp16: the loss scaler skipped it), "undone" (finite,
but in a window that was undone) or "ignored" (after a window's first non-finite step: it ran on poisoned weights,
so its values say nothing).
"""
import logging
import math
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

from .step import guarded_step
from .telemetry import BufferSnapshot, StateSnapshot

log = logging.getLogger(__name__)


class Outcome(NamedTuple):
    step: int
    values: List[float]        # loss, global gradient norm, per-layer gradient norms
    sched: Dict[str, float]    # the scheduled values the step ran with (lr, wd, ...)
    status: Optional[str]


class StepReads:
    """``train.host_reads=step``: one host read per step, a non-finite step skipped before it is applied."""
    deferred = False

    def __init__(self, model, optimizer, accelerator, extra_modules=()):
        self.optimizer, self.accelerator = optimizer, accelerator
        self.buffers = BufferSnapshot(model)

    def start(self) -> None:
        pass

    def before_step(self) -> None:
        self.buffers.save()

    def submit(self, step: int, vec: torch.Tensor, sched: Dict, read_point: bool,
               after_applied: Callable[[int], None]) -> Optional[List[Outcome]]:
        values = vec.tolist()  # the step's one host read
        status = guarded_step(self.optimizer, self.accelerator, math.isfinite(values[0]), math.isfinite(values[1]))
        if status == "nonfinite":
            self.buffers.restore()  # BatchNorm statistics of a diverging forward would poison later steps
        elif status is None:
            after_applied(step)
        return [Outcome(step, values, sched, status)]

    def end_window(self, rolled_back: bool) -> None:
        pass

    def flush(self) -> List[Outcome]:
        return []


class WindowReads:
    """``train.host_reads=log``: steps applied at once, read and checked per window; a bad window is undone."""
    deferred = True

    def __init__(self, model, optimizer, accelerator, extra_modules=()):
        self.optimizer = optimizer
        self.snapshot = StateSnapshot(model, optimizer, extra_modules)
        self.pending = []
        self.window = None

    def start(self) -> None:
        self.snapshot.take()

    def before_step(self) -> None:
        pass

    def submit(self, step: int, vec: torch.Tensor, sched: Dict, read_point: bool,
               after_applied: Callable[[int], None]) -> Optional[List[Outcome]]:
        self.optimizer.step()  # applied now, checked at the next read point: no host read in this step
        after_applied(step)
        self.pending.append((step, vec, sched))
        if not read_point:
            return None
        return self.flush()

    def flush(self) -> List[Outcome]:
        """Read the pending steps (the window's one host read) and judge them."""
        window, self.pending = self.pending, []
        if not window:
            return []
        values = torch.stack([v for _, v, _ in window]).tolist()
        finite = [math.isfinite(v[0]) and math.isfinite(v[1]) for v in values]
        # the steps after the window's first non-finite one ran on its poisoned update: not counted
        first = finite.index(False) if not all(finite) else len(finite)
        self.window = (window[0][0], window[-1][0], all(finite))
        return [Outcome(s, v, sc, None if first == len(finite) else
                        "undone" if i < first else "nonfinite" if i == first else "ignored")
                for i, ((s, _, sc), v) in enumerate(zip(window, values))]

    def end_window(self, rolled_back: bool) -> None:
        """After the window's outcomes were handled: a new copy of a sound (or rolled-back) state, or the old one
        put back."""
        if self.window is None:
            return
        start, end, sound = self.window
        self.window = None
        if rolled_back or sound:
            self.snapshot.take()
        else:
            self.snapshot.restore()
            log.warning("steps %d-%d undone: the weights, optimizer state and BatchNorm statistics are those after "
                        "step %d again", start, end, start - 1)


def make_guard(host_reads: str, model, optimizer, accelerator, extra_modules=()):
    return (WindowReads if host_reads == "log" else StepReads)(model, optimizer, accelerator, extra_modules)
