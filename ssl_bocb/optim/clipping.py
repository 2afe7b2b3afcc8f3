"""Gradient clipping modes: global L2 norm, the first layer's norm only (MoCo v3: the patch projection, where the
instability starts), or Adaptive Gradient Clipping (NFNets, Brock et al. 2021).

AGC clips each unit (a row of the weight: an output channel of a conv or Linear; the whole tensor for ndim <= 1)
so that ||g_unit|| / max(||w_unit||, eps) <= lambda; it is timm's ``adaptive_clip_grad``. Both unscale fp16
gradients first (through Accelerate) and return the global gradient norm before clipping, for the logs.
"""
import math
from typing import List, Optional

import torch
from timm.utils.agc import adaptive_clip_grad

CLIP_MODES = ("norm", "first_layer", "agc")
AGC_EPS = 1e-3  # NFNets' eps on the weight norm


def clip_gradients(accelerator, optimizer, params: List[torch.Tensor], mode: str, threshold: float,
                   first_layer: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
    """Clip the gradients of ``params`` in place; ``threshold`` is the max global norm (norm), the max norm of the
    ``first_layer`` parameters alone (first_layer: every other gradient is left as it is) or lambda (agc);
    0 = no clipping. Returns the global gradient norm before clipping (a tensor: no host sync)."""
    if mode == "agc" and threshold > 0:
        accelerator.unscale_gradients(optimizer)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        adaptive_clip_grad(params, clip_factor=threshold, eps=AGC_EPS)
        return norm
    if mode == "first_layer" and threshold > 0:
        accelerator.unscale_gradients(optimizer)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        torch.nn.utils.clip_grad_norm_(first_layer, threshold)
        return norm
    return accelerator.clip_grad_norm_(params, threshold if threshold > 0 else math.inf)
