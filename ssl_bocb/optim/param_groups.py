"""One rule for parameter groups: what gets weight decay (and the LARS / LAMB trust ratio)."""
from typing import Dict, List, Tuple

from torch import nn

# Parameter names that never get weight decay under exclude_norm_bias (besides ndim <= 1 tensors).
NO_DECAY_NAMES = ("cls_token", "pos_embed", "dist_token", "reg_token")


def no_decay_names(model: nn.Module) -> set:
    """Full names listed by any submodule's timm-style ``no_weight_decay()``."""
    names = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def param_groups(model: nn.Module, weight_decay: float, policy: str = "exclude_norm_bias") -> List[Dict]:
    """Trainable parameters of ``model`` in optimizer groups.

    exclude_norm_bias: tensors with ndim <= 1 (biases, norm scales), cls token and position embedding get no
        weight decay and no trust ratio; everything else gets both.
    decay_all: one group, every parameter decayed (the reference MoCo v3 AdamW behaviour).

    Each group carries ``wd_scale`` (1 or 0, multiplied by the scheduled weight decay), ``always_adapt`` (read
    by timm's LARS / LAMB: apply the trust ratio even at zero weight decay) and a ``group_name``.
    """
    if policy not in ("exclude_norm_bias", "decay_all"):
        raise ValueError(f"unknown parameter-group policy {policy!r}")
    listed = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        excluded = p.ndim <= 1 or name in listed or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
        (no_decay if policy == "exclude_norm_bias" and excluded else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, wd_scale=1.0, always_adapt=True, group_name="decay")]
    if no_decay:
        groups.append(dict(params=no_decay, weight_decay=0.0, wd_scale=0.0, always_adapt=False,
                           group_name="no_decay"))
    return groups


def group_summary(groups: List[Dict]) -> List[Tuple[str, int, int, float]]:
    """(group name, number of tensors, number of scalars, weight decay) per group, for logging."""
    return [(g.get("group_name", str(i)), len(g["params"]), sum(p.numel() for p in g["params"]), g["weight_decay"])
            for i, g in enumerate(groups)]
