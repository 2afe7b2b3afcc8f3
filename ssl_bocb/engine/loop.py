"""The one training loop of the package: pretraining and fine-tuning are tasks plugged into it.

The loop owns what every run needs: the lr / weight-decay schedules (and any value a task schedules), the step
(``step.compute_gradients``: SAM, Sophia's Hessian pass, AGC and clipping), the non-finite guard in both host-read
modes (``guard``), rollback to a sound checkpoint, per-layer gradient telemetry with spike and dip events,
steps.jsonl / log.jsonl / TensorBoard / summary.json, the progress bar, checkpoints with exact resume, and Ctrl-C.

A task (``Task``) gives it a prepared model, optimizer and loader, and says how a batch becomes a loss, what
happens around an applied step (MoCo's momentum-encoder update; a fine-tune's EMA) and what runs at an epoch end
(the kNN monitor; validation top-1). Outline of ``TrainLoop.run``:

    while step < stop:            one epoch: _epoch()
        for batch:                one step: train_step() -> guard outcomes -> _handle() each (events, logs, rollback)
        epoch end:                _end_epoch(): task.epoch_end(), log.jsonl, checkpoint
    _finish()                     summary.json status, the last checkpoint of a stopped job
"""
import abc
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..files import write_json
from ..optim import schedules
from . import checkpoint as ckpt
from . import logs
from .guard import APPLIED, ROLL_BACK, SKIPPED, Guard, Outcome, resolve_host_reads
from .step import StepSettings, compute_gradients
from .telemetry import GradNorms, RunEvents, strict_json

log = logging.getLogger(__name__)


def epoch_batches(accelerator, loader, dataset, epoch: int, skip: int):
    """The batches of ``epoch``, less the first ``skip`` already trained (resume). The sampler's order and every
    image's augmentation are functions of the epoch, so a resumed epoch continues where it stopped."""
    dataset.set_epoch(epoch)
    loader.set_epoch(epoch)
    return accelerator.skip_first_batches(loader, skip) if skip else loader


def check_same_schedule(meta: dict, derived: dict, path: str) -> None:
    """A resumed run must cut its epochs into the same global batches: the step counter, the schedules and the
    epoch's remaining images are all read off it. (The number of processes may change; see docs/reliability.md,
    "Checkpoints and resuming".)"""
    saved = meta.get("derived", {})
    old = (saved.get("steps_per_epoch", meta.get("steps_per_epoch")), saved.get("total_steps"))
    new = (derived["steps_per_epoch"], derived["total_steps"])
    if old[0] is not None and old != new:
        raise UserError(f"checkpoint '{path}' was trained with {old[0]} steps per epoch and {old[1]} steps in all, "
                        f"this config gives {new[0]} and {new[1]}; resume with the train.batch_size, train.epochs and "
                        f"data settings it was trained with, or start a new run")


@dataclass
class LoopSettings:
    """What the loop needs from a task's config: the run's length, batch, schedules, logs and checkpoints."""
    epochs: int
    batch_size: int            # global, over all processes
    lr: float                  # peak lr (after batch scaling)
    warmup_steps: int
    min_lr: float
    weight_decay: float
    weight_decay_end: float
    log_every: int
    save_every: int            # epochs between checkpoints (and at the end)
    stability: object          # config.StabilityConfig
    save_every_steps: int = 0
    keep_checkpoints: int = 0
    stop_at_step: int = 0
    host_reads: str = "step"
    desc: str = "epoch"        # the progress bar's and the epoch log line's label
    optim_key: str = "optim"   # where the task's optimizer settings live, for messages
    resume_key: str = "resume"


