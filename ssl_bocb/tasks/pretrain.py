"""MoCo v3 pretraining on Accelerate: the same code on one CPU, one GPU, or many processes and nodes.

``pretrain`` builds the pretraining task (two-view data, the MoCo model with its momentum encoder, the optimizer)
and hands it to the one training loop (``engine.loop``); what is MoCo's own is here: the two views, the
momentum schedule and the momentum encoder's update, the symmetric contrastive loss (whole or in query chunks),
the kNN monitor (an epoch-end hook), the export.
"""
import logging
import os
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from .. import config as config_mod
from .. import dist
from ..data.pipeline import two_view_data
from ..device import machine_name, use_channels_last, use_compile
from ..analysis.plots import training_curves
from ..engine import checkpoint as ckpt
from ..engine import logs
from ..engine.loop import LoopSettings, Task, TrainLoop, check_same_schedule
from ..engine.run import RunSpec, run_task
from ..engine.setup import log_optimizer, seed_process_streams
from ..engine.step import ChunkedLoss, StepSettings
from ..errors import UserError
from ..losses import contrastive_loss, contrastive_loss_rows
from ..models import build_moco, export_backbone
from ..optim import group_summary, optimizer_from_cfg, record, resolve
from ..optim import schedules

log = logging.getLogger(__name__)


def moco_loss_fn(model, unwrapped, accelerator, x1, x2, temperature: float) -> Callable[[], torch.Tensor]:
    """Closure of the symmetric MoCo v3 loss ctr(q1, k2) + ctr(q2, k1): encoders under autocast, the loss in
    fp32. The keys come from the momentum encoder (without one, m = 0: the base encoder's projector outputs under
    stop-gradient) on the first call and are reused after (SAM's second pass: the keys are not perturbed)."""
    keys = []

    def loss_fn():
        with accelerator.autocast():
            q1, q2, z1, z2 = model(x1, x2)
            if not keys:
                if unwrapped.has_momentum_encoder:
                    keys.extend((unwrapped.forward_momentum(x1), unwrapped.forward_momentum(x2)))
                else:
                    keys.extend((z1.detach(), z2.detach()))
        k1, k2 = keys
        return contrastive_loss(q1, k2, temperature) + contrastive_loss(q2, k1, temperature)
    return loss_fn


