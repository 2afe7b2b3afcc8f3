"""Weighted kNN classification on frozen features (DINO protocol, Caron et al. 2021).

Features are L2-normalised; each test image takes its top-k train neighbours by cosine similarity; each neighbour
votes for its class with weight exp(sim / T). Two backends give the same answer: faiss (exact inner-product
index, on the GPU when faiss has GPU support and one is present) and chunked torch matmul.
"""
from typing import Dict, Iterable, Tuple

import torch
import torch.nn.functional as F

from ..errors import UserError


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401  (only whether it imports)
        return True
    except ImportError:
        return False


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "faiss" if faiss_available() else "torch"
    return backend


def topk_torch(train: torch.Tensor, test: torch.Tensor, k: int, chunk_size: int = 1024) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine top-k of each test row among train rows (both already normalised): sims, indices [N_test, k]."""
    sims, idx = [], []
    for start in range(0, test.shape[0], chunk_size):
        s = test[start:start + chunk_size] @ train.t()  # [chunk, N_train]
        v, i = s.topk(k, dim=1)
        sims.append(v)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


_GPU_RESOURCES = {}  # one faiss StandardGpuResources per GPU, made once per process (they hold scratch memory)


def faiss_gpu_device():
    """The CUDA device faiss should search on (this process's current one), or None for the CPU index: faiss
    without GPU support, or no GPU."""
    import faiss
    if torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return torch.cuda.current_device()
    return None


def topk_faiss(train: torch.Tensor, test: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    import faiss
    index = faiss.IndexFlatIP(train.shape[1])
    device = faiss_gpu_device()
    if device is not None:
        if device not in _GPU_RESOURCES:
            _GPU_RESOURCES[device] = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(_GPU_RESOURCES[device], device, index)
    index.add(train.float().cpu().contiguous().numpy())
    sims, idx = index.search(test.float().cpu().contiguous().numpy(), k)
    return torch.from_numpy(sims), torch.from_numpy(idx).long()


def knn_vote(sims: torch.Tensor, idx: torch.Tensor, train_labels: torch.Tensor, num_classes: int, k: int,
             temperature: float) -> torch.Tensor:
    """Class scores [N_test, C] from the first k neighbours: sum of exp(sim / T) per neighbour class."""
    sims, idx = sims[:, :k], idx[:, :k]
    weights = (sims / temperature).exp()
    labels = train_labels[idx]                          # [N_test, k]
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
    return scores.scatter_add_(1, labels, weights)


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, ks: Iterable[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 backend: str = "torch", num_classes: int = None, chunk_size: int = 1024) -> Dict[int, Dict[str, float]]:
    """Top-1 / top-5 accuracy (in %) of weighted kNN for each k in ``ks``; the neighbour search runs once for
    the largest k (capped at the train-set size)."""
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise UserError("kNN needs at least one train and one test feature")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    ks = sorted({int(k) for k in ks})
    kmax = min(ks[-1], train.shape[0])
    backend = resolve_backend(backend)
    if backend == "faiss":
        if not faiss_available():
            raise UserError("knn.backend=faiss but faiss is not installed; pip install faiss-cpu, or knn.backend=torch")
        sims, idx = topk_faiss(train, test, kmax)
    elif backend == "torch":
        sims, idx = topk_torch(train, test, kmax, chunk_size)
    else:
        raise UserError(f"knn.backend={backend!r} is not valid; choose auto, torch or faiss")
    train_labels = train_labels.long().to(idx.device)
    test_labels = test_labels.long().to(idx.device)
    out = {}
    for k in ks:
        scores = knn_vote(sims, idx, train_labels, num_classes, min(k, kmax), temperature)
        top = scores.topk(min(5, num_classes), dim=1).indices
        correct = top == test_labels[:, None]
        out[k] = {"top1": 100.0 * correct[:, 0].float().mean().item(),
                  "top5": 100.0 * correct.any(dim=1).float().mean().item()}
    return out
