"""Pure loss functions of tensors (device-agnostic, tested on CPU)."""
import torch
import torch.nn.functional as F

from . import dist


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float, gather=dist.gather_nograd,
                     rank: int = None) -> torch.Tensor:
    """One direction of the MoCo v3 InfoNCE loss (Chen, Xie, He 2021, Alg. 1).

    Args:
        q: queries [N, D] from the base encoder (un-normalised; gradients flow through them).
        k: keys [N, D] from the momentum encoder (un-normalised; treated as constants).
        temperature: tau.
        gather: collects the keys of all processes without gradient ([N, D] -> [N * world, D]); identity in a
            single process.
        rank: this process's index in the gather (default: the distributed rank, 0 when not distributed).

    Returns:
        Scalar ``cross_entropy(q @ k_all.T / tau, i + N * rank) * 2 * tau``, computed in fp32 (autocast off). The 2 * tau factor follows the
        reference implementation and makes the gradient scale independent of tau.
    """
    # fp32 even inside an autocast region: at tau 0.2 a bf16 q @ k.T costs about 1 % relative gradient error
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        k_all = gather(k)                                   # [N * world, D]
        logits = q @ k_all.t() / temperature                # [N, N * world]
        n = q.shape[0]
        r = dist.rank() if rank is None else rank
        targets = torch.arange(n, device=q.device) + n * r
        return F.cross_entropy(logits, targets) * (2 * temperature)


def contrastive_loss_rows(q: torch.Tensor, k_all: torch.Tensor, temperature: float, first: int,
                          total: int) -> torch.Tensor:
    """Rows ``first .. first + len(q)`` of :func:`contrastive_loss` over a batch of ``total`` query rows: the sum of
    their cross-entropies divided by ``total`` (so the rows of all chunks add up to the full batch's mean), times
    2 * tau. ``k_all``: every key of the batch, already normalised and gathered; ``first`` counts from the start of
    the gathered keys (the process's offset included)."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        logits = q @ k_all.t() / temperature
        targets = torch.arange(q.shape[0], device=q.device) + first
        return F.cross_entropy(logits, targets, reduction="sum") / total * (2 * temperature)

