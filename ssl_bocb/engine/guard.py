"""The non-finite guard, one object (``Guard``): when the loop reads a step's loss and gradient norms off the
device, what it does with a step whose values are not finite, and when a streak of them rolls the run back.

Two host-read modes behind one interface (``train.host_reads``):

- ``StepReads`` ("step"): every step's values are read before its optimizer step; a non-finite step is skipped
  (no update, BatchNorm statistics put back).
- ``WindowReads`` ("log", auto on GPUs): steps are applied at once and their values read together at the next read
  point (log step, checkpoint, epoch end, stop), so the device queue never waits on the host; a window holding a
  non-finite step is undone from a device copy of the whole state taken at the window's start.

``submit`` returns None between read points, else one ``Outcome`` per step read. Status: None (applied), "nonfinite"
(skipped, or the step of the window that broke it), "overflow" (fp16: the loss scaler skipped it), "undone" (finite,
but in a window that was undone) or "ignored" (after a window's first non-finite step: it ran on poisoned weights,
so its values say nothing). ``Guard.judge`` turns each outcome into the loop's next move and keeps the streak of
non-finite steps; ``stability.nonfinite_patience`` of them in a row and ``Guard.roll_back`` returns the run to the
newest sound checkpoint written before the streak began (or stops it with one line).
"""
import copy
import logging
import math
import os
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import nn

from ..errors import UserError
from . import checkpoint as ckpt

log = logging.getLogger(__name__)


def resolve_host_reads(requested: str, accelerator) -> str:
    """``train.host_reads``: auto is "log" on GPUs (a host read per step stalls the device queue) and "step" elsewhere
    (on a CPU it costs nothing); fp16's loss scaler decides per step, so it always reads per step."""
    if accelerator.scaler is not None:
        return "step"
    if requested == "auto":
        return "log" if accelerator.device.type == "cuda" else "step"
    return requested


def guarded_step(optimizer, accelerator, finite_loss: bool, finite_grads: bool) -> Optional[str]:
    """The optimizer step of the non-finite guard; returns None (applied), "nonfinite" (skipped: the loss or a
    gradient is not finite) or "overflow" (fp16: the loss scaler skipped the step and lowered its scale).

    With an fp16 loss scaler the scaler sees every step, so that it can lower its scale: it skips the steps with
    non-finite gradients itself; those with a finite loss are overflow skips, a non-finite loss is divergence."""
    if accelerator.scaler is not None:
        optimizer.step()
        if not finite_loss:
            return "nonfinite"
        return "overflow" if accelerator.optimizer_step_was_skipped else None
    if not (finite_loss and finite_grads):
        optimizer.zero_grad(set_to_none=True)
        return "nonfinite"
    optimizer.step()
    return None


class BufferSnapshot:
    """A copy of a model's buffers (BatchNorm statistics) taken before each step, put back when the guard skips
    the step: a forward that diverged must not leave its statistics behind. One copy kernel per step."""

    def __init__(self, model: nn.Module):
        self.buffers = [b for b in model.buffers()]
        self.copies = [b.detach().clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.copies, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.copies)


class StateSnapshot:
    """A device copy of the whole training state (weights, momentum encoder, BatchNorm statistics, optimizer state)
    for ``train.host_reads=log``: taken at each read point whose window was sound, put back when a window held a
    non-finite step. Device-to-device copies only, once per window. ``extra_modules`` are copied with the model
    (a fine-tune's EMA of the weights)."""

    def __init__(self, model: nn.Module, optimizer, extra_modules=()):
        self.modules = [model, *extra_modules]
        self.optimizer = optimizer
        self.weights = self.state = None

    def take(self) -> None:
        self.weights = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules]
        self.state = copy.deepcopy(self.optimizer.state_dict())

    def restore(self) -> None:
        for m, w in zip(self.modules, self.weights):
            m.load_state_dict(w)
        self.optimizer.load_state_dict(copy.deepcopy(self.state))


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

# what Guard.judge tells the loop to do with one outcome
APPLIED, SKIPPED, ROLL_BACK, NOTHING = "applied", "skipped", "roll back", "nothing"


