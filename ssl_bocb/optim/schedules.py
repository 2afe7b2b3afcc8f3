"""Schedules as pure functions of the global step (lr, weight decay and EMA momentum alike)."""
import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cycle cosine from ``start`` (step 0) to ``end`` (step total_steps)."""
    if total_steps <= 0:
        return end
    t = min(max(step, 0), total_steps) / total_steps
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float = 0.0) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then half-cycle cosine to ``final``."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


def momentum(step: int, total_steps: int, m0: float, schedule: str = "cosine") -> float:
    """MoCo v3 EMA coefficient: m_t = 1 - 0.5 * (1 + cos(pi * t / T)) * (1 - m0) (cosine), or m0 (constant)."""
    if schedule == "constant":
        return m0
    return cosine(step, total_steps, m0, 1.0)


def set_group_values(optimizer, lr: float, weight_decay: float) -> None:
    """Write this step's lr and weight decay into every parameter group, scaled by the group's ``lr_scale``
    (layer-wise lr decay) and ``wd_scale`` (0 for groups excluded from decay)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = weight_decay * g.get("wd_scale", 1.0)


def scaled_lr(base_lr: float, global_batch: int, rule: str) -> float:
    """The peak lr from the base lr (per 256 images) and the global batch: ``linear`` base_lr * batch / 256 (Goyal
    et al. 2017), ``sqrt`` base_lr * sqrt(batch / 256), ``none`` base_lr. The package's one lr-scaling rule:
    pretraining, fine-tuning and the linear probe (always linear) read it."""
    if rule == "linear":
        return base_lr * global_batch / 256
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / 256)
    return base_lr
