"""MoCo v3 pretraining on Accelerate: the same code on one CPU, one GPU, or many processes and nodes."""
import logging
import math
import os
import time
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import config as config_mod
from ..analysis.plots import training_curves
from ..data import order_seed
from ..data.pipeline import two_view_data
from ..device import resolve_precision, use_channels_last, use_compile
from ..errors import UserError
from ..models import build_moco, export_backbone
from ..optim import group_summary, optimizer_from_cfg, record, resolve
from ..optim import schedules
from . import checkpoint as ckpt
from . import logs
from .step import StepSettings, compute_gradients, guarded_step, moco_loss_fn, resolve_host_reads
from .telemetry import BufferSnapshot, GradNorms, RunEvents, StateSnapshot, strict_json

log = logging.getLogger(__name__)


def make_accelerator(train_cfg, seed: int = 0, precision_key: str = "train.mixed_precision") -> Accelerator:
    """Accelerate decides the device; the seedable sampler makes each epoch's order a function of
    (seed, epoch), so a resumed run continues the same permutation, and different seeds never share an order."""
    # Several processes on a machine with no accelerator (torchrun / accelerate launch --multi_gpu on a CPU box)
    # need Accelerate's CPU mode to form a gloo process group instead of running as independent copies.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = train_cfg.cpu or (launched and not torch.accelerator.is_available())
    if not launched:  # one process may run several stages (quickstart, tests), each with its own settings
        AcceleratorState._reset_state(reset_partial_state=True)
    # the device first (Accelerate's process state decides it), then the precision that suits it
    precision = resolve_precision(train_cfg.mixed_precision, PartialState(cpu=cpu).device, precision_key)
    try:
        return Accelerator(mixed_precision=precision, cpu=cpu,
                           dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                                     data_seed=order_seed(seed)))
    except ValueError as e:
        raise UserError(f"{precision_key}={precision} cannot run here ({e}); use auto, bf16 or no on CPU") from None


def epoch_batches(accelerator, loader, dataset, epoch: int, skip: int):
    """The batches of ``epoch``, less the first ``skip`` already trained (resume). The sampler's order and every
    image's augmentation are functions of the epoch, so a resumed epoch continues where it stopped."""
    dataset.set_epoch(epoch)
    loader.set_epoch(epoch)
    return accelerator.skip_first_batches(loader, skip) if skip else loader


def check_same_schedule(meta: dict, derived: dict, path: str) -> None:
    """A resumed run must cut its epochs into the same global batches: the step counter, the schedules and the
    epoch's remaining images are all read off it. (The number of processes may change; see the README.)"""
    saved = meta.get("derived", {})
    old = (saved.get("steps_per_epoch", meta.get("steps_per_epoch")), saved.get("total_steps"))
    new = (derived["steps_per_epoch"], derived["total_steps"])
    if old[0] is not None and old != new:
        raise UserError(f"checkpoint '{path}' was trained with {old[0]} steps per epoch and {old[1]} steps in all, "
                        f"this config gives {new[0]} and {new[1]}; resume with the train.batch_size, train.epochs and "
                        f"data settings it was trained with, or start a new run")


def _cut_logs(accelerator, run_dir: str, step: int) -> None:
    """log.jsonl and steps.jsonl cut back to ``step``: the logs never hold steps a resumed run repeats."""
    if accelerator.is_main_process:
        for f in ("log.jsonl", "steps.jsonl"):
            logs.truncate_jsonl(os.path.join(run_dir, f), step)


def _roll_back(accelerator, run_dir: str, events: RunEvents, st, step: int, streak: int, first_bad: int,
               write_summary):
    """After ``streak`` non-finite steps in a row, the first at ``first_bad``: back to the newest sound checkpoint
    written before them, with the lr lowered for the rest of the run; or stop with one line when the rollbacks are
    spent or there is no such checkpoint. Returns the new (step, streak, last_applied)."""
    n = events.counts["rollbacks"]
    if n >= st.max_rollbacks:
        write_summary("diverged")
        raise UserError(f"training diverged: {streak} non-finite steps in a row at step {step}, after {n} "
                        f"rollbacks (lr x{events.lr_scale:g}); lower optim.base_lr, set optim.grad_clip, or raise "
                        f"stability.max_rollbacks (checkpoints and summary.json are kept)")
    good = ckpt.newest_sound_checkpoint(run_dir, before_step=first_bad)
    if good is None:
        write_summary("diverged")
        raise UserError(f"training diverged: {streak} non-finite steps in a row at step {step}, before any "
                        f"checkpoint to roll back to; lower optim.base_lr, set optim.grad_clip, or set "
                        f"train.save_every_steps so that a rollback has a checkpoint to return to")
    back = ckpt.load_checkpoint(accelerator, good)
    events.rollback(step, back["step"], os.path.basename(good), st.rollback_lr_factor)
    log.warning("rolled back from step %d to %s after %d non-finite steps in a row; lr x%g from here on "
                "(rollback %d of at most %d)", step, good, streak, events.lr_scale, n + 1, st.max_rollbacks)
    _cut_logs(accelerator, run_dir, back["step"])
    write_summary("running")
    return back["step"], 0, back.get("last_step_applied", True)


