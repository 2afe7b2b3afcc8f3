"""Sophia's Hutchinson Hessian estimate made the same on every process.

DDP all-reduces the gradients, not the second-order products taken from them: under several processes each one
would differentiate its own part of the batch's graph (and draw its own probe vectors), so the replicas' Hessian
estimates, and then their updates and weights, would drift apart with nothing to bring them back. After each
estimate, the replicas' estimates are averaged: the estimate of the Hessian diagonal of the mean loss over the whole
batch, with one probe per process (lower variance than one probe).
"""
import torch
import torch.distributed as torch_dist

from .. import dist


def average_hessian_across_processes(optimizer) -> None:
    """Wrap ``optimizer.compute_hutchinson_hessian`` (pytorch-optimizer's SophiaH calls it on its update steps) so
    that the estimate it leaves in ``state[p]['hessian']`` is averaged over the processes. Single process: as is."""
    compute = optimizer.compute_hutchinson_hessian

    def compute_then_average(param_groups, state, *args, **kwargs):
        compute(param_groups, state, *args, **kwargs)
        if not dist.is_distributed():
            return
        hessians = [state[p]["hessian"] for g in param_groups for p in g["params"]
                    if p in state and "hessian" in state[p]]
        if not hessians:
            return
        flat = torch.cat([h.reshape(-1) for h in hessians])
        torch_dist.all_reduce(flat)
        flat /= dist.world_size()
        offset = 0
        for h in hessians:
            h.copy_(flat[offset:offset + h.numel()].view_as(h))
            offset += h.numel()

    optimizer.compute_hutchinson_hessian = compute_then_average


def average_gradients_keeping_graph(params) -> None:
    """DDP cannot all-reduce gradients that carry a graph (backward with create_graph=True fails inside its reducer),
    so Sophia's Hessian steps run their backward under no_sync and average here: each ``p.grad`` becomes
    ``mean + (g_local - g_local.detach())``, whose value is exactly the mean over the processes (what DDP would give,
    the same bits everywhere: x - x is exactly 0) and whose graph is the local one, from which the Hessian-vector
    products are taken (then averaged, above)."""
    if not dist.is_distributed():
        return
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return
    flat = torch.cat([p.grad.detach().reshape(-1) for p in with_grad])
    torch_dist.all_reduce(flat)
    flat /= dist.world_size()
    offset = 0
    for p in with_grad:
        g = p.grad
        mean = flat[offset:offset + g.numel()].view_as(g)
        p.grad = mean + (g - g.detach())
        offset += g.numel()