class Task(abc.ABC):
    """What a training task plugs into the loop (the contract, checked by :func:`check_task` when the loop is built).

    It must set the attributes of ``REQUIRED`` and define the hooks ``prepare`` and ``loss_fn``; it may override the
    others, whose defaults do nothing:

    - ``extra_schedule(step, total)``: values scheduled besides lr and wd (MoCo's momentum), logged with them;
    - ``after_applied(step)``: right after an optimizer step is applied, ``step`` counting it (MoCo's momentum
      encoder, a fine-tune's weight EMA); the one way for a task to act on a step: a skipped step does not call it,
      and an undone window or a rollback puts back the state it changed (``snapshot_modules``, checkpoints);
    - ``epoch_end(epoch, step)``: values for the epoch's log row (the kNN monitor, validation top-1);
    - ``snapshot_modules()``, ``checkpoint_extra()``, ``load_extra(path)``: state besides the model and optimizer;
    - for ``engine.run.run_task``: ``loop_settings()`` (required there), ``resume(path, meta)``, ``log_setup(folder,
      loop)`` and ``finish(status, loop, seconds)`` (the run's result: an export, a metrics file).
    """
    REQUIRED = ("model", "optimizer", "loader", "dataset", "accelerator", "unwrapped", "step_settings", "run_dir",
                "config", "derived")
    model = optimizer = loader = dataset = accelerator = None
    unwrapped = None           # the model without its DDP / compile wrapper
    step_settings: StepSettings = None
    run_dir: str = None
    config: Dict = None        # the plain-dict config written into each checkpoint
    derived: Dict = None
    dip_metric: Optional[str] = None   # the epoch-end value watched for dips ("knn_top1"); None: none watched

    @abc.abstractmethod
    def prepare(self, batch, epoch: int) -> Tuple[object, torch.Tensor]:
        """(what loss_fn needs, per-sample count of unreadable images replaced)."""

    def extra_schedule(self, step: int, total_steps: int) -> Dict[str, float]:
        return {}

    @abc.abstractmethod
    def loss_fn(self, inputs) -> Callable[[], torch.Tensor]:
        """A closure computing the step's loss (engine.step calls it once, or twice with SAM)."""

    def after_applied(self, step: int) -> None:
        pass

    def epoch_end(self, epoch: int, step: int) -> Dict:
        """Values added to the epoch's log.jsonl row (the watched ``dip_metric`` among them)."""
        return {}

    def epoch_note(self, row: Dict) -> str:
        return ""

    def snapshot_modules(self) -> List[torch.nn.Module]:
        """Modules copied with the model when host_reads=log undoes a window (an EMA)."""
        return []

    def checkpoint_extra(self) -> Optional[Dict[str, Dict[str, torch.Tensor]]]:
        return None

    def load_extra(self, path: str) -> None:
        """Restore what checkpoint_extra saved (a rollback reads it back)."""

    def loop_settings(self) -> "LoopSettings":
        raise TypeError(f"task {type(self).__name__} defines no loop_settings(); run_task needs it")

    def resume(self, path: str, meta: dict) -> None:
        """Check that the checkpoint fits this run, then load it."""
        from . import checkpoint as ckpt
        ckpt.load_checkpoint(self.accelerator, path)

    def log_setup(self, folder, loop: "TrainLoop") -> None:
        """Log lines describing the run, once the loop is built."""

    def finish(self, status: str, loop: "TrainLoop", seconds: float):
        """The run's result, after the last step (main-process work such as an export goes here)."""
        return status


def check_task(task) -> None:
    """A task that breaks the contract fails here, in one line naming what is missing."""
    if not isinstance(task, Task):
        raise TypeError(f"{type(task).__name__} is not an engine.loop.Task; subclass it")
    missing = [a for a in Task.REQUIRED if getattr(task, a, None) is None]
    if missing:
        raise TypeError(f"task {type(task).__name__} does not set {', '.join(missing)} (engine.loop.Task.REQUIRED); "
                        f"set them before building the TrainLoop")


