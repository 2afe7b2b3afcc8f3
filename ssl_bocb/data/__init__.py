from .datasets import (FakeImages, TransformedDataset, build_base, build_dataset, data_root, order_seed,
                       per_class_subset, sample_seed)
from .transforms import (TwoViews, eval_transform, norm_stats, pretrain_transform, probe_train_transform)

__all__ = ["FakeImages", "TransformedDataset", "build_base", "build_dataset", "data_root", "order_seed", "per_class_subset", "sample_seed", "TwoViews", "eval_transform", "norm_stats", "pretrain_transform", "probe_train_transform"]
