"""Online kNN monitor for pretraining: a kNN top-1 on a fixed labelled subset every N epochs, so the accuracy
curve and its dips (MoCo v3 sec. 4) show while training runs."""
import torch

from ..data.datasets import HOLDOUT
from ..data.pipeline import eval_images, num_workers
from ..dist import from_main
from .features import extract_features, feature_loader
from .knn import knn_classify


class KnnMonitor:
    def __init__(self, cfg, accelerator):
        m = cfg.monitor
        self.k, self.t, self.accelerator = m.knn_k, m.knn_temperature, accelerator
        self.batch = max(cfg.train.batch_size // accelerator.num_processes, 64)
        self.train = eval_images(cfg.data, cfg.data.train_split, subset=m.knn_train_per_class)
        # with a validation split the monitor reads it, never the test split
        queries = HOLDOUT if cfg.data.holdout_per_class > 0 else cfg.data.test_split
        self.test = eval_images(cfg.data, queries, subset=m.knn_test_per_class)
        self.loaders = [feature_loader(ds, accelerator, self.batch, num_workers(cfg.data))
                        for ds in (self.train, self.test)]
        self.channels_last = cfg.train.channels_last  # auto decides as for the training model: the same backbone

    @torch.no_grad()
    def __call__(self, backbone) -> float:
        was_training = backbone.training
        ftr, ytr = extract_features(backbone, self.train, self.accelerator, desc="kNN bank",
                                    channels_last=self.channels_last, loader=self.loaders[0])
        fte, yte = extract_features(backbone, self.test, self.accelerator, desc="kNN queries",
                                    channels_last=self.channels_last, loader=self.loaders[1])
        backbone.train(was_training)
        # the neighbour search runs once, on the main process; the others take its result
        res = from_main(knn_classify, ftr, ytr, fte, yte, ks=[self.k], temperature=self.t, backend="torch")
        return res[self.k]["top1"]
