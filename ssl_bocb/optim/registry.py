"""Optimizer registry: small entries by name; anything else goes to timm.optim.create_optimizer_v2."""
import difflib
from typing import Callable, Dict, List

import torch
from timm.optim import Lamb, Lars, create_optimizer_v2, list_optimizers
from torch import nn

from ..errors import UserError
from .param_groups import param_groups

# name -> builder(groups, lr, **options) -> torch.optim.Optimizer
OPTIMIZERS: Dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        OPTIMIZERS[name] = fn
        return fn
    return deco


@register("adamw")
def _adamw(groups, lr, betas=(0.9, 0.999), eps=1e-8, **kw):
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **kw)


@register("sgd")
def _sgd(groups, lr, momentum=0.9, nesterov=False, **kw):
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **kw)


@register("lamb")
def _lamb(groups, lr, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=None, **kw):
    # timm's Lamb clips the global gradient norm to 1.0 by default; here clipping is optim.grad_clip's job.
    return Lamb(groups, lr=lr, betas=tuple(betas), eps=eps, max_grad_norm=max_grad_norm, **kw)


@register("lars")
def _lars(groups, lr, momentum=0.9, nesterov=False, trust_coefficient=0.001, trust_clip=False, **kw):
    # trust ratio eta * ||p|| / ||g + wd * p||; groups with always_adapt=False and wd=0 are left unscaled.
    return Lars(groups, lr=lr, momentum=momentum, nesterov=nesterov, trust_coeff=trust_coefficient,
                trust_clip=trust_clip, **kw)


# Options of OptimConfig each registered entry understands (others are dropped, not passed).
_OPTIONS = {
    "adamw": ("betas", "eps"),
    "sgd": ("momentum", "nesterov"),
    "lamb": ("betas", "eps"),
    "lars": ("momentum", "nesterov", "trust_coefficient", "trust_clip"),
}


def valid_names() -> List[str]:
    return sorted(set(OPTIMIZERS) | set(list_optimizers()))


def build_optimizer(groups: List[Dict], name: str, lr: float, weight_decay: float = 0.0,
                    **options) -> torch.optim.Optimizer:
    """An optimizer for prepared parameter groups. ``options`` are OptimConfig-style settings (momentum, betas,
    eps, nesterov, trust_coefficient, trust_clip) plus ``kwargs`` passed to the constructor as they are."""
    name = name.lower()
    extra = dict(options.pop("kwargs", None) or {})
    if name in OPTIMIZERS:
        known = {k: v for k, v in options.items() if k in _OPTIONS[name]}
        try:
            return OPTIMIZERS[name](groups, lr, **known, **extra)
        except TypeError as e:
            raise UserError(f"optim.kwargs {extra} do not fit {name}: {e}") from None
    if name in list_optimizers():
        try:
            return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=weight_decay,
                                       momentum=options.get("momentum", 0.9), **extra)
        except TypeError as e:
            raise UserError(f"optim.kwargs {extra} do not fit {name}: {e}") from None
    close = difflib.get_close_matches(name, valid_names(), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"unknown optimizer '{name}' (optim.name){hint}; valid: {', '.join(sorted(OPTIMIZERS))} or any "
                    f"timm optimizer: {', '.join(n for n in valid_names() if n not in OPTIMIZERS)}")


def create_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                     param_groups_policy: str = "exclude_norm_bias", **options) -> torch.optim.Optimizer:
    """Public API: parameter groups of ``model`` by ``param_groups_policy`` and the optimizer ``name``."""
    return build_optimizer(param_groups(model, weight_decay, param_groups_policy), name, lr, weight_decay, **options)


def optimizer_from_cfg(model: nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    return create_optimizer(model, optim_cfg.name, lr, optim_cfg.weight_decay, optim_cfg.param_groups,
                            momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov, betas=list(optim_cfg.betas),
                            eps=optim_cfg.eps, trust_coefficient=optim_cfg.trust_coefficient,
                            trust_clip=optim_cfg.trust_clip, kwargs=dict(optim_cfg.kwargs))
