"""Gradient clipping modes: global L2 norm, the first layer's norm only (MoCo v3: the patch projection, where the
instability starts), or Adaptive Gradient Clipping (NFNets, Brock et al. 2021).

AGC clips each unit (a row of the weight: an output channel of a conv or Linear; the whole tensor for ndim <= 1)
so that ||g_unit|| / max(||w_unit||, eps) <= lambda; it is timm's ``adaptive_clip_grad``. Both unscale fp16
gradients first (through Accelerate) and return the global gradient norm before clipping, for the logs.
"""
from typing import Callable, List, Optional

import torch
from timm.utils.agc import adaptive_clip_grad

CLIP_MODES = ("norm", "first_layer", "agc")
AGC_EPS = 1e-3  # NFNets' eps on the weight norm


def clip_gradients(accelerator, optimizer, params: List[torch.Tensor], mode: str, threshold: float,
                   first_layer: Optional[List[torch.Tensor]] = None,
                   norms: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
    """Clip the gradients of ``params`` in place; ``threshold`` is the max global norm (norm), the max norm of the
    ``first_layer`` parameters alone (first_layer: every other gradient is left as it is) or lambda (agc);
    0 = no clipping. Returns the global gradient norm before clipping (a tensor: no host sync); with ``norms`` (a
    function returning the global norm followed by per-layer norms, see engine.telemetry) returns its vector."""
    accelerator.unscale_gradients(optimizer)  # fp16: once per step, before any norm is taken
    if norms is not None:
        vec = norms()
        total = vec[0]
    else:
        vec = total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if threshold > 0:
        if mode == "agc":
            adaptive_clip_grad(params, clip_factor=threshold, eps=AGC_EPS)
        elif mode == "first_layer":
            torch.nn.utils.clip_grad_norm_(first_layer, threshold)
        else:
            torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], threshold, total)
    return vec
