"""Fine-tuning (downstream transfer): the whole network trained on a labelled dataset.

DeiT / ResNet-RS knobs through timm: any optimizer of the registry (the fine-tune optimizer is a BOCB axis too),
linear warmup + cosine per step, layer-wise lr decay for ViTs, drop-path, label smoothing, Mixup / CutMix,
RandAugment, and an optional EMA of the weights. Checkpoints and resume work as in pretraining.
"""
import logging
import math
import os
import time
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
from tqdm.auto import tqdm

from ..analysis.plots import training_curves
from ..config import save as save_config
from ..config import scaled_lr, to_dict
from ..data import build_dataset, eval_transform, norm_stats
from ..engine import checkpoint as ckpt
from ..engine import logs
from ..engine import epoch_batches, make_accelerator
from ..engine.step import StepSettings, train_step
from ..errors import UserError
from ..models.backbones import create_from_spec
from ..optim import build_optimizer, group_summary, param_groups, record, resolve, schedules
from .features import load_eval_backbone
from .linear import evaluate
from .metrics import check_writable, result_path, write_metrics
from .stages import count_classes, output_folder

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


def run_finetune(cfg) -> Dict:
    fc, oc = cfg.finetune, cfg.finetune.optim
    t0 = time.time()
    out_dir = finetune_folder(cfg)
    metrics_path = result_path(out_dir, "finetune")
    resume_path = ckpt.resolve_resume(fc.resume, out_dir)
    resuming = resume_path is not None
    restart = logs.restarting(out_dir, fc.resume, resuming)  # killed before its first checkpoint: start again
    if not resuming:
        check_writable(metrics_path, cfg.overwrite)
    logs.check_run_dir(out_dir, resuming or restart, cfg.overwrite, resume_key="finetune.resume")
    accelerator = make_accelerator(cfg, seed=cfg.seed, precision_key="mixed_precision")
    logs.setup_logging(accelerator.is_main_process)
    set_seed(cfg.seed)

    world = accelerator.num_processes
    if fc.batch_size % world:
        raise UserError(f"finetune.batch_size={fc.batch_size} does not divide by the {world} processes")
    per_device = fc.batch_size // world
    use_mix = (fc.mixup > 0 or fc.cutmix > 0) and fc.mixup_prob > 0
    if use_mix and per_device % 2:
        raise UserError(f"Mixup / CutMix need an even batch per process, got {per_device}; change "
                        f"finetune.batch_size or set finetune.mixup_prob=0")
    mean, std = norm_stats(cfg.data)
    train_tf = create_transform(cfg.data.image_size, is_training=True, auto_augment=fc.randaugment or None,
                                mean=mean, std=std, interpolation="bicubic")
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train_tf, seed=cfg.seed)
    test_ds = build_dataset(cfg.data, cfg.data.test_split, eval_transform(cfg.data), seed=cfg.seed,
                            subset=cfg.test_subset)
    num_classes = count_classes(train_ds, test_ds)
    if len(train_ds) < fc.batch_size:
        raise UserError(f"{len(train_ds)} training images are fewer than one batch of {fc.batch_size}; lower "
                        f"finetune.batch_size")
    model, info = build_finetune_model(cfg, num_classes)
    family = model.ssl_bocb_spec["family"]
    resolved = resolve(oc, "finetune.optim")
    settings = StepSettings.from_cfg(oc, resolved.entry, cfg.mixed_precision, "finetune.optim", backbone=model)
    lr = scaled_lr(resolved.base_lr, fc.batch_size, resolved.lr_scaling)
    groups = finetune_param_groups(model, oc, resolved.weight_decay, fc.layer_decay, family)
    optimizer = build_optimizer(groups, resolved, lr)
    summary = group_summary(optimizer.param_groups)
    optimizer_record = record(optimizer, resolved, lr)
    train_loader = DataLoader(train_ds, batch_size=per_device, shuffle=True, drop_last=True,
                              num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    test_loader = DataLoader(test_ds, batch_size=max(per_device, 64), shuffle=False, num_workers=cfg.data.num_workers)
    ema = ModelEmaV3(model, decay=fc.ema_decay) if fc.ema_decay > 0 else None
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    if ema is not None:  # checkpointed as ema.safetensors (not through Accelerate's pickled custom states)
        ema.to(accelerator.device)
    mixup = Mixup(mixup_alpha=fc.mixup, cutmix_alpha=fc.cutmix, prob=fc.mixup_prob,
                  label_smoothing=fc.label_smoothing, num_classes=num_classes) if use_mix else None
    soft_ce = SoftTargetCrossEntropy()

    steps_per_epoch = len(train_loader)
    total = fc.epochs * steps_per_epoch
    warmup = int(round(fc.warmup_epochs * steps_per_epoch))
    wd = resolved.weight_decay
    wd_end = wd if oc.weight_decay_end is None else oc.weight_decay_end
    derived = dict(lr=lr, world_size=world, per_device_batch=per_device, steps_per_epoch=steps_per_epoch,
                   total_steps=total, warmup_steps=warmup, num_classes=num_classes, train_images=len(train_ds),
                   test_images=len(test_ds), source=info,
                   param_groups=summary, optimizer=optimizer_record)
    step = 0
    if resume_path:  # before anything is written: a checkpoint that does not fit fails cleanly
        ckpt.check_same_optimizer(ckpt.read_meta(resume_path), derived, resume_path)
        step = ckpt.load_checkpoint(accelerator, resume_path)["step"]
        if ema is not None:
            state = ckpt.load_extra(resume_path, "ema")
            if state is None:
                raise UserError(f"checkpoint '{resume_path}' holds no EMA weights (ema.safetensors) but "
                                f"finetune.ema_decay={fc.ema_decay}; resume with the ema_decay it was trained with")
            ema.load_state_dict(state)
    if accelerator.is_main_process:
        logs.claim_run_dir(out_dir, resuming or restart, cfg.overwrite)
        if restart:
            logs.clear_run_logs(out_dir)
        save_config(cfg, os.path.join(out_dir, "config.yaml"), derived)
    accelerator.wait_for_everyone()
    logs.setup_logging(accelerator.is_main_process, os.path.join(out_dir, "train.log"))
    log.info("fine-tune %s (%s) on %s: %d classes, %d train / %d test images", info["backbone"], info["init"],
             cfg.data.name, num_classes, len(train_ds), len(test_ds))
    log.info("optimizer %s lr %g (base %g), wd %g, options %s, %d epochs (%d warmup steps), layer decay %s",
             resolved.entry.name, lr, resolved.base_lr, wd, optimizer_record["options"], fc.epochs, warmup,
             fc.layer_decay if family == "vit" else "off (CNN)")

    if resume_path:
        log.info("resumed from %s at step %d", resume_path, step)
    if accelerator.is_main_process:
        logs.truncate_jsonl(os.path.join(out_dir, "log.jsonl"), step)
    params = [p for p in model.parameters() if p.requires_grad]
    unwrapped = accelerator.unwrap_model(model)
    row = {}
    for epoch in range(step // steps_per_epoch, fc.epochs):
        skip = step - epoch * steps_per_epoch
        batches = epoch_batches(accelerator, train_loader, train_ds, epoch, skip)
        model.train()
        bar = tqdm(total=steps_per_epoch * fc.batch_size, initial=skip * fc.batch_size, unit="img", unit_scale=True,
                   desc=f"fine-tune {epoch + 1}/{fc.epochs}", disable=not accelerator.is_main_process,
                   dynamic_ncols=True)
        t_epoch, loss_sum, grad_sum, n = time.time(), 0.0, 0.0, 0
        for x, y, _ in batches:
            lr_t = schedules.warmup_cosine(step, total, warmup, lr, lr * oc.min_lr_ratio)
            wd_t = schedules.cosine(step, total, wd, wd_end)
            schedules.set_group_values(optimizer, lr_t, wd_t)
            if mixup is not None:
                x, y_soft = mixup(x, y)

            def loss_fn():
                with accelerator.autocast():
                    logits = model(x).float()
                if mixup is not None:
                    return soft_ce(logits, y_soft)
                return F.cross_entropy(logits, y, label_smoothing=fc.label_smoothing)
            loss, grad_norm = train_step(model, optimizer, accelerator, params, loss_fn, settings)
            step += 1
            if ema is not None:
                ema.update(unwrapped, step=step)
            if not math.isfinite(loss.item()):
                raise UserError(f"fine-tuning diverged (loss {loss.item()} at step {step}); lower "
                                f"finetune.optim.base_lr or set finetune.optim.grad_clip")
            loss_sum += loss.item()
            grad_sum += float(grad_norm) if grad_norm is not None else float("nan")
            n += 1
            bar.update(fc.batch_size)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr_t:.3g}", refresh=False)
        bar.close()
        seconds = time.time() - t_epoch
        res = evaluate(model, test_loader, accelerator)
        row = dict(epoch=epoch + 1, step=step, loss=loss_sum / max(n, 1), grad_norm=grad_sum / max(n, 1), lr=lr_t,
                   wd=wd_t, top1=res["top1"],
                   top5=res["top5"], images_per_s=n * fc.batch_size / max(seconds, 1e-9),
                   peak_mem_mb=logs.peak_memory_mb(accelerator.device), seconds=seconds)
        if ema is not None:
            e = evaluate(ema.module, test_loader, accelerator)
            row.update(ema_top1=e["top1"], ema_top5=e["top5"])
        log.info("fine-tune epoch %d/%d  loss %.4f  top-1 %.2f  top-5 %.2f%s", epoch + 1, fc.epochs, row["loss"],
                 row["top1"], row["top5"], f"  EMA top-1 {row['ema_top1']:.2f}" if ema is not None else "")
        if accelerator.is_main_process:
            logs.append_jsonl(os.path.join(out_dir, "log.jsonl"), row)
        if (epoch + 1) % max(fc.save_every, 1) == 0 or epoch + 1 == fc.epochs:
            ckpt.save_checkpoint(accelerator, out_dir, dict(step=step, epoch=epoch + 1, config=to_dict(cfg),
                                                             derived=derived), keep=1,
                                 extra=None if ema is None else {"ema": ema.state_dict()})
    history = logs.read_jsonl(os.path.join(out_dir, "log.jsonl"))
    final = history[-1] if history else row
    protocol = dict(to_dict(fc), lr=lr, train_transform=repr(train_tf), eval_transform=repr(eval_transform(cfg.data)),
                    schedule="linear warmup + cosine per step", test_subset=cfg.test_subset)
    metrics = {"stage": "finetune", "top1": float(final["top1"]), "top5": float(final["top5"]),
               "dataset": cfg.data.name, "split": cfg.data.test_split, "num_train": len(train_ds),
               "num_test": len(test_ds), "checkpoint": info["checkpoint"], "backbone": info["backbone"],
               "init": info["init"], "protocol": protocol, "seconds": time.time() - t0, "epochs": fc.epochs,
               "best_top1": max(r["top1"] for r in history) if history else float(final["top1"])}
    if ema is not None:
        metrics.update(ema_top1=float(final["ema_top1"]), ema_top5=float(final["ema_top5"]))
    if accelerator.is_main_process:
        write_metrics(metrics_path, metrics, overwrite=True)  # checked before training started
        log.info("wrote %s and %s", metrics_path, training_curves(out_dir))
    accelerator.wait_for_everyone()
    return metrics