class TrainLoop:
    def __init__(self, task: Task, ls: LoopSettings, resume_meta: Optional[dict] = None):
        check_task(task)
        self.task, self.ls = task, ls
        self.acc, self.optimizer, self.run_dir = task.accelerator, task.optimizer, task.run_dir
        self.world = self.acc.num_processes
        self.steps_per_epoch = len(task.loader)
        self.total_steps = ls.epochs * self.steps_per_epoch
        self.stop_at = ls.stop_at_step or self.total_steps
        self.params = [p for p in task.model.parameters() if p.requires_grad]
        self.norms = GradNorms(task.unwrapped, self.params)
        st = ls.stability
        self.events = RunEvents(self.norms.names, st.spike_factor, st.spike_window, st.spike_min_history,
                                st.dip_drop, monitor=task.dip_metric is not None,
                                dip_metric=task.dip_metric or "knn_top1")
        self.guard = Guard(resolve_host_reads(ls.host_reads, self.acc), task.unwrapped, self.optimizer, self.acc,
                           task.snapshot_modules(), st.nonfinite_patience)
        self.step = 0
        if resume_meta is not None:
            self.step = resume_meta["step"]
            if "events" in resume_meta:
                self.events.load(resume_meta["events"])
            self.guard.load(resume_meta)
        self.sched: Dict[str, float] = {}
        self.skipped = torch.zeros((), device=self.acc.device)
        self.tb = None
        self.progress = None

    # --- the outline ---------------------------------------------------------------------------------------------
    def run(self) -> str:
        """Train to the end (or train.stop_at_step); returns the final status: finished or stopped."""
        self._cut_logs(self.step)
        self.tb = _Scalars(self.acc)
        self._log_guard()
        self.write_summary("running")
        self.guard.start()
        try:
            while self.step < self.stop_at:
                epoch = self.step // self.steps_per_epoch
                skip = self.step - epoch * self.steps_per_epoch
                outcome, sums, t_epoch = self._epoch(epoch, skip)
                if outcome == "rolled_back":
                    continue
                if outcome == "stopped":  # mid-epoch (train.stop_at_step)
                    break
                self._end_epoch(epoch, skip, sums, t_epoch)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        return self._finish()

    def _epoch(self, epoch: int, skip: int):
        """One epoch's steps from ``skip``; returns (rolled_back | stopped | done, sums, start time)."""
        t = self.task
        batches = epoch_batches(self.acc, t.loader, t.dataset, epoch, skip)
        t.model.train()
        bs = self.ls.batch_size
        self.progress = tqdm(total=self.steps_per_epoch * bs, initial=skip * bs, unit="img", unit_scale=True,
                             desc=f"{self.ls.desc} {epoch + 1}/{self.ls.epochs}",
                             disable=not self.acc.is_main_process, dynamic_ncols=True)
        self.sums = dict(loss=0.0, grad_norm=0.0, n=0)
        self.skipped = torch.zeros((), device=self.acc.device)
        t_epoch = self.t_log = time.time()
        self.last_logged = self.step
        result = "done"
        try:
            for batch in batches:
                outcomes = self.train_step(batch, epoch)
                self.progress.update(bs)
                if outcomes is None:
                    continue
                # any() stops at an outcome that rolled back: the ones after it belong to the undone steps
                rolled_back = any(self._handle(o, epoch) for o in outcomes)
                self.guard.end_window(rolled_back)
                if rolled_back:
                    result = "rolled_back"
                    break
                if self.ls.save_every_steps and self.step % self.ls.save_every_steps == 0:
                    self.save(False)
                if self.step >= self.stop_at:
                    break
        finally:
            self.progress.close()
        if result == "done" and self.step != (epoch + 1) * self.steps_per_epoch:
            result = "stopped"
        return result, self.sums, t_epoch

    # --- one step --------------------------------------------------------------------------------------------------
    def schedule(self, step: int) -> Dict[str, float]:
        ls = self.ls
        lr_t = self.events.lr_scale * schedules.warmup_cosine(step, self.total_steps, ls.warmup_steps, ls.lr,
                                                              ls.min_lr)
        wd_t = schedules.cosine(step, self.total_steps, ls.weight_decay, ls.weight_decay_end)
        return dict(lr=lr_t, wd=wd_t, **self.task.extra_schedule(step, self.total_steps))

    def _read_point(self) -> bool:
        s, ls = self.step, self.ls
        return (s % ls.log_every == 0 or s >= self.stop_at or s % self.steps_per_epoch == 0
                or bool(ls.save_every_steps and s % ls.save_every_steps == 0))

    def train_step(self, batch, epoch: int) -> Optional[List[Outcome]]:
        """One step of the loop on ``batch``: the task's inputs, the scheduled values, forward / backward /
        clipping, the guard's optimizer step (and the task's ``after_applied`` when it is applied). Returns the
        guard's outcomes at a read point, else None. The package's one training step (tools/bench_pretrain.py
        times this very function)."""
        t = self.task
        inputs, n_bad = t.prepare(batch, epoch)
        self.sched = sched = self.schedule(self.step)
        schedules.set_group_values(self.optimizer, sched["lr"], sched["wd"])
        self.guard.before_step()
        loss, gvec = compute_gradients(t.model, self.optimizer, self.acc, self.params, t.loss_fn(inputs),
                                       t.step_settings, self.norms)
        if self.world > 1:  # every process must take the same decision: a non-finite loss anywhere counts
            loss = self.acc.reduce(loss, "mean")
        vec = torch.cat([loss.float().view(1), gvec.float()])
        self.step += 1
        self.skipped += n_bad.sum()
        return self.guard.submit(self.step, vec, sched, self._read_point(), t.after_applied)

    def _handle(self, o: Outcome, epoch: int) -> bool:
        """One step's outcome: events, counts and the step log; True when it rolled the run back."""
        loss_v, gn, layer_v = o.values[0], o.values[1], o.values[2:]
        verdict = self.guard.judge(o)
        if verdict in (SKIPPED, ROLL_BACK):
            self.events.nonfinite(o.step, loss_v, gn)
            log.warning("step %d: non-finite loss %s / gradient norm %s; step %s (%d in a row)", o.step, loss_v, gn,
                        "undone" if self.guard.deferred else "skipped", self.guard.streak)
            if verdict == ROLL_BACK:
                self._roll_back(o.step)
                return True
            return False
        if o.status == "overflow":
            self.events.overflow()
        if verdict != APPLIED:  # overflow, undone or ignored: the state did not move, a streak goes on
            return False
        for ev in self.events.observe(o.step, loss_v, gn, layer_v):
            log.warning("step %d: %s", o.step, describe(ev))
        self.sums["loss"] += loss_v
        self.sums["grad_norm"] += gn
        self.sums["n"] += 1
        self.progress.set_postfix(loss=f"{loss_v:.4f}", lr=f"{o.sched['lr']:.3g}", refresh=False)
        if o.step % self.ls.log_every == 0 or o.step == self.stop_at:
            self._log_step(o, epoch)
        return False

    def _log_step(self, o: Outcome, epoch: int) -> None:
        now = time.time()
        row = dict(step=o.step, epoch=epoch, loss=o.values[0], **o.sched, grad_norm=o.values[1],
                   images_per_s=(o.step - self.last_logged) * self.ls.batch_size / max(now - self.t_log, 1e-9),
                   peak_mem_mb=logs.peak_memory_mb(self.acc.device),
                   layer_grad_norm=dict(zip(self.norms.names, o.values[2:])))
        self.t_log, self.last_logged = now, o.step
        if self.acc.is_main_process:
            logs.append_jsonl(os.path.join(self.run_dir, "steps.jsonl"), row)
            self.tb.scalars("train", row, o.step, o.step * self.ls.batch_size)

    # --- epoch end, checkpoints, summary ---------------------------------------------------------------------------
    def _end_epoch(self, epoch: int, skip: int, sums: Dict, t_epoch: float) -> None:
        seconds = time.time() - t_epoch
        n_skipped = int(self.acc.reduce(self.skipped, "sum").item())
        n, bs, counts = sums["n"], self.ls.batch_size, self.events.counts
        row = dict(epoch=epoch + 1, step=self.step, loss=sums["loss"] / n if n else None,
                   grad_norm=sums["grad_norm"] / n if n else None, **self.sched,
                   images_per_s=(self.steps_per_epoch - skip) * bs / max(seconds, 1e-9),
                   peak_mem_mb=logs.peak_memory_mb(self.acc.device), skipped_images=n_skipped, seconds=seconds,
                   **{k: counts[k] for k in ("grad_spikes", "nonfinite_steps", "rollbacks")})
        row.update(self.task.epoch_end(epoch, self.step))
        metric = self.task.dip_metric
        if metric is not None and row.get(metric) is not None:
            for ev in self.events.observe_dip(self.step, epoch + 1, row[metric]):
                log.warning("epoch %d: %s", epoch + 1, describe(ev))
            row[self.events.dip_key] = counts[self.events.dip_key]
        if n_skipped:
            log.warning("epoch %d: skipped %d unreadable images (see the warnings above)", epoch + 1, n_skipped)
        log.info("%s %d/%d  loss %s  lr %.3g%s  %.1f img/s  peak mem %.0f MB%s", self.ls.desc, epoch + 1,
                 self.ls.epochs, "-" if row["loss"] is None else f"{row['loss']:.4f}", row["lr"],
                 f"  m {row['momentum']:.4f}" if "momentum" in row else "", row["images_per_s"], row["peak_mem_mb"],
                 self.task.epoch_note(row))
        if self.acc.is_main_process:
            logs.append_jsonl(os.path.join(self.run_dir, "log.jsonl"), row)
            self.tb.scalars("epoch", row, self.step, self.step * self.ls.batch_size)
        if (epoch + 1) % max(self.ls.save_every, 1) == 0 or epoch + 1 == self.ls.epochs:
            self.save(True)

    def meta(self, epoch_done: bool) -> Dict:
        return dict(step=self.step, epoch=self.step // self.steps_per_epoch, epochs_done=epoch_done,
                    steps_per_epoch=self.steps_per_epoch, config=self.task.config, derived=self.task.derived,
                    events=strict_json(self.events.state()), **self.guard.state())

    def write_summary(self, status: str, **extra) -> None:
        if self.acc.is_main_process:
            write_json(os.path.join(self.run_dir, "summary.json"),
                            self.events.summary(status, self.step, self.total_steps,
                                                dict(world_size=self.world, **extra)))

    def save(self, epoch_done: bool) -> str:
        # during a streak of non-finite steps the checkpoint a rollback would return to is kept from the rotation
        path = ckpt.save_checkpoint(self.acc, self.run_dir, self.meta(epoch_done), self.ls.keep_checkpoints,
                                    extra=self.task.checkpoint_extra(), protect=self.guard.protected(self.run_dir))
        self.write_summary("running", checkpoint=os.path.basename(path))
        return path

    def _cut_logs(self, step: int) -> None:
        """log.jsonl and steps.jsonl cut back to ``step``: the logs never hold steps a resumed run repeats."""
        if self.acc.is_main_process:
            for f in ("log.jsonl", "steps.jsonl"):
                logs.truncate_jsonl(os.path.join(self.run_dir, f), step)

    def _roll_back(self, at_step: int) -> None:
        """The guard's rollback (``Guard.roll_back``), then the task's extra state, the logs and the step counter
        back at the checkpoint's step."""
        back = self.guard.roll_back(self.acc, self.run_dir, at_step, self.events, self.ls.stability,
                                    self.ls.optim_key, lambda: self.write_summary("diverged"))
        self.task.load_extra(back["path"])
        self._cut_logs(back["step"])
        self.write_summary("running")
        self.step = back["step"]

    def _interrupted(self) -> None:
        if self.progress is not None:
            self.progress.close()
        # host_reads=log: the steps since the last read point are checked before anything is saved; a window with a
        # non-finite step is undone as at a read point, so a checkpoint never holds unchecked steps
        pending = self.guard.flush()
        if pending:
            epoch = (self.step - 1) // self.steps_per_epoch
            self.guard.end_window(any(self._handle(o, epoch) for o in pending))
        if self.world == 1 and self.step > 0:
            path = self.save(False)
            log.warning("interrupted at step %d; saved %s (continue with %s=auto output_dir=%s)", self.step, path,
                        self.ls.resume_key, self.run_dir)
        self.write_summary("interrupted")

    def _finish(self) -> str:
        if self.step < self.total_steps:
            latest = ckpt.latest_checkpoint(self.run_dir)
            if latest is None or ckpt.read_meta(latest)["step"] != self.step:
                self.save(False)
            status = "stopped"
            log.info("stopped at step %d of %d (train.stop_at_step); continue with %s=auto output_dir=%s", self.step,
                     self.total_steps, self.ls.resume_key, self.run_dir)
        else:
            status = "finished"
        self.write_summary(status)
        c = self.events.counts
        if c["grad_spikes"] or c["nonfinite_steps"] or c.get(self.events.dip_key):
            log.info("instability: %s (summary.json)", ", ".join(f"{k} {v}" for k, v in c.items()))
        return status

    def close(self, figure: Optional[Callable[[str], str]] = None) -> None:
        """``figure(run_dir)`` on the main process (the task's curves PNG: the engine draws nothing itself), then
        every process done; call after the task's own end-of-run work."""
        if self.acc.is_main_process and figure is not None:
            log.info("curves: %s", figure(self.run_dir))
        self.acc.wait_for_everyone()

    def _log_guard(self) -> None:
        st, ev = self.ls.stability, self.events
        log.info("non-finite guard: skip such steps, roll back after %d in a row (lr x%g, at most %d times); spikes: "
                 "> %g x the median of the previous %d steps; %s dips: > %g points below the best%s",
                 st.nonfinite_patience, st.rollback_lr_factor, st.max_rollbacks, st.spike_factor, st.spike_window,
                 ev.dip_metric, st.dip_drop, f"; lr x{ev.lr_scale:g} after {ev.counts['rollbacks']} rollbacks"
                 if ev.counts["rollbacks"] else "")


