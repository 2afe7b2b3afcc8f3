"""The one place that talks to torch.distributed. Every helper also works in a single process."""
import contextlib

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


_first_depth = 0


@contextlib.contextmanager
def local_main_first():
    """Inside, the main process of each node runs first and the others wait, then run the same code and find what
    it made (an unpacked archive, a decoded cache file). Every process must enter it (it is a barrier); nested uses
    are plain. Across nodes sharing one folder the writers use unique temporary names and atomic renames."""
    global _first_depth
    if _first_depth or not is_distributed():
        first = contextlib.nullcontext()
    else:
        from accelerate import PartialState
        first = PartialState().local_main_process_first()
    _first_depth += 1
    try:
        with first:
            yield
    finally:
        _first_depth -= 1

def from_main(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` run on the main process alone; every process returns its result (a picklable
    object broadcast from the main process). Every process must call it."""
    if not is_distributed():
        return fn(*args, **kwargs)
    box = [fn(*args, **kwargs) if rank() == 0 else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def process_seed(seed: int, process_index: int) -> int:
    """The seed of process ``process_index``'s random streams (drop-path masks, Hutchinson probes, Mixup draws):
    ``seed`` itself on process 0, so a one-process run is unchanged, and a hash of (seed, index) on the others, so
    that no two processes, and no process of another seed, share a stream."""
    if process_index == 0:
        return seed
    import hashlib
    return int.from_bytes(hashlib.sha256(f"{seed}/{process_index}".encode()).digest()[:4], "little")
