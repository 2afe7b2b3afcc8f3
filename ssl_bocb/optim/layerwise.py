"""Layer-wise adaptive optimizers with the trust ratio as an explicit per-group switch.

timm's Lars and Lamb decide the trust ratio from the weight decay (a decayed group is always adapted) and its Lars
divides by ||g|| + wd ||p|| rather than ||g + wd p||. Here each parameter group carries ``trust_ratio`` (bool)
next to ``weight_decay``, so the two exclusion policies of :mod:`.param_groups` stay independent, and LARS
follows ../shared/SPEC.md section 1 (the MoCo v3 reference LARS) exactly.
"""
import torch


def _trust(p_norm: torch.Tensor, u_norm: torch.Tensor, eta: float) -> torch.Tensor:
    """eta * ||p|| / ||u||, and 1 where either norm is zero (MoCo v3 reference)."""
    one = torch.ones_like(p_norm)
    return torch.where(p_norm > 0, torch.where(u_norm > 0, eta * p_norm / u_norm, one), one)


def _clip(ratio: torch.Tensor, lr: float, clip: bool) -> torch.Tensor:
    """LARC clipping: the local lr ratio * lr never exceeds the global lr."""
    return torch.clamp(ratio / lr, max=1.0) if clip and lr > 0 else ratio


class _PerParameter(torch.optim.Optimizer):
    """step(): the closure, then :meth:`update` for every parameter with a gradient."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group, self.state[p])
        return loss


class LARS(_PerParameter):
    """LARS (You et al. 2017) as in the MoCo v3 reference: u = g + wd * p; for groups with ``trust_ratio``,
    u *= eta * ||p|| / ||u|| (clipped to lr / lr when ``trust_clip``, LARC); buf = momentum * buf + u;
    p -= lr * (u + momentum * buf if nesterov else buf)."""

    def __init__(self, params, lr: float = 0.3, weight_decay: float = 0.0, momentum: float = 0.9,
                 nesterov: bool = False, trust_coefficient: float = 0.001, trust_clip: bool = False,
                 trust_ratio: bool = True):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        trust_coefficient=trust_coefficient, trust_clip=trust_clip, trust_ratio=trust_ratio)
        super().__init__(params, defaults)

    def update(self, p, group, state):
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        u = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
        if group["trust_ratio"]:
            ratio = _trust(p.norm(), u.norm(), group["trust_coefficient"])
            u.mul_(_clip(ratio, lr, group["trust_clip"]))
        if mom:
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"].mul_(mom).add_(u)
            u = u.add(buf, alpha=mom) if group["nesterov"] else buf
        p.add_(u, alpha=-lr)


class LAMB(_PerParameter):
    """LAMB (You et al. 2020): Adam moments with bias correction, u = m_hat / (sqrt(v_hat) + eps) + wd * p;
    for groups with ``trust_ratio``, u *= ||p|| / ||u|| (clipped to at most 1 when ``trust_clip``, LAMBC);
    p -= lr * u. No gradient clipping inside (that is ``optim.grad_clip``'s job)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-6,
                 trust_clip: bool = False, trust_ratio: bool = True):
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps, trust_clip=trust_clip,
                        trust_ratio=trust_ratio)
        super().__init__(params, defaults)

    def update(self, p, group, state):
        b1, b2 = group["betas"]
        if not state:
            state["step"] = torch.zeros(())
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        m = state["exp_avg"].lerp_(p.grad, 1 - b1)
        v = state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(group["eps"]))
        if group["weight_decay"]:
            u.add_(p, alpha=group["weight_decay"])
        if group["trust_ratio"]:
            ratio = _trust(p.norm(), u.norm(), 1.0)
            u.mul_(ratio.clamp(max=1.0) if group["trust_clip"] else ratio)
        p.add_(u, alpha=-group["lr"])