class Guard:
    """The whole guard: the host-read mode, the streak of non-finite steps (kept in checkpoints, so a resumed run
    continues it), and the rollback to a sound checkpoint."""

    def __init__(self, host_reads: str, model, optimizer, accelerator, extra_modules=(), patience: int = 3):
        self.reads = (WindowReads if host_reads == "log" else StepReads)(model, optimizer, accelerator, extra_modules)
        self.deferred = self.reads.deferred
        self.patience = patience
        self.streak, self.first_bad = 0, 0

    # --- checkpoint state ------------------------------------------------------------------------------------------
    def state(self) -> Dict:
        return dict(nonfinite_streak=self.streak, nonfinite_streak_start=self.first_bad)

    def load(self, meta: Dict) -> None:
        """From a checkpoint's meta (older checkpoints without the guard's keys start a fresh streak)."""
        if "events" in meta:
            self.streak = meta.get("nonfinite_streak", 0)
            self.first_bad = meta.get("nonfinite_streak_start", meta["step"] - self.streak + 1)

    # --- the reads -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.reads.start()

    def before_step(self) -> None:
        self.reads.before_step()

    def submit(self, step: int, vec: torch.Tensor, sched: Dict, read_point: bool,
               after_applied: Callable[[int], None]) -> Optional[List[Outcome]]:
        return self.reads.submit(step, vec, sched, read_point, after_applied)

    def flush(self) -> List[Outcome]:
        return self.reads.flush()

    def end_window(self, rolled_back: bool) -> None:
        self.reads.end_window(rolled_back)

    # --- the verdicts ----------------------------------------------------------------------------------------------
    def judge(self, o: Outcome) -> str:
        """APPLIED (count and log it), SKIPPED (a non-finite step, the streak goes on), ROLL_BACK (the streak reached
        the patience) or NOTHING (an ignored, undone or overflow step: the state did not move)."""
        if o.status in ("ignored", "undone"):
            return NOTHING
        if o.status == "nonfinite":
            self.streak += 1
            self.first_bad = o.step if self.streak == 1 else self.first_bad
            return ROLL_BACK if self.streak >= self.patience else SKIPPED
        if o.status == "overflow":
            return NOTHING
        self.streak = 0
        return APPLIED

    def protected(self, run_dir: str) -> Optional[str]:
        """During a streak, the checkpoint a rollback would return to (kept from the rotation)."""
        return ckpt.newest_sound_checkpoint(run_dir, before_step=self.first_bad) if self.streak else None

    def roll_back(self, accelerator, run_dir: str, at_step: int, events, stability, optim_key: str,
                  diverged: Callable[[], None]) -> Dict:
        """Back to the newest sound checkpoint written before the streak, the lr lowered for the rest of the run
        (``events`` counts the rollback and holds the lr scale); returns its meta. When the rollbacks are spent or
        there is no such checkpoint: ``diverged()`` (the summary), then a one-line UserError."""
        n = events.counts["rollbacks"]
        if n >= stability.max_rollbacks:
            diverged()
            raise UserError(f"training diverged: {self.streak} non-finite steps in a row at step {at_step}, after {n} "
                            f"rollbacks (lr x{events.lr_scale:g}); lower {optim_key}.base_lr, set {optim_key}.grad_clip, "
                            f"or raise stability.max_rollbacks (checkpoints and summary.json are kept)")
        good = ckpt.newest_sound_checkpoint(run_dir, before_step=self.first_bad)
        if good is None:
            diverged()
            later = ckpt.latest_checkpoint(run_dir)
            where = ("before any checkpoint to roll back to" if later is None else
                     f"and no sound checkpoint was written before the divergence began at step {self.first_bad} "
                     f"(the newest, {os.path.basename(later)}, is from after it)")
            raise UserError(f"training diverged: {self.streak} non-finite steps in a row at step {at_step}, {where}; "
                            f"lower {optim_key}.base_lr, set {optim_key}.grad_clip, or checkpoint more often so that "
                            f"a rollback has a checkpoint to return to")
        back = ckpt.load_checkpoint(accelerator, good)
        events.rollback(at_step, back["step"], os.path.basename(good), stability.rollback_lr_factor)
        log.warning("rolled back from step %d to %s after %d non-finite steps in a row; lr x%g from here on "
                    "(rollback %d of at most %d)", at_step, good, self.streak, events.lr_scale, n + 1,
                    stability.max_rollbacks)
        self.streak = 0
        return dict(back, path=good)
