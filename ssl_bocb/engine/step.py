"""One optimisation step, in small named pieces: the loss, Sophia's Hessian pass, SAM's second pass, clipping and
the optimizer step. Pretraining and fine-tuning share it; each passes a closure that computes its loss (the tasks'
own losses live with them, in ``ssl_bocb.tasks``)."""
import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..errors import UserError
from ..optim import clip_gradients, frozen_bn_stats, sam_perturb, sam_restore
from ..optim.hessian import average_gradients_keeping_graph


@dataclass
class StepSettings:
    clip_mode: str = "norm"
    clip: float = 0.0
    sam_rho: float = 0.0
    sam_adaptive: bool = False
    hessian: bool = False       # the optimizer reads a Hessian estimate from the gradients' graph (Sophia)
    first_layer: Optional[List[torch.Tensor]] = None  # what clip_mode=first_layer clips

    @classmethod
    def from_cfg(cls, optim_cfg, entry, mixed_precision: str, where: str = "optim",
                 backbone: Optional[nn.Module] = None) -> "StepSettings":
        if entry.hessian and mixed_precision == "fp16":
            raise UserError(f"{where}.name={entry.name} estimates the Hessian from the gradients, which fp16 loss "
                            f"scaling distorts; use mixed precision bf16 or no")
        if entry.hessian and optim_cfg.sam.rho > 0:
            raise UserError(f"{where}.name={entry.name} with SAM ({where}.sam.rho > 0) is not supported; choose one")
        first = None
        if optim_cfg.grad_clip_mode == "first_layer" and optim_cfg.grad_clip > 0:
            from ..models.backbones import first_layer_parameters
            first = first_layer_parameters(backbone)
            if not first:
                raise UserError(f"{where}.grad_clip_mode=first_layer clips the first layer (the patch projection), "
                                f"which is frozen here (model.frozen_patch_embed=true); choose one of the two")
        return cls(optim_cfg.grad_clip_mode, optim_cfg.grad_clip, optim_cfg.sam.rho, optim_cfg.sam.adaptive,
                   entry.hessian, first)


class ChunkedLoss:
    """One step's loss as query chunks (``train.query_chunks``): ``chunks`` are closures, each returning its chunk's
    share of the full-batch loss (the shares add up to it); :func:`compute_gradients` runs backward after each."""

    def __init__(self, chunks: List[Callable[[], torch.Tensor]]):
        self.chunks = chunks


def hessian_due(optimizer, settings: StepSettings) -> bool:
    """True when the optimizer updates its Hessian estimate at this step (SophiaH: every update_period steps of
    its own counter, so fp16 skips or a resume cannot shift it)."""
    if not settings.hessian:
        return False
    inner = getattr(optimizer, "optimizer", optimizer)
    done = inner.param_groups[0].get("step", 0)
    return int(done) % getattr(inner, "update_period", 1) == 0


def hessian_pass(double: bool):
    """Context for a forward whose gradients will be differentiated again: the fused attention kernels have no
    double backward, the math kernel has."""
    return sdpa_kernel(SDPBackend.MATH) if double else contextlib.nullcontext()


def compute_gradients(model: nn.Module, optimizer, accelerator, params, loss_fn: Callable[[], torch.Tensor],
                      settings: StepSettings, norms: Optional[Callable[[], torch.Tensor]] = None):
    """Forward, backward (SAM's second pass, Sophia's graph) and clipping, without the optimizer step. Returns
    (loss at the current weights, gradient norm before clipping) as tensors; with ``norms`` the second is the vector
    of the global norm and the per-layer norms (engine.telemetry.GradNorms)."""
    chunks = getattr(loss_fn, "chunks", None)
    if chunks is not None:
        return _chunked_gradients(model, optimizer, accelerator, params, chunks, settings, norms)
    double = hessian_due(optimizer, settings)
    # DDP's reducer cannot all-reduce gradients that carry a graph: a Hessian step runs forward and backward
    # without its sync and averages the gradients itself, keeping each process's graph (optim.hessian)
    own_sync = double and accelerator.num_processes > 1
    with accelerator.no_sync(model) if own_sync else contextlib.nullcontext():
        with hessian_pass(double):
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # create_graph's note on a grad <-> parameter reference cycle: zero_grad(set_to_none) breaks it
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            accelerator.backward(loss, create_graph=double)
    if own_sync:
        average_gradients_keeping_graph(params)
    if settings.sam_rho > 0:
        sam_second_pass(model, optimizer, accelerator, params, loss_fn, settings)
    grad_norm = clip_gradients(accelerator, optimizer, params, settings.clip_mode, settings.clip,
                               settings.first_layer, norms)
    return loss.detach(), grad_norm


def _chunked_gradients(model, optimizer, accelerator, params, chunks, settings: StepSettings, norms):
    """Backward after each query chunk, gradients accumulating; DDP all-reduces once, after the last chunk. Clipping
    acts on the accumulated gradient. Returns what :func:`compute_gradients` returns, the loss being the sum of the
    chunks' shares: the full batch's."""
    optimizer.zero_grad(set_to_none=True)
    total = None
    for i, loss_fn in enumerate(chunks):
        last = i == len(chunks) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = loss_fn()
            accelerator.backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    grad_norm = clip_gradients(accelerator, optimizer, params, settings.clip_mode, settings.clip,
                               settings.first_layer, norms)
    return total, grad_norm


def sam_second_pass(model, optimizer, accelerator, params, loss_fn, settings: StepSettings) -> None:
    """SAM: the gradient at w + e replaces the gradient at w; the weights return to w before the step, and BN
    running statistics are not updated a second time."""
    perturbation = sam_perturb(params, settings.sam_rho, settings.sam_adaptive)
    optimizer.zero_grad(set_to_none=True)
    with frozen_bn_stats(model):
        loss = loss_fn()
    accelerator.backward(loss)
    sam_restore(params, perturbation)