def _describe(ev: dict) -> str:
    if ev["kind"] == "grad_spike":
        return (f"gradient-norm spike {ev['grad_norm']:.3g} (median {ev['median']:.3g}), first in "
                f"{ev['first_layer']}")
    if ev["kind"] == "loss_spike":
        return f"loss spike {ev['loss']:.4g} (median {ev['median']:.4g})"
    return f"kNN dip to {ev['knn_top1']:.2f} (best so far {ev['best']:.2f})"


def _shared_run_dir(cfg: DictConfig, name: str, resume_path: Optional[str]) -> str:
    """The run folder: output_dir, else the resumed checkpoint's run, else runs/<name>-<time> (the main
    process's clock decides, so that every process agrees)."""
    if cfg.output_dir:
        return cfg.output_dir
    if resume_path:
        return os.path.dirname(os.path.dirname(os.path.abspath(resume_path)))
    return logs.default_run_dir(name)


def pretrain(cfg: DictConfig, name: str = "run") -> str:
    """Run (or resume) MoCo v3 pretraining; returns the run folder."""
    resume_path = ckpt.resolve_resume(cfg.resume, cfg.output_dir)
    if cfg.resume and cfg.resume != "auto" and resume_path is None:
        raise UserError(f"nothing to resume at '{cfg.resume}'")
    run_dir = _shared_run_dir(cfg, name, resume_path)
    accelerator = make_accelerator(cfg.train, seed=cfg.seed)
    run_dir = broadcast_object_list([run_dir])[0] if accelerator.num_processes > 1 else run_dir
    logs.setup_logging(accelerator.is_main_process)
    resuming = resume_path is not None
    # resume=auto on a folder killed before its first checkpoint: nothing to continue, so start it again there
    restart = logs.restarting(run_dir, cfg.resume, resuming)
    logs.check_run_dir(run_dir, resuming or restart, cfg.overwrite)
    meta = None
    if resume_path:
        meta = ckpt.read_meta(resume_path)
        ckpt.check_same_model(meta, config_mod.to_dict(cfg.model), resume_path)

    world = accelerator.num_processes
    if cfg.train.batch_size % world:
        raise UserError(f"train.batch_size={cfg.train.batch_size} does not divide by the {world} processes; "
                        f"choose a multiple of {world}")
    per_device = cfg.train.batch_size // world
    set_seed(cfg.seed)

    data = two_view_data(cfg.data, cfg.seed)
    dataset = data.dataset
    if len(dataset) < cfg.train.batch_size:
        raise UserError(f"the {cfg.data.name} training set has {len(dataset)} images, fewer than one batch of "
                        f"{cfg.train.batch_size}; lower train.batch_size or raise data.subset")
    # The loader's own generator keeps iterator creation from drawing on the global RNG (which drop-path uses
    # and checkpoints restore), so a resumed run continues the exact random stream.
    loader = DataLoader(dataset, batch_size=per_device, shuffle=True, drop_last=True,
                        pin_memory=accelerator.device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed), **data.loader_kwargs)

    model = build_moco(cfg.model, momentum_encoder=cfg.moco.momentum > 0)
    if world > 1 and cfg.train.sync_bn:
        if accelerator.device.type == "cpu":
            log.warning("SyncBatchNorm needs GPU processes (torch DDP); on CPU each process normalises its own "
                        "shard of the batch")
        else:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    resolved = resolve(cfg.optim)
    settings = StepSettings.from_cfg(cfg.optim, resolved.entry, cfg.train.mixed_precision, backbone=model.backbone)
    channels_last = use_channels_last(cfg.train.channels_last, model.backbone, accelerator.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    compiled = use_compile(cfg.train.compile, accelerator.device)
    if compiled:
        if settings.hessian:
            raise UserError(f"train.compile=true with optim.name={cfg.optim.name}: its Hessian estimate needs a double "
                            f"backward, which compiled graphs do not give; set train.compile=false")
        for part in model.children():  # in place: parameter names, checkpoints and exports stay as they are
            part.compile()
    lr = config_mod.scaled_lr(resolved.base_lr, cfg.train.batch_size, resolved.lr_scaling)
    optimizer = optimizer_from_cfg(model, cfg.optim, lr, resolved)
    groups = group_summary(optimizer.param_groups)
    optimizer_record = record(optimizer, resolved, lr)

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(model)
    steps_per_epoch = len(loader)
    total_steps = cfg.train.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.train.warmup_epochs * steps_per_epoch))
    if warmup_steps > total_steps:
        log.warning("train.warmup_epochs=%g is longer than the run (%d epochs): the lr never reaches its peak",
                    cfg.train.warmup_epochs, cfg.train.epochs)
    wd = resolved.weight_decay
    wd_end = wd if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
    derived = dict(lr=lr, world_size=world, per_device_batch=per_device, steps_per_epoch=steps_per_epoch,
                   total_steps=total_steps, warmup_steps=warmup_steps, train_images=len(dataset),
                   data_pipeline=data.kind,
                   mixed_precision=accelerator.mixed_precision, channels_last=channels_last, compile=compiled,
                   param_groups=groups,
                   optimizer=optimizer_record, backbone=unwrapped.backbone.ssl_bocb_spec)

    monitor = None
    if cfg.monitor.knn_every > 0:
        from ..eval.monitor import KnnMonitor
        monitor = KnnMonitor(cfg, accelerator)
    step = 0
    if resume_path:
        ckpt.check_same_optimizer(meta, derived, resume_path)
        check_same_schedule(meta, derived, resume_path)
        was = meta.get("derived", {}).get("data_pipeline", "pil")
        if was != data.kind:
            log.warning("the checkpoint was trained with the %s data path, this run uses %s: the remaining steps see "
                        "other augmentations (set data.pipeline=%s for an exact continuation)", was, data.kind, was)
        ckpt.load_checkpoint(accelerator, resume_path)
        step = meta["step"]

    # nothing is written before this point: bad input fails without touching any folder
    if accelerator.is_main_process:
        logs.claim_run_dir(run_dir, resuming or restart, cfg.overwrite)
        if restart:
            logs.clear_run_logs(run_dir)
    accelerator.wait_for_everyone()
    logs.setup_logging(accelerator.is_main_process, os.path.join(run_dir, "train.log"))
    if accelerator.is_main_process:
        config_mod.save(cfg, os.path.join(run_dir, "config.yaml"), derived)

    log.info("run folder: %s", run_dir)
    log.info("device %s x %d processes, mixed precision %s, %s memory format%s", accelerator.device, world,
             accelerator.mixed_precision, "channels-last" if channels_last else "contiguous",
             ", torch.compile" if compiled else "")
    log.info("backbone %s (%d features), %d training images, global batch %d (%d per process)",
             cfg.model.backbone, unwrapped.backbone.num_features, len(dataset), cfg.train.batch_size, per_device)
    log.info("data path: %s", "batched (decoded uint8 images, both views augmented batch-wise on %s)"
             % accelerator.device if data.kind == "batched" else f"PIL, {cfg.data.num_workers} DataLoader workers")
    log.info("optimizer %s (%s): lr = %g (base_lr %g x %s scaling of batch %d), weight decay %g -> %g; options %s",
             resolved.entry.name, resolved.entry.source, lr, resolved.base_lr, resolved.lr_scaling,
             cfg.train.batch_size, wd, wd_end, optimizer_record["options"])
    for g in groups:
        log.info("param group %-16s %4d tensors %11d params weight_decay %g trust_ratio %s", g["name"], g["tensors"],
                 g["params"], g["weight_decay"], g["trust_ratio"] if resolved.entry.trust_ratio else "n/a")
    if settings.sam_rho > 0:
        log.info("SAM%s rho %g: two forward / backward passes per step", " (adaptive)" if settings.sam_adaptive
                 else "", settings.sam_rho)
    if not unwrapped.has_momentum_encoder:
        log.info("moco.momentum=0: no momentum encoder; keys are the base encoder's projector outputs, stop-gradient")
    if settings.first_layer:
        log.info("gradient clipping: the first layer only (%d tensors), norm <= %g", len(settings.first_layer),
                 settings.clip)
    log.info("%d steps per epoch, %d total, %d warmup", steps_per_epoch, total_steps, warmup_steps)
    if resume_path:
        log.info("resumed from %s at step %d (epoch %d)", resume_path, step, step // steps_per_epoch)
        saved_world = meta.get("derived", {}).get("world_size", world)
        if saved_world != world:
            log.info("the checkpoint was written by %d processes, this run has %d: the epoch's remaining images are "
                     "the same (the global order and batches do not depend on the process count); per-process "
                     "random streams (drop-path) of processes the checkpoint did not have start afresh",
                     saved_world, world)
    elif restart:
        log.info("resume=auto found no checkpoint in %s: started again from step 0 (earlier logs cleared)", run_dir)

    _cut_logs(accelerator, run_dir, step)
    tb = _TensorBoard(run_dir, accelerator.is_main_process)

    params = [p for p in model.parameters() if p.requires_grad]
    norms = GradNorms(unwrapped, params)
    buffers = BufferSnapshot(unwrapped)
    st = cfg.stability
    events = RunEvents(norms.names, st.spike_factor, st.spike_window, st.spike_min_history, st.dip_drop,
                       monitor=monitor is not None)
    streak, last_applied = 0, True  # non-finite steps in a row; whether the last step changed the weights
    first_bad = 0  # the step that began the current streak
    # train.host_reads: "step" reads the loss and norms every step and skips a non-finite step before it is applied;
    # "log" (auto on GPUs) reads them at log / checkpoint / epoch ends only and undoes a window with a non-finite step
    deferred = resolve_host_reads(cfg.train.host_reads, accelerator) == "log"
    pending = []
    snapshot = StateSnapshot(unwrapped, optimizer) if deferred else None
    if resume_path and "events" in meta:
        events.load(meta["events"])
        streak, last_applied = meta.get("nonfinite_streak", 0), meta.get("last_step_applied", True)
        first_bad = meta.get("nonfinite_streak_start", meta["step"] - streak + 1)
    log.info("non-finite guard: skip such steps, roll back after %d in a row (lr x%g, at most %d times); spikes: "
             "> %g x the median of the previous %d steps; kNN dips: > %g points below the best%s",
             st.nonfinite_patience, st.rollback_lr_factor, st.max_rollbacks, st.spike_factor, st.spike_window,
             st.dip_drop, f"; lr x{events.lr_scale:g} after {events.counts['rollbacks']} rollbacks"
             if events.counts["rollbacks"] else "")

    def meta_now(epoch_done):
        return dict(step=step, epoch=step // steps_per_epoch, epochs_done=epoch_done, steps_per_epoch=steps_per_epoch,
                    config=config_mod.to_dict(cfg), derived=derived, events=strict_json(events.state()),
                    nonfinite_streak=streak, nonfinite_streak_start=first_bad, last_step_applied=last_applied)

    def write_summary(status, **extra):
        if accelerator.is_main_process:
            logs.write_json(os.path.join(run_dir, "summary.json"),
                            events.summary(status, step, total_steps, dict(world_size=world, **extra)))

    def save(epoch_done):
        path = ckpt.save_checkpoint(accelerator, run_dir, meta_now(epoch_done), cfg.train.keep_checkpoints)
        write_summary("running", checkpoint=os.path.basename(path))
        return path

    write_summary("running")
    stop_at = cfg.train.stop_at_step or total_steps
    if deferred:
        snapshot.take()
    progress = None
    try:
        while step < stop_at:
            epoch = step // steps_per_epoch
            skip = step - epoch * steps_per_epoch
            batches = epoch_batches(accelerator, loader, dataset, epoch, skip)
            model.train()
            progress = tqdm(total=steps_per_epoch * cfg.train.batch_size, initial=skip * cfg.train.batch_size,
                            unit="img", unit_scale=True, desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                            disable=not accelerator.is_main_process, dynamic_ncols=True)
            sums = dict(loss=0.0, grad_norm=0.0, n=0)
            skipped = torch.zeros((), device=accelerator.device)
            t_epoch = t_log = time.time()
            last_logged, rolled_back = step, False
            for batch in batches:
                x1, x2, n_bad = data.views(batch, epoch)
                if channels_last:
                    x1, x2 = x1.contiguous(memory_format=torch.channels_last), x2.contiguous(
                        memory_format=torch.channels_last)
                lr_t = events.lr_scale * schedules.warmup_cosine(step, total_steps, warmup_steps, lr,
                                                                 lr * cfg.optim.min_lr_ratio)
                wd_t = schedules.cosine(step, total_steps, wd, wd_end)
                m_t = (schedules.momentum(step, total_steps, cfg.moco.momentum, cfg.moco.momentum_schedule)
                       if unwrapped.has_momentum_encoder else 0.0)
                schedules.set_group_values(optimizer, lr_t, wd_t)
                if last_applied:  # EMA first, then the keys (MoCo v3 Alg. 1); once per applied optimizer step
                    unwrapped.update_momentum(m_t)
                if not deferred:
                    buffers.save()
                loss_fn = moco_loss_fn(model, unwrapped, accelerator, x1, x2, cfg.moco.temperature)
                loss, gvec = compute_gradients(model, optimizer, accelerator, params, loss_fn, settings, norms)
                if world > 1:  # every process must take the same decision: a non-finite loss anywhere counts
                    loss = accelerator.reduce(loss, "mean")
                vec = torch.cat([loss.float().view(1), gvec.float()])
                step += 1
                skipped += n_bad.sum()
                progress.update(cfg.train.batch_size)
                if deferred:  # applied now, checked at the next read point: no host read in this step
                    optimizer.step()
                    pending.append((step, vec, (lr_t, wd_t, m_t)))
                    last_applied = True
                    if not (step % cfg.train.log_every == 0 or step >= stop_at or step % steps_per_epoch == 0
                            or (cfg.train.save_every_steps and step % cfg.train.save_every_steps == 0)):
                        continue
                    window, pending = pending, []
                    values = torch.stack([v for _, v, _ in window]).tolist()  # the window's one host read
                    finite = [math.isfinite(v[0]) and math.isfinite(v[1]) for v in values]
                    # the steps after the window's first non-finite one ran on its poisoned update: not counted
                    first = finite.index(False) if not all(finite) else len(finite)
                    outcome = [(s_, v, sc, None if first == len(finite) else
                                "undone" if i < first else "nonfinite" if i == first else "ignored")
                               for i, ((s_, _, sc), v) in enumerate(zip(window, values))]
                else:
                    values = vec.tolist()  # the step's one host read
                    status = guarded_step(optimizer, accelerator, math.isfinite(values[0]), math.isfinite(values[1]))
                    if status == "nonfinite":
                        buffers.restore()  # BatchNorm statistics of a diverging forward would poison later steps
                    outcome = [(step, values, (lr_t, wd_t, m_t), status)]
                for s_, v, (lr_s, wd_s, m_s), status in outcome:
                    loss_v, gn, layer_v = v[0], v[1], v[2:]
                    if status == "ignored":
                        continue
                    if status == "nonfinite":
                        streak = streak + 1
                        first_bad = s_ if streak == 1 else first_bad
                        last_applied = deferred  # a deferred window is restored to its start, EMA included
                        events.nonfinite(s_, loss_v, gn)
                        log.warning("step %d: non-finite loss %s / gradient norm %s; step %s (%d in a row)", s_,
                                    loss_v, gn, "undone" if deferred else "skipped", streak)
                        if streak >= st.nonfinite_patience:
                            step, streak, last_applied = _roll_back(accelerator, run_dir, events, st, s_, streak,
                                                                    first_bad, write_summary)
                            rolled_back = True
                            break
                        continue
                    if status == "overflow":
                        events.overflow()
                        last_applied = False
                        continue
                    streak = 0
                    if status == "undone":  # finite, but in a window whose update was undone
                        continue
                    for ev in events.observe(s_, loss_v, gn, layer_v):
                        log.warning("step %d: %s", s_, _describe(ev))
                    sums["loss"] += loss_v
                    sums["grad_norm"] += gn
                    sums["n"] += 1
                    progress.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr_s:.3g}", refresh=False)
                    if s_ % cfg.train.log_every == 0 or s_ == stop_at:
                        now = time.time()
                        row = dict(step=s_, epoch=epoch, loss=loss_v, lr=lr_s, wd=wd_s, momentum=m_s, grad_norm=gn,
                                   images_per_s=(s_ - last_logged) * cfg.train.batch_size / max(now - t_log, 1e-9),
                                   peak_mem_mb=logs.peak_memory_mb(accelerator.device),
                                   layer_grad_norm=dict(zip(norms.names, layer_v)))
                        t_log, last_logged = now, s_
                        if accelerator.is_main_process:
                            logs.append_jsonl(os.path.join(run_dir, "steps.jsonl"), row)
                            tb.scalars("train", row, s_)
                if deferred:
                    if rolled_back:
                        snapshot.take()
                    elif not all(finite):
                        snapshot.restore()
                        log.warning("steps %d-%d undone: the weights, optimizer state and BatchNorm statistics are "
                                    "those after step %d again", window[0][0], window[-1][0], window[0][0] - 1)
                    else:
                        snapshot.take()
                if rolled_back:
                    break
                if cfg.train.save_every_steps and step % cfg.train.save_every_steps == 0:
                    save(False)
                if step >= stop_at:
                    break
            progress.close()
            if rolled_back:
                continue
            epoch_done = step == (epoch + 1) * steps_per_epoch
            if not epoch_done:  # stopped mid-epoch (train.stop_at_step)
                break
            seconds = time.time() - t_epoch
            n_skipped = int(accelerator.reduce(skipped, "sum").item())
            n = sums["n"]
            row = dict(epoch=epoch + 1, step=step, loss=sums["loss"] / n if n else None,
                       grad_norm=sums["grad_norm"] / n if n else None, lr=lr_t, wd=wd_t, momentum=m_t,
                       images_per_s=(steps_per_epoch - skip) * cfg.train.batch_size / max(seconds, 1e-9),
                       peak_mem_mb=logs.peak_memory_mb(accelerator.device), skipped_images=n_skipped,
                       seconds=seconds, **{k: events.counts[k] for k in ("grad_spikes", "nonfinite_steps",
                                                                          "rollbacks")})
            if monitor is not None and ((epoch + 1) % cfg.monitor.knn_every == 0 or epoch + 1 == cfg.train.epochs):
                row["knn_top1"] = monitor(unwrapped.backbone)
                model.train()
                for ev in events.observe_knn(step, epoch + 1, row["knn_top1"]):
                    log.warning("epoch %d: %s", epoch + 1, _describe(ev))
                row["knn_dips"] = events.counts["knn_dips"]
            if n_skipped:
                log.warning("epoch %d: skipped %d unreadable images (see the warnings above)", epoch + 1, n_skipped)
            log.info("epoch %d/%d  loss %s  lr %.3g  m %.4f  %.1f img/s  peak mem %.0f MB%s", epoch + 1,
                     cfg.train.epochs, "-" if row["loss"] is None else f"{row['loss']:.4f}", lr_t, m_t,
                     row["images_per_s"], row["peak_mem_mb"],
                     f"  kNN top-1 {row['knn_top1']:.2f}" if "knn_top1" in row else "")
            if accelerator.is_main_process:
                logs.append_jsonl(os.path.join(run_dir, "log.jsonl"), row)
                tb.scalars("epoch", row, step)
            if (epoch + 1) % max(cfg.train.save_every, 1) == 0 or epoch + 1 == cfg.train.epochs:
                save(True)
    except KeyboardInterrupt:
        if progress is not None:
            progress.close()
        if world == 1 and step > 0:
            path = save(False)
            log.warning("interrupted at step %d; saved %s (continue with resume=auto output_dir=%s)", step, path,
                        run_dir)
        write_summary("interrupted")
        raise

    if step < total_steps:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None or ckpt.read_meta(latest)["step"] != step:
            save(False)
        write_summary("stopped")
        log.info("stopped at step %d of %d (train.stop_at_step); continue with resume=auto output_dir=%s", step,
                 total_steps, run_dir)
    else:
        write_summary("finished")
    if events.counts["grad_spikes"] or events.counts["nonfinite_steps"] or events.counts["knn_dips"]:
        log.info("instability: %s (summary.json)", ", ".join(f"{k} {v}" for k, v in events.counts.items()))
    if step >= total_steps and accelerator.is_main_process:
        export_backbone(unwrapped.backbone, run_dir, extra=dict(pretrain_step=step))
        log.info("exported %s", os.path.join(run_dir, "backbone.safetensors"))
    if accelerator.is_main_process:
        log.info("curves: %s", training_curves(run_dir))
    accelerator.wait_for_everyone()
    tb.close()
    accelerator.end_training()
    log.info("run folder: %s", run_dir)
    return run_dir


class _TensorBoard:
    """TensorBoard scalars written by the main process (torch.utils.tensorboard)."""

    def __init__(self, run_dir: str, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))

    def scalars(self, prefix: str, row: dict, step: int):
        if self.writer is None:
            return
        for k, v in row.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)):
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
            elif isinstance(v, dict):  # per-layer values: one chart per layer under <prefix>/<key>/
                for kk, vv in v.items():
                    self.writer.add_scalar(f"{prefix}/{k}/{kk}", vv, step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
