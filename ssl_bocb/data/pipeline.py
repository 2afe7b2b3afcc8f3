"""Pretraining's two-view data path: the batched tensor path where the data can be held decoded, else PIL."""
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
from torch.utils.data import Dataset

from ..dist import local_main_first
from ..errors import UserError
from .batched import BatchedTwoViews
from .cache import DecodedImages, decoded_dataset, keep_batch
from .datasets import build_dataset
from .transforms import eval_resize, eval_transform, norm_stats, pretrain_transform

log = logging.getLogger(__name__)


@dataclass
class TwoViewData:
    """The dataset, the DataLoader options it needs, and ``views(batch, epoch) -> (x1, x2, n_unreadable)``."""
    dataset: Any
    views: Callable
    kind: str                   # "batched" or "pil"
    loader_kwargs: Dict[str, Any] = field(default_factory=dict)
    reason: str = ""            # why auto chose pil


def _pil_views(batch, epoch):
    (x1, x2), _, n_bad = batch
    return x1, x2, n_bad


class _TensorViews:
    def __init__(self, augment: BatchedTwoViews):
        self.augment = augment

    def __call__(self, batch, epoch):
        (images, index), _, n_bad = batch
        x1, x2 = self.augment(images, index, epoch)  # on the device the batch was placed on
        return x1, x2, n_bad


def two_view_data(data_cfg, seed: int) -> TwoViewData:
    """``data.pipeline``: batched / pil, or auto (batched when the images can be held decoded)."""
    with local_main_first():  # one process per node unpacks and decodes, the others reuse its files
        return _two_view_data(data_cfg, seed)


def _two_view_data(data_cfg, seed: int) -> TwoViewData:
    choice, reason = data_cfg.pipeline, ""
    if choice in ("auto", "batched"):
        dataset, reason = decoded_dataset(data_cfg, data_cfg.train_split)
        if dataset is not None:
            return TwoViewData(dataset, _TensorViews(BatchedTwoViews.from_cfg(data_cfg, seed)), "batched",
                               dict(num_workers=0, collate_fn=keep_batch))
        if choice == "batched":
            raise UserError(f"data.pipeline=batched cannot hold {data_cfg.name} decoded: {reason}; use "
                            f"data.pipeline=pil (or auto)")
        log.info("data.pipeline=auto chose the PIL path: %s", reason)
    dataset = build_dataset(data_cfg, data_cfg.train_split, pretrain_transform(data_cfg), seed=seed)
    return TwoViewData(dataset, _pil_views, "pil", worker_options(data_cfg.num_workers), reason)


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
        self.scale = torch.tensor([1 / (255 * s) for s in std]).view(1, 3, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
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
