"""Pretraining's two-view data paths, and the rule that picks one (``data.pipeline=auto``):

- batched: the images share one size no larger than the crop and fit in ``data.cache_max_gb``: held decoded (uint8),
  both views cut and augmented batch-wise on the training device; no workers.
- dali: larger images, a CUDA device and NVIDIA DALI installed: files read and crops decoded by DALI on the GPU.
- crops: larger images otherwise: DataLoader workers decode (at reduced scale where the crops allow), crop and flip,
  the training device does colour, blur, solarize and normalisation batch-wise (on a CPU device the workers colour
  too, in PIL).
- pil: torchvision's per-image PIL transforms in the workers; only when asked for (the reference recipe).

All but pil draw every sample's parameters from one generator keyed by (seed, epoch, position), so the crop windows
and colour parameters of an image are the same on batched, crops and dali, and a resumed run continues exactly.
"""
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
from torch.utils.data import Dataset

from ..dist import local_main_first
from ..errors import UserError
from .batched import BatchedTwoViews, uint8_normalisation
from .cache import DecodedImages, decoded_dataset, keep_batch
from .crops import CroppedViews, NormaliseViews
from .datasets import build_dataset, subset_base
from .transforms import eval_resize, eval_transform, norm_stats, pretrain_transform

log = logging.getLogger(__name__)


@dataclass
class TwoViewData:
    """The dataset, the DataLoader options it needs, and ``views(batch, epoch) -> (x1, x2, n_unreadable)``."""
    dataset: Any
    views: Callable
    kind: str                   # "batched", "crops", "dali" or "pil"
    loader_kwargs: Dict[str, Any] = field(default_factory=dict)
    reason: str = ""            # why auto chose this path
    bytes_per_image: int = 0    # what crosses from a DataLoader worker to the training process per image


def _pil_views(batch, epoch):
    (x1, x2), _, n_bad = batch
    return x1, x2, n_bad


class _TensorViews:
    """Both views from a uint8 batch on the training device: whole decoded images (batched) or the workers'
    crops (crops, dali)."""

    def __init__(self, augment: BatchedTwoViews):
        self.augment = augment

    def __call__(self, batch, epoch):
        (images, index), _, n_bad = batch
        x1, x2 = self.augment(images, index, epoch)  # on the device the batch was placed on
        return x1, x2, n_bad


def two_view_data(data_cfg, seed: int, device=None) -> TwoViewData:
    """``data.pipeline``: batched / crops / dali / pil, or auto: the fastest correct path for the training
    ``device`` (default the CPU). Every path's loader is a torch DataLoader, sharded and resumed by Accelerate."""
    with local_main_first():  # one process per node unpacks and decodes, the others reuse its files
        return _two_view_data(data_cfg, seed, torch.device(device or "cpu"))


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _two_view_data(data_cfg, seed: int, device: torch.device) -> TwoViewData:
    choice, reason = data_cfg.pipeline, ""
    if choice in ("auto", "batched"):
        dataset, reason = decoded_dataset(data_cfg, data_cfg.train_split)
        if dataset is not None:
            if choice == "auto":
                log.info("data.pipeline=auto chose batched: the images share one size <= data.image_size and fit "
                         "in data.cache_max_gb, so they are held decoded and augmented on %s", device)
            return TwoViewData(dataset, _TensorViews(BatchedTwoViews.from_cfg(data_cfg, seed)), "batched",
                               dict(num_workers=0, collate_fn=keep_batch), "held decoded")
        if choice == "batched":
            raise UserError(f"data.pipeline=batched cannot hold {data_cfg.name} decoded: {reason}; use "
                            f"data.pipeline=crops (or auto)")
    if choice == "pil":
        dataset = build_dataset(data_cfg, data_cfg.train_split, pretrain_transform(data_cfg), seed=seed)
        return TwoViewData(dataset, _pil_views, "pil", worker_options(num_workers(data_cfg)), "asked for",
                           bytes_per_image=2 * 3 * data_cfg.image_size ** 2 * 4)
    augment = BatchedTwoViews.from_cfg(data_cfg, seed)
    if choice == "dali" or (choice == "auto" and device.type == "cuda" and dali_available()):
        from .dali import dali_data
        if choice == "auto":
            reason = f"{reason}; DALI is installed and the device is {device}: decoding on the GPU"
            log.info("data.pipeline=auto chose dali: %s", reason.lstrip("; "))
        return dali_data(data_cfg, augment, device, reason, num_workers(data_cfg))
    base, indices = subset_base(data_cfg, data_cfg.train_split)
    if choice == "auto":
        why_not_dali = "DALI is not installed" if not dali_available() else f"the device is {device}, not a GPU"
        reason = (f"{reason}; {why_not_dali}: {num_workers(data_cfg)} workers per process decode and crop, "
                  f"{'and colour (the device is the CPU)' if device.type == 'cpu' else f'colour on {device}'}")
        log.info("data.pipeline=auto chose crops: %s", reason.lstrip("; "))
    workers = num_workers(data_cfg)
    # On a GPU the workers only decode, crop and flip. On a CPU the training process's cores are the workers' cores:
    # the workers also colour (PIL's uint8 ops, with the same parameters) and send finished uint8 views.
    finish = device.type == "cpu" and workers > 0
    views = NormaliseViews(augment.mean, augment.std) if finish else _TensorViews(augment)
    return TwoViewData(CroppedViews(base, indices, augment, finish=finish), views, "crops",
                       dict(collate_fn=keep_batch, **worker_options(workers)), reason,
                       bytes_per_image=CroppedViews.bytes_per_image(data_cfg.image_size))


