"""Fine-tuning (downstream transfer): the whole network trained on a labelled dataset.

DeiT / ResNet-RS knobs through timm: any optimizer of the registry (the fine-tune optimizer is a BOCB axis too),
linear warmup + cosine per step, layer-wise lr decay for ViTs, drop-path, label smoothing, Mixup / CutMix,
RandAugment, and an optional EMA of the weights. The run is a task of the one training loop (``engine.loop``),
so it has pretraining's non-finite guard and rollback, per-layer gradient telemetry with spike events, dips of the
validation top-1, steps.jsonl, summary.json, TensorBoard, checkpoints and exact resume.
"""
import logging
import os
from typing import Dict

import timm
import timm.optim
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from ..config import to_dict
from ..data import build_dataset, eval_transform, norm_stats
from ..data.pipeline import num_workers, worker_options
from ..analysis.plots import training_curves
from ..engine import checkpoint as ckpt
from ..engine import logs
from ..engine.loop import LoopSettings, Task, TrainLoop
from ..engine.run import RunSpec, run_task
from ..engine.setup import log_optimizer, seed_process_streams
from ..engine.step import StepSettings
from ..errors import UserError
from ..eval.features import load_eval_backbone
from ..eval.linear import evaluate
from ..eval.metrics import check_writable, result_path, write_metrics
from ..eval.stages import count_classes, output_folder
from ..models.backbones import create_from_spec
from ..optim import build_optimizer, group_summary, param_groups, record, resolve
from ..optim.schedules import scaled_lr

log = logging.getLogger(__name__)


def finetune_folder(cfg) -> str:
    if cfg.output_dir:
        return cfg.output_dir
    return os.path.join(output_folder(cfg), f"finetune-{cfg.data.name}")


def build_finetune_model(cfg, num_classes: int):
    """The evaluated backbone, rebuilt with drop-path and a fresh classifier of ``num_classes``."""
    backbone, info = load_eval_backbone(cfg.checkpoint, cfg.model)
    spec = backbone.ssl_bocb_spec
    kwargs = {k: v for k, v in spec["timm_kwargs"].items() if k != "drop_path_rate"}
    if cfg.finetune.drop_path > 0:
        kwargs["drop_path_rate"] = cfg.finetune.drop_path
    try:
        model = create_from_spec(dict(spec, frozen_patch_embed=False, timm_kwargs=kwargs))
    except TypeError as e:
        raise UserError(f"{spec['timm_name']} does not take drop_path_rate ({e}); set finetune.drop_path=0") from None
    model.load_state_dict(backbone.state_dict())
    model.reset_classifier(num_classes)
    if cfg.finetune.train_pos_embed and getattr(model, "pos_embed", None) is not None:
        model.pos_embed.requires_grad_(True)  # DeiT-style transfer trains it, sin-cos init included
    return model, info


def finetune_param_groups(model, optim_cfg, weight_decay: float, layer_decay: float, family: str):
    if family == "vit" and layer_decay < 1.0:
        # timm's layer-decay groups exclude ndim <= 1 tensors and no_weight_decay() names from decay
        groups = timm.optim.param_groups_layer_decay(model, weight_decay=weight_decay,
                                                     no_weight_decay_list=model.no_weight_decay(),
                                                     layer_decay=layer_decay)
        for g in groups:
            g["wd_scale"] = 1.0 if g["weight_decay"] > 0 else 0.0
            g["trust_ratio"] = optim_cfg.trust_ratio_policy == "all" or all(p.ndim > 1 for p in g["params"])
            g["group_name"] = f"layer_scale_{g['lr_scale']:.3f}_{'decay' if g['weight_decay'] else 'no_decay'}"
        return groups
    groups = param_groups(model, weight_decay, optim_cfg.weight_decay_policy, optim_cfg.trust_ratio_policy)
    for g in groups:
        g["lr_scale"] = 1.0
    return groups


