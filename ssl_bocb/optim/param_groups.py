"""Parameter groups by two explicit policies: which tensors get weight decay, and which get the layer-wise trust
ratio of LARS / LAMB. Both are logged with group sizes (nanoGPT's configure_optimizers habit)."""
from typing import Dict, List, Tuple

from torch import nn

# Names excluded from decay by `exclude_1d_tokens` besides ndim <= 1 tensors (and any no_weight_decay() name).
TOKEN_NAMES = ("cls_token", "pos_embed", "dist_token", "reg_token")

# weight decay on: every tensor (reference MoCo v3 AdamW) | tensors with ndim > 1 | those, less tokens / pos embed.
DECAY_POLICIES = ("all", "exclude_1d", "exclude_1d_tokens")
# trust ratio on: tensors with ndim > 1 (SPEC section 1, the MoCo v3 LARS) | every tensor.
TRUST_POLICIES = ("exclude_1d", "all")


def no_decay_names(model: nn.Module) -> set:
    """Full names listed by any submodule's timm-style ``no_weight_decay()``."""
    names = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def _decayed(name: str, p, policy: str, listed: set) -> bool:
    if policy == "all":
        return True
    if p.ndim <= 1:
        return False
    return policy == "exclude_1d" or not (name in listed or name.rsplit(".", 1)[-1] in TOKEN_NAMES)


def param_groups(model: nn.Module, weight_decay: float, decay_policy: str = "exclude_1d_tokens",
                 trust_policy: str = "exclude_1d") -> List[Dict]:
    """Trainable parameters of ``model`` in up to four groups, one per (decayed, trust ratio) combination.

    Each group carries ``weight_decay`` (0 where excluded), ``wd_scale`` (1 or 0: the scheduled weight decay is
    multiplied by it), ``trust_ratio`` (read by :class:`~ssl_bocb.optim.layerwise.LARS` / ``LAMB``; other
    optimizers ignore it) and ``group_name``.
    """
    if decay_policy not in DECAY_POLICIES:
        raise ValueError(f"unknown weight-decay policy {decay_policy!r}; choose one of {DECAY_POLICIES}")
    if trust_policy not in TRUST_POLICIES:
        raise ValueError(f"unknown trust-ratio policy {trust_policy!r}; choose one of {TRUST_POLICIES}")
    listed = no_decay_names(model)
    buckets: Dict[Tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (_decayed(name, p, decay_policy, listed), trust_policy == "all" or p.ndim > 1)
        buckets.setdefault(key, []).append(p)
    groups = []
    for (decay, trust) in [(True, True), (True, False), (False, True), (False, False)]:
        if (decay, trust) in buckets:
            groups.append(dict(params=buckets[(decay, trust)], weight_decay=weight_decay if decay else 0.0,
                               wd_scale=1.0 if decay else 0.0, trust_ratio=trust,
                               group_name=f"{'decay' if decay else 'no_decay'}{'+trust' if trust else ''}"))
    return groups


def group_summary(groups: List[Dict]) -> List[Dict]:
    """Per group: name, number of tensors, number of scalars, weight decay, trust ratio (logs, config.yaml)."""
    return [dict(name=g.get("group_name", str(i)), tensors=len(g["params"]), params=sum(p.numel() for p in g["params"]),
                 weight_decay=g["weight_decay"], trust_ratio=bool(g.get("trust_ratio", False)))
            for i, g in enumerate(groups)]