def num_workers(data_cfg) -> int:
    """``data.num_workers``, or where null the CPUs this process may use divided among the node's processes."""
    if data_cfg.num_workers is not None:
        return data_cfg.num_workers
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, cpus // max(1, local))


def worker_options(num_workers: int) -> dict:
    """DataLoader options for ``num_workers`` workers, kept alive across epochs and passes (forked once per loader,
    not at every epoch; TransformedDataset shares its epoch with them)."""
    return dict(num_workers=num_workers, persistent_workers=num_workers > 0)


class NormalisedImages(Dataset):
    """Evaluation images straight from the decoded cache: a batch fetch returns ``(x, labels, n_unreadable)`` with
    ``x`` the normalised float batch. The same values as the PIL evaluation transform where that transform is only
    ToTensor + Normalize (images already at the crop size), without decoding or DataLoader workers."""

    loader_kwargs = dict(num_workers=0, collate_fn=keep_batch)

    def __init__(self, images: DecodedImages, mean, std):
        self.images, self.targets, self.classes = images, images.targets, images.classes
        self.scale, self.shift = uint8_normalisation(mean, std)
        self.transform = f"DecodedNormalise(mean={tuple(mean)}, std={tuple(std)})"  # names it in feature-cache keys

    def __len__(self):
        return len(self.images)

    def __getitems__(self, index):
        (images, _), labels, n_bad = self.images.__getitems__(index)
        x = torch.addcmul(self.shift, images.permute(0, 3, 1, 2).float(), self.scale)
        return x.contiguous(), labels, n_bad

    def __getitem__(self, i):
        x, labels, n_bad = self.__getitems__([i])
        return x[0], labels[0], n_bad


def eval_images(data_cfg, split: str, seed: int = 0, subset: Optional[int] = None):
    """The dataset feature extraction embeds: :class:`NormalisedImages` where the evaluation transform reduces to a
    normalisation and the images can be held decoded (``data.pipeline`` not pil), else the PIL transform."""
    with local_main_first():
        return _eval_images(data_cfg, split, seed, subset)


def _eval_images(data_cfg, split: str, seed: int, subset: Optional[int]):
    if data_cfg.pipeline != "pil" and eval_resize(data_cfg.image_size) == data_cfg.image_size:
        images, _ = decoded_dataset(data_cfg, split, subset)
        if images is not None and images.image_shape == (data_cfg.image_size, data_cfg.image_size):
            return NormalisedImages(images, *norm_stats(data_cfg))
    return build_dataset(data_cfg, split, eval_transform(data_cfg), seed=seed, subset=subset)