def moco_chunked_loss_fn(model, unwrapped, accelerator, x1, x2, temperature: float, chunks: int) -> ChunkedLoss:
    """The MoCo v3 loss of :func:`moco_loss_fn` with the queries in ``chunks`` chunks. On the first chunk every key of
    the batch is computed (the momentum encoder, chunk by chunk, no gradient), normalised and gathered across the
    processes once; each chunk then computes its queries and its rows of both directions against all keys."""
    n = x1.shape[0]
    bounds = [(i * n // chunks, (i + 1) * n // chunks) for i in range(chunks)]
    keys = []
    offset = n * dist.rank()

    def all_keys():
        if not keys:
            with accelerator.autocast():
                k1 = torch.cat([unwrapped.forward_momentum(x1[a:b]) for a, b in bounds])
                k2 = torch.cat([unwrapped.forward_momentum(x2[a:b]) for a, b in bounds])
            keys.extend(dist.gather_nograd(F.normalize(k.float(), dim=1)) for k in (k1, k2))
        return keys

    def chunk(a: int, b: int):
        def loss_fn():
            k1, k2 = all_keys()
            with accelerator.autocast():
                q1, q2, _, _ = model(x1[a:b], x2[a:b])
            return (contrastive_loss_rows(q1, k2, temperature, offset + a, n)
                    + contrastive_loss_rows(q2, k1, temperature, offset + a, n))
        return loss_fn
    return ChunkedLoss([chunk(a, b) for a, b in bounds])


def check_query_chunks(cfg, per_device: int) -> int:
    """``train.query_chunks``, checked against the batch and the settings it cannot serve."""
    k = cfg.train.query_chunks
    if k == 1:
        return 1
    if per_device % k:
        raise UserError(f"train.query_chunks={k} does not divide the per-process batch of {per_device}; choose a "
                        f"divisor of {per_device}")
    if cfg.optim.sam.rho > 0:
        raise UserError(f"train.query_chunks={k} with SAM (optim.sam.rho > 0) is not supported: SAM's second pass "
                        f"would need every chunk again; use train.query_chunks=1 or optim.sam.rho=0")
    if resolve(cfg.optim).entry.hessian:
        raise UserError(f"train.query_chunks={k} with optim.name={cfg.optim.name} is not supported: its Hessian "
                        f"estimate needs the whole batch's graph at once; use train.query_chunks=1")
    if cfg.moco.momentum <= 0:
        raise UserError(f"train.query_chunks={k} needs the momentum encoder for the keys (moco.momentum > 0); "
                        f"without it the keys are the queries' own projections: use train.query_chunks=1")
    return k


def data_path_note(kind: str, device, loader) -> str:
    workers = getattr(loader, "num_workers", 0)
    return {"batched": f"batched (decoded uint8 images, both views cut and augmented batch-wise on {device})",
            "crops": f"crops ({workers} DataLoader workers decode and crop to uint8, colour batch-wise on {device})",
            "dali": f"dali ({workers} DataLoader workers read the files, DALI decodes and crops on {device}, colour "
                    f"batch-wise there)",
            "pil": f"PIL ({workers} DataLoader workers)"}[kind]


class PretrainTask(Task):
    """MoCo v3 (Chen et al. 2021, Alg. 1) as a task of the training loop."""

    def __init__(self, cfg: DictConfig, accelerator, run_dir: str):
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, run_dir
        world = accelerator.num_processes
        if cfg.train.batch_size % world:
            raise UserError(f"train.batch_size={cfg.train.batch_size} does not divide by the {world} processes; "
                            f"choose a multiple of {world}")
        per_device = cfg.train.batch_size // world
        self.query_chunks = check_query_chunks(cfg, per_device)
        set_seed(cfg.seed)
        self.data = two_view_data(cfg.data, cfg.seed, accelerator.device)
        self.dataset = self.data.dataset
        if len(self.dataset) < cfg.train.batch_size:
            raise UserError(f"the {cfg.data.name} training set has {len(self.dataset)} images, fewer than one batch "
                            f"of {cfg.train.batch_size}; lower train.batch_size or raise data.subset")
        # The loader's own generator keeps iterator creation from drawing on the global RNG (which drop-path uses
        # and checkpoints restore), so a resumed run continues the exact random stream.
        loader = DataLoader(self.dataset, batch_size=per_device, shuffle=True, drop_last=True,
                            pin_memory=accelerator.device.type == "cuda",
                            generator=torch.Generator().manual_seed(cfg.seed), **self.data.loader_kwargs)
        model = self._model(world)
        self.resolved = resolve(cfg.optim)
        self.step_settings = StepSettings.from_cfg(cfg.optim, self.resolved.entry, cfg.train.mixed_precision,
                                                   backbone=model.backbone)
        self.channels_last = use_channels_last(cfg.train.channels_last, model.backbone, accelerator.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.compiled = use_compile(cfg.train.compile, accelerator.device)
        if self.compiled:
            if self.step_settings.hessian:
                raise UserError(f"train.compile=true with optim.name={cfg.optim.name}: its Hessian estimate needs a "
                                f"double backward, which compiled graphs do not give; set train.compile=false")
            for part in model.children():  # in place: parameter names, checkpoints and exports stay as they are
                part.compile()
        self.lr = schedules.scaled_lr(self.resolved.base_lr, cfg.train.batch_size, self.resolved.lr_scaling)
        optimizer = optimizer_from_cfg(model, cfg.optim, self.lr, self.resolved)
        self.groups = group_summary(optimizer.param_groups)
        self.optimizer_record = record(optimizer, self.resolved, self.lr)
        self.model, self.optimizer, self.loader = accelerator.prepare(model, optimizer, loader)
        seed_process_streams(accelerator, cfg.seed)
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.config = config_mod.to_dict(cfg)
        self.derived = self._derived(per_device)
        self._first_momentum_update()
        self.monitor = None
        if cfg.monitor.knn_every > 0:
            from ..eval.monitor import KnnMonitor
            self.monitor = KnnMonitor(cfg, accelerator)
            self.dip_metric = "knn_top1"

    def _model(self, world: int) -> nn.Module:
        model = build_moco(self.cfg.model, momentum_encoder=self.cfg.moco.momentum > 0)
        if world > 1 and self.cfg.train.sync_bn:
            if self.accelerator.device.type == "cpu":
                log.warning("SyncBatchNorm needs GPU processes (torch DDP); on CPU each process normalises its own "
                            "shard of the batch")
            else:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def _derived(self, per_device: int) -> Dict:
        cfg, steps_per_epoch = self.cfg, len(self.loader)
        total_steps = cfg.train.epochs * steps_per_epoch
        warmup_steps = int(round(cfg.train.warmup_epochs * steps_per_epoch))
        if warmup_steps > total_steps:
            log.warning("train.warmup_epochs=%g is longer than the run (%d epochs): the lr never reaches its peak",
                        cfg.train.warmup_epochs, cfg.train.epochs)
        return dict(lr=self.lr, world_size=self.accelerator.num_processes, per_device_batch=per_device,
                    query_chunks=self.query_chunks, query_chunk_size=per_device // self.query_chunks,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup_steps=warmup_steps,
                    train_images=len(self.dataset), data_pipeline=self.data.kind,
                    mixed_precision=self.accelerator.mixed_precision, channels_last=self.channels_last,
                    compile=self.compiled, param_groups=self.groups, optimizer=self.optimizer_record,
                    backbone=self.unwrapped.backbone.ssl_bocb_spec, machine=machine_name(self.accelerator.device))

    def loop_settings(self) -> LoopSettings:
        cfg, wd = self.cfg, self.resolved.weight_decay
        return LoopSettings(
            epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, lr=self.lr,
            warmup_steps=self.derived["warmup_steps"], min_lr=self.lr * cfg.optim.min_lr_ratio, weight_decay=wd,
            weight_decay_end=wd if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end,
            log_every=cfg.train.log_every, save_every=cfg.train.save_every, stability=cfg.stability,
            save_every_steps=cfg.train.save_every_steps, keep_checkpoints=cfg.train.keep_checkpoints,
            stop_at_step=cfg.train.stop_at_step, host_reads=cfg.train.host_reads, desc="epoch")

    def resume(self, path: str, meta: dict) -> None:
        """Check that the checkpoint fits this run, then load it (weights, optimizer, scaler, RNG states)."""
        ckpt.check_same_optimizer(meta, self.derived, path)
        check_same_schedule(meta, self.derived, path)
        was = meta.get("derived", {}).get("data_pipeline", "pil")
        if was != self.data.kind:
            log.warning("the checkpoint was trained with the %s data path, this run uses %s: the remaining steps see "
                        "other augmentations (set data.pipeline=%s for an exact continuation)", was, self.data.kind,
                        was)
        ckpt.load_checkpoint(self.accelerator, path)
        self._catch_up_momentum(meta)

    def load_extra(self, path: str) -> None:
        """After a rollback: a checkpoint of the older format is brought to the current one."""
        self._catch_up_momentum(ckpt.read_meta(path))

    # --- the momentum encoder --------------------------------------------------------------------------------------
    def _momentum_update(self, step: int) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q with the momentum scheduled for ``step``."""
        if self.unwrapped.has_momentum_encoder:
            self.unwrapped.update_momentum(self.extra_schedule(step, self.derived["total_steps"])["momentum"])

    def _first_momentum_update(self) -> None:
        """MoCo v3 updates the key encoder before step 0's keys too (two equal copies then; the update only rounds).
        A resumed run's checkpoint replaces it."""
        self._momentum_update(0)

    def _catch_up_momentum(self, meta: dict) -> None:
        """Checkpoints written before the update moved to after each step (they carry ``last_step_applied``) hold the
        key encoder before the next step's update: it is done here, so that they continue exactly."""
        if meta.get("last_step_applied", False):
            self._momentum_update(meta["step"])

    # --- the loop's hooks ------------------------------------------------------------------------------------------
    def prepare(self, batch, epoch: int):
        x1, x2, n_bad = self.data.views(batch, epoch)
        if self.channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
            x2 = x2.contiguous(memory_format=torch.channels_last)
        return (x1, x2), n_bad

    def extra_schedule(self, step: int, total_steps: int) -> Dict[str, float]:
        m = self.cfg.moco
        return dict(momentum=schedules.momentum(step, total_steps, m.momentum, m.momentum_schedule)
                    if self.unwrapped.has_momentum_encoder else 0.0)

    def after_applied(self, step: int) -> None:
        """The momentum encoder's EMA, once per applied optimizer step, with the momentum of the step to come.

        MoCo v3 (Alg. 1) updates the key encoder at the start of each iteration, before its keys. Done right after
        the step before instead, the sequence of updates is the same, a checkpoint holds the key encoder the next
        step will use, and a skipped or undone step skips its update with nothing else to track. The update before
        the very first step is done when the task is built (:meth:`_first_momentum_update`)."""
        self._momentum_update(step)

    def loss_fn(self, inputs):
        x1, x2 = inputs
        if self.query_chunks > 1:
            return moco_chunked_loss_fn(self.model, self.unwrapped, self.accelerator, x1, x2,
                                        self.cfg.moco.temperature, self.query_chunks)
        return moco_loss_fn(self.model, self.unwrapped, self.accelerator, x1, x2, self.cfg.moco.temperature)

    def epoch_end(self, epoch: int, step: int) -> Dict:
        every = self.cfg.monitor.knn_every
        if self.monitor is None or not ((epoch + 1) % every == 0 or epoch + 1 == self.cfg.train.epochs):
            return {}
        top1 = self.monitor(self.unwrapped.backbone)
        self.model.train()
        return dict(knn_top1=top1)

    def epoch_note(self, row: Dict) -> str:
        return f"  kNN top-1 {row['knn_top1']:.2f}" if "knn_top1" in row else ""

    def finish(self, status: str, loop: TrainLoop, seconds: float) -> str:
        """A finished run exports its backbone (backbone.safetensors + backbone.json); returns the run folder."""
        if status == "finished" and self.accelerator.is_main_process:
            export_backbone(self.unwrapped.backbone, self.run_dir, extra=dict(pretrain_step=loop.step))
            log.info("exported %s", os.path.join(self.run_dir, "backbone.safetensors"))
        return self.run_dir

    def log_setup(self, folder, loop: TrainLoop) -> None:
        cfg, acc, world = self.cfg, self.accelerator, self.accelerator.num_processes
        log.info("device %s x %d processes, mixed precision %s, %s memory format%s", acc.device, world,
                 acc.mixed_precision, "channels-last" if self.channels_last else "contiguous",
                 ", torch.compile" if self.compiled else "")
        log.info("backbone %s (%d features), %d training images, global batch %d (%d per process)",
                 cfg.model.backbone, self.unwrapped.backbone.num_features, len(self.dataset), cfg.train.batch_size,
                 self.derived["per_device_batch"])
        log.info("data path: %s", data_path_note(self.data.kind, acc.device, self.loader))
        ls = loop.ls
        log_optimizer(self.resolved, self.lr, cfg.train.batch_size, ls.weight_decay, ls.weight_decay_end,
                      self.optimizer_record, self.groups, self.step_settings)
        if not self.unwrapped.has_momentum_encoder:
            log.info("moco.momentum=0: no momentum encoder; keys are the base encoder's projector outputs, "
                     "stop-gradient")
        d = self.derived
        log.info("%d steps per epoch, %d total, %d warmup", d["steps_per_epoch"], d["total_steps"], d["warmup_steps"])
        if folder.resuming:
            log.info("resumed from %s at step %d (epoch %d)", folder.resume_path, loop.step,
                     loop.step // d["steps_per_epoch"])
            saved_world = folder.meta.get("derived", {}).get("world_size", world)
            if saved_world != world:
                log.info("the checkpoint was written by %d processes, this run has %d: the epoch's remaining images "
                         "are the same (the global order and batches do not depend on the process count); "
                         "per-process random streams (drop-path) of processes the checkpoint did not have start "
                         "afresh", saved_world, world)
        elif folder.restart:
            log.info("resume=auto found no checkpoint in %s: started again from step 0 (earlier logs cleared)",
                     folder.path)


def pretrain(cfg: DictConfig, name: str = "run") -> str:
    """Run (or resume) MoCo v3 pretraining; returns the run folder."""
    def same_model(folder) -> None:
        if folder.resuming:
            ckpt.check_same_model(folder.meta, config_mod.to_dict(cfg.model), folder.resume_path)
    spec = RunSpec(cfg.resume, cfg.output_dir, logs.default_run_dir(name), cfg.overwrite, cfg.train, cfg.seed,
                   check=same_model)
    return run_task(lambda acc, run_dir: PretrainTask(cfg, acc, run_dir), cfg, spec, training_curves)
