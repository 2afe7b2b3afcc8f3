"""Sharpness and activity at a run's final weights (SPEC section 4).

- Top Hessian eigenvalue of the MoCo v3 loss, by power iteration on Hessian-vector products (double backward;
  timm ViTs go through the math attention kernel, which has one). The batch, its augmentations and the start
  vector are fixed by seeds, so the value is reproducible.
- Fraction of activated neurons (ReLU / GELU output > 0) per block of the backbone, on the same batch.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..errors import UserError


def power_iteration(hvp: Callable[[List[torch.Tensor]], List[torch.Tensor]], shapes: Sequence[torch.Tensor],
                    iters: int = 20, tol: float = 1e-3, seed: int = 0) -> Tuple[float, List[float]]:
    """Eigenvalue of largest magnitude of the symmetric operator ``hvp`` (a list of tensors -> a list of tensors
    of the same shapes), by power iteration from a seeded Gaussian start. Stops when the Rayleigh quotient moves
    by less than ``tol`` (relative) between iterations. Returns (eigenvalue, the quotient at each iteration)."""
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.device, t.dtype) for t in shapes]
    norm = torch.sqrt(sum((x.float() ** 2).sum() for x in v))
    v = [x / norm for x in v]
    history: List[float] = []
    for _ in range(iters):
        hv = hvp(v)
        eig = float(sum((a.float() * b.float()).sum() for a, b in zip(hv, v)))
        history.append(eig)
        norm = torch.sqrt(sum((x.float() ** 2).sum() for x in hv))
        if not math.isfinite(float(norm)) or float(norm) == 0.0:
            break
        v = [x / norm for x in hv]
        if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1]):
            break
    return history[-1], history


def hessian_top_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: List[torch.Tensor], iters: int = 20,
                           tol: float = 1e-3, seed: int = 0) -> Tuple[float, List[float]]:
    """Top Hessian eigenvalue of ``loss_fn()`` with respect to ``params``: the gradient is built once with its
    graph, and every iteration differentiates <grad, v> again (one Hessian-vector product per iteration)."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(v):
        return list(torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True))

    return power_iteration(hvp, params, iters, tol, seed)


def _block_of(name: str) -> str:
    """'blocks.3.mlp.act' -> 'blocks.3'; 'layer2.1.act1' -> 'layer2.1'; 'act1' (the stem) -> 'stem'."""
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return "stem" if len(parts) == 1 else parts[0]


def activation_fractions(backbone: nn.Module, x: torch.Tensor) -> "OrderedDict[str, float]":
    """Per block: the fraction of ReLU / GELU outputs > 0 over every element of a forward of ``x``."""
    counts: "OrderedDict[str, List[float]]" = OrderedDict()
    hooks = []

    def hook(name):
        def fn(_module, _inp, out):
            c = counts.setdefault(_block_of(name), [0.0, 0.0])
            c[0] += float((out > 0).sum())
            c[1] += out.numel()
        return fn

    for name, m in backbone.named_modules():
        if isinstance(m, (nn.ReLU, nn.GELU)):
            hooks.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            backbone(x)
    finally:
        for h in hooks:
            h.remove()
    return OrderedDict((k, a / n) for k, (a, n) in counts.items() if n)


def _fixed_batch(cfg, batch: int, seed: int):
    from ..data import build_dataset, pretrain_transform
    ds = build_dataset(cfg.data, cfg.data.train_split, pretrain_transform(cfg.data), seed=seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:batch].tolist()
    items = [ds[i] for i in idx]
    x1 = torch.stack([v[0][0] for v in items])
    x2 = torch.stack([v[0][1] for v in items])
    return x1, x2


def load_moco(run_dir: str):
    """The full MoCo v3 model (base and momentum encoders, heads) of a run's newest checkpoint, with its config."""
    from safetensors.torch import load_file

    from .. import config as config_mod
    from ..engine.checkpoint import latest_checkpoint
    from ..models import build_moco
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"run '{run_dir}' has no checkpoint to measure sharpness at (checkpoints/step-*)")
    cfg = config_mod.load(config_mod.PretrainConfig, [os.path.join(run_dir, "config.yaml")])
    model = build_moco(cfg.model, momentum_encoder=cfg.moco.momentum > 0)
    weights = os.path.join(ckpt, "model.safetensors")
    if not os.path.isfile(weights):
        raise UserError(f"checkpoint '{ckpt}' has no model.safetensors")
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint '{ckpt}' does not match its run's model ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected keys)")
    return model, cfg


def run_sharpness(run_dir: str, batch: int = 64, iters: int = 20, tol: float = 1e-3, seed: int = 0) -> Dict:
    """Top Hessian eigenvalue of the MoCo v3 loss on a fixed batch (train-mode BN, as in training) and activation
    fractions per backbone block (eval mode) at the run's final weights, on the CPU, in fp32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ..losses import contrastive_loss
    torch.manual_seed(seed)
    model, cfg = load_moco(run_dir)
    x1, x2 = _fixed_batch(cfg, batch, seed)
    tau = cfg.moco.temperature
    model.train()
    with torch.no_grad():
        if model.has_momentum_encoder:
            k1, k2 = model.forward_momentum(x1), model.forward_momentum(x2)
        else:
            _, _, k1, k2 = model(x1, x2)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("momentum_")]

    def loss_fn():
        with sdpa_kernel(SDPBackend.MATH):
            q1, q2, _, _ = model(x1, x2)
        return contrastive_loss(q1, k2.detach(), tau) + contrastive_loss(q2, k1.detach(), tau)

    state = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    eig, history = hessian_top_eigenvalue(loss_fn, params, iters, tol, seed)
    model.load_state_dict(state, strict=False)  # train-mode forwards moved the BN running statistics
    model.eval()
    act = activation_fractions(model.backbone, x1)
    return dict(hessian_top_eig=eig, hessian_iters=len(history), hessian_history=history, batch=batch, seed=seed,
                activation=act, activation_mean=float(sum(act.values()) / len(act)) if act else math.nan)