def describe(ev: dict) -> str:
    if ev["kind"] == "grad_spike":
        return (f"gradient-norm spike {ev['grad_norm']:.3g} (median {ev['median']:.3g}), first in "
                f"{ev['first_layer']}")
    if ev["kind"] == "loss_spike":
        return f"loss spike {ev['loss']:.4g} (median {ev['median']:.4g})"
    return f"{ev['metric']} dip to {ev['value']:.2f} (best so far {ev['best']:.2f})"


class _Scalars:
    """The run's scalars to its trackers (``engine.tracking``; ``accelerator.log``, main process only): each value
    under ``<prefix>/<key>`` against the step, per-layer values under ``<prefix>/<key>/<layer>``, and the images
    seen (step x global batch) as ``<prefix>/images_seen``. TensorBoard also gets each value under
    ``by_images/<prefix>/<key>`` against the images seen, where runs with different batch sizes overlay (wandb and
    MLflow plot against ``images_seen`` instead: their steps must only increase). run_task's
    ``accelerator.end_training()`` closes the trackers."""

    def __init__(self, accelerator):
        self.acc = accelerator

    def scalars(self, prefix: str, row: dict, step: int, images: int):
        if not self.acc.trackers:
            return
        values, by_images = {f"{prefix}/images_seen": images}, {}
        for k, v in row.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)):
                values[f"{prefix}/{k}"] = v
                by_images[f"by_images/{prefix}/{k}"] = v
            elif isinstance(v, dict):  # per-layer values: one chart per layer under <prefix>/<key>/
                values.update({f"{prefix}/{k}/{kk}": vv for kk, vv in v.items()})
        self.acc.log(values, step=step)
        for t in self.acc.trackers:
            if t.name == "tensorboard":
                t.log(by_images, step=images)
