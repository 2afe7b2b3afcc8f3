"""The one place that talks to torch.distributed. Every helper also works in a single process."""
import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [N, ...] from every process along dim 0 -> [N * world_size, ...], without gradient.

    Every process must pass the same shape. In a single process this returns ``x`` itself (detached).
    """
    if not is_distributed():
        return x.detach()
    out = [torch.empty_like(x) for _ in range(world_size())]
    torch_dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)
