"""Sharpness-aware minimisation as two passes around any optimizer of the table (SPEC section 4).

SAM (Foret et al. 2021): after the first backward at w, move to w + e with e = rho * g / ||g|| (global L2 norm),
take the gradient there, move back to w, and let the base optimizer step with that gradient. ASAM (Kwon et al.
2021, ``adaptive``): e = rho * w^2 g / ||w g||, elementwise. Both are invariant to a gradient scale, so they work
on the still-scaled gradients of fp16 loss scaling; a non-finite gradient norm leaves the weights unperturbed (the
scaler then skips the step). The base optimizer keeps all the state, so checkpoints and resume are unchanged.
"""
import contextlib
from typing import List, Optional

import torch
from torch import nn


@torch.no_grad()
def sam_perturb(params: List[torch.Tensor], rho: float, adaptive: bool = False,
                eps: float = 1e-12) -> List[Optional[torch.Tensor]]:
    """Move each parameter with a gradient to w + e in place; returns copies of the original weights (None where
    nothing moved), so that :func:`sam_restore` puts back w exactly, not w + e - e."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return [None] * len(params)
    scaled = [p.grad * p.abs() if adaptive else p.grad for p in with_grad]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s.float()) for s in scaled]))
    # decided on the device, not read on the host (a read per step would stall a GPU): a non-finite norm moves
    # nothing (e = 0 where the norm is not finite)
    finite = torch.isfinite(norm)
    scale = torch.where(finite, rho / (norm + eps), torch.zeros_like(norm))
    saved = {}
    for p, s in zip(with_grad, scaled):
        saved[id(p)] = p.detach().clone()
        e = (s * p.abs() if adaptive else s) * scale.to(s.dtype)
        p.add_(torch.where(finite, e, torch.zeros_like(e)))
    return [saved.get(id(p)) for p in params]


@torch.no_grad()
def sam_restore(params: List[torch.Tensor], saved: List[Optional[torch.Tensor]]) -> None:
    """Undo :func:`sam_perturb`: w + e -> w."""
    for p, w in zip(params, saved):
        if w is not None:
            p.copy_(w)


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm running statistics stay as they are inside (SAM's second forward must not update them twice):
    momentum 0 makes running = running; the batch statistics still normalise the batch."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