class FinetuneTask(Task):
    """Supervised fine-tuning of a (pretrained) backbone as a task of the training loop."""
    dip_metric = "top1"

    def __init__(self, cfg, accelerator, run_dir: str):
        fc, oc = cfg.finetune, cfg.finetune.optim
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, run_dir
        world = accelerator.num_processes
        if fc.batch_size % world:
            raise UserError(f"finetune.batch_size={fc.batch_size} does not divide by the {world} processes")
        per_device = fc.batch_size // world
        use_mix = (fc.mixup > 0 or fc.cutmix > 0) and fc.mixup_prob > 0
        if use_mix and per_device % 2:
            raise UserError(f"Mixup / CutMix need an even batch per process, got {per_device}; change "
                            f"finetune.batch_size or set finetune.mixup_prob=0")
        mean, std = norm_stats(cfg.data)
        self.train_tf = create_transform(cfg.data.image_size, is_training=True, auto_augment=fc.randaugment or None,
                                         mean=mean, std=std, interpolation="bicubic")
        self.dataset = build_dataset(cfg.data, cfg.data.train_split, self.train_tf, seed=cfg.seed)
        test_ds = build_dataset(cfg.data, cfg.data.test_split, eval_transform(cfg.data), seed=cfg.seed,
                                subset=cfg.test_subset)
        num_classes = count_classes(self.dataset, test_ds)
        if len(self.dataset) < fc.batch_size:
            raise UserError(f"{len(self.dataset)} training images are fewer than one batch of {fc.batch_size}; lower "
                            f"finetune.batch_size")
        model, self.info = build_finetune_model(cfg, num_classes)
        family = model.ssl_bocb_spec["family"]
        self.family = family
        self.resolved = resolve(oc, "finetune.optim")
        self.step_settings = StepSettings.from_cfg(oc, self.resolved.entry, cfg.mixed_precision, "finetune.optim",
                                                   backbone=model)
        self.lr = scaled_lr(self.resolved.base_lr, fc.batch_size, self.resolved.lr_scaling)
        groups = finetune_param_groups(model, oc, self.resolved.weight_decay, fc.layer_decay, family)
        optimizer = build_optimizer(groups, self.resolved, self.lr)
        self.groups = group_summary(optimizer.param_groups)
        self.optimizer_record = record(optimizer, self.resolved, self.lr)
        train_loader = DataLoader(self.dataset, batch_size=per_device, shuffle=True, drop_last=True,
                                  generator=torch.Generator().manual_seed(cfg.seed),
                                  **worker_options(num_workers(cfg.data)))
        test_loader = DataLoader(test_ds, batch_size=max(per_device, 64), shuffle=False,
                                 **worker_options(num_workers(cfg.data)))
        self.ema = ModelEmaV3(model, decay=fc.ema_decay) if fc.ema_decay > 0 else None
        self.model, self.optimizer, self.loader, self.test_loader = accelerator.prepare(model, optimizer,
                                                                                        train_loader, test_loader)
        seed_process_streams(accelerator, cfg.seed)
        if self.ema is not None:  # checkpointed as ema.safetensors (not through Accelerate's pickled custom states)
            self.ema.to(accelerator.device)
        self.mixup = Mixup(mixup_alpha=fc.mixup, cutmix_alpha=fc.cutmix, prob=fc.mixup_prob,
                           label_smoothing=fc.label_smoothing, num_classes=num_classes) if use_mix else None
        self.soft_ce = SoftTargetCrossEntropy()
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.config = to_dict(cfg)
        steps_per_epoch = len(self.loader)
        self.derived = dict(lr=self.lr, world_size=world, per_device_batch=per_device,
                            steps_per_epoch=steps_per_epoch, total_steps=fc.epochs * steps_per_epoch,
                            warmup_steps=int(round(fc.warmup_epochs * steps_per_epoch)), num_classes=num_classes,
                            train_images=len(self.dataset), test_images=len(test_ds), source=self.info,
                            param_groups=self.groups, optimizer=self.optimizer_record)

    def loop_settings(self) -> LoopSettings:
        fc, oc, wd = self.cfg.finetune, self.cfg.finetune.optim, self.resolved.weight_decay
        return LoopSettings(
            epochs=fc.epochs, batch_size=fc.batch_size, lr=self.lr, warmup_steps=self.derived["warmup_steps"],
            min_lr=self.lr * oc.min_lr_ratio, weight_decay=wd,
            weight_decay_end=wd if oc.weight_decay_end is None else oc.weight_decay_end, log_every=fc.log_every,
            save_every=fc.save_every, stability=fc.stability, keep_checkpoints=1, host_reads=fc.host_reads,
            desc="fine-tune", optim_key="finetune.optim", resume_key="finetune.resume")

    def resume(self, path: str, meta: dict) -> None:
        """Check that the checkpoint fits this run, then load it (and its EMA). A fine-tune may be resumed with more
        epochs (its cosine is then stretched from the step it resumes at), so the schedule is not checked."""
        ckpt.check_same_optimizer(meta, self.derived, path)
        ckpt.load_checkpoint(self.accelerator, path)
        self.load_extra(path)

    # --- the loop's hooks ------------------------------------------------------------------------------------------
    def prepare(self, batch, epoch: int):
        x, y, n_bad = batch
        y_soft = None
        if self.mixup is not None:
            x, y_soft = self.mixup(x, y)
        return (x, y, y_soft), n_bad

    def loss_fn(self, inputs):
        x, y, y_soft = inputs
        fc = self.cfg.finetune

        def loss_fn():
            with self.accelerator.autocast():
                logits = self.model(x).float()
            if y_soft is not None:
                return self.soft_ce(logits, y_soft)
            return F.cross_entropy(logits, y, label_smoothing=fc.label_smoothing)
        return loss_fn

    def after_applied(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.unwrapped, step=step)

    def epoch_end(self, epoch: int, step: int) -> Dict:
        res = evaluate(self.model, self.test_loader, self.accelerator)
        out = dict(top1=res["top1"], top5=res["top5"])
        if self.ema is not None:
            e = evaluate(self.ema.module, self.test_loader, self.accelerator)
            out.update(ema_top1=e["top1"], ema_top5=e["top5"])
        return out

    def epoch_note(self, row: Dict) -> str:
        return (f"  top-1 {row['top1']:.2f}  top-5 {row['top5']:.2f}"
                + (f"  EMA top-1 {row['ema_top1']:.2f}" if "ema_top1" in row else ""))

    def snapshot_modules(self):
        return [] if self.ema is None else [self.ema]

    def checkpoint_extra(self):
        return None if self.ema is None else {"ema": self.ema.state_dict()}

    def load_extra(self, path: str) -> None:
        if self.ema is None:
            return
        state = ckpt.load_extra(path, "ema")
        if state is None:
            raise UserError(f"checkpoint '{path}' holds no EMA weights (ema.safetensors) but "
                            f"finetune.ema_decay={self.cfg.finetune.ema_decay}; resume with the ema_decay it was "
                            f"trained with")
        self.ema.load_state_dict(state)

    def log_setup(self, folder, loop: TrainLoop) -> None:
        cfg, ls = self.cfg, loop.ls
        log.info("fine-tune %s (%s) on %s: %d classes, %d train / %d test images", self.info["backbone"],
                 self.info["init"], cfg.data.name, self.derived["num_classes"], len(self.dataset),
                 self.derived["test_images"])
        log_optimizer(self.resolved, self.lr, cfg.finetune.batch_size, ls.weight_decay, ls.weight_decay_end,
                      self.optimizer_record, self.groups, self.step_settings)
        log.info("%d epochs (%d warmup steps), layer decay %s", cfg.finetune.epochs, ls.warmup_steps,
                 cfg.finetune.layer_decay if self.family == "vit" else "off (CNN)")
        if folder.resuming:
            log.info("resumed from %s at step %d", folder.resume_path, loop.step)

    def finish(self, status: str, loop: TrainLoop, seconds: float) -> Dict:
        """The metrics of the last epoch, written to finetune_metrics.json (its path was checked before training)."""
        metrics = self.metrics(seconds)
        path = result_path(self.run_dir, "finetune")
        if self.accelerator.is_main_process:
            write_metrics(path, metrics, overwrite=True)
            log.info("wrote %s", path)
        return metrics

    def metrics(self, seconds: float) -> Dict:
        cfg, fc = self.cfg, self.cfg.finetune
        history = logs.read_jsonl(os.path.join(self.run_dir, "log.jsonl"))
        final = history[-1]
        protocol = dict(to_dict(fc), lr=self.lr, train_transform=repr(self.train_tf),
                        eval_transform=repr(eval_transform(cfg.data)), schedule="linear warmup + cosine per step",
                        test_subset=cfg.test_subset)
        out = {"stage": "finetune", "top1": float(final["top1"]), "top5": float(final["top5"]),
               "dataset": cfg.data.name, "split": cfg.data.test_split, "num_train": len(self.dataset),
               "num_test": self.derived["test_images"], "checkpoint": self.info["checkpoint"],
               "backbone": self.info["backbone"], "init": self.info["init"], "protocol": protocol,
               "seconds": seconds, "epochs": fc.epochs, "best_top1": max(r["top1"] for r in history)}
        if self.ema is not None:
            out.update(ema_top1=float(final["ema_top1"]), ema_top5=float(final["ema_top5"]))
        return out


def run_finetune(cfg) -> Dict:
    """Fine-tune (or resume fine-tuning) the evaluated backbone; returns the metrics written to
    <output>/finetune_metrics.json."""
    out_dir = finetune_folder(cfg)

    def writable(folder) -> None:
        if not folder.resuming:
            check_writable(result_path(out_dir, "finetune"), cfg.overwrite)

    def build(accelerator, run_dir):
        set_seed(cfg.seed)
        return FinetuneTask(cfg, accelerator, run_dir)
    spec = RunSpec(cfg.finetune.resume, out_dir, out_dir, cfg.overwrite, cfg, cfg.seed,
                   precision_key="mixed_precision", resume_key="finetune.resume", check=writable)
    return run_task(build, cfg, spec, training_curves)
