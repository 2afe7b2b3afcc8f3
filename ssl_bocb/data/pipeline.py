"""Pretraining's two-view data path: the batched tensor path where the data can be held decoded, else PIL."""
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict

from ..errors import UserError
from .batched import BatchedTwoViews
from .cache import decoded_dataset, keep_batch
from .datasets import build_dataset
from .transforms import pretrain_transform

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
    return TwoViewData(dataset, _pil_views, "pil", dict(num_workers=data_cfg.num_workers), reason)
