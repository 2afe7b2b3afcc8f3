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
        for h, mean in zip(hessians, _means_over_processes(hessians)):
            h.copy_(mean)

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
    for p, mean in zip(with_grad, _means_over_processes([p.grad.detach() for p in with_grad])):
        g = p.grad
        p.grad = mean + (g - g.detach())


def _means_over_processes(tensors):
    """Each tensor's mean over the processes, in one all-reduce (views of one flat buffer)."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch_dist.all_reduce(flat)
    flat /= dist.world_size()
    return [m.view_as(t) for m, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
