"""Evaluation stages run by tools/knn.py and tools/linprobe.py: each follows one documented protocol and
writes its result to a fixed file (see metrics.py)."""
import logging
import os
import time
from typing import Dict, Tuple

from ..config import to_dict
from ..data import build_dataset, eval_transform, probe_train_transform
from ..data.datasets import HOLDOUT
from ..data.pipeline import eval_images, num_workers
from ..dist import from_main
from ..engine import make_accelerator
from ..engine.logs import setup_logging
from ..errors import UserError
from .features import cached_features, load_eval_backbone, resolve_checkpoint, weights_digest
from .knn import knn_classify, resolve_backend
from .linear import default_base_lr, linear_probe_full, train_linear_cached
from ..optim.schedules import scaled_lr
from .metrics import check_writable, result_path, write_metrics

log = logging.getLogger(__name__)


def output_folder(cfg) -> str:
    """Results go to output_dir, else the checkpoint's run folder, else runs/random-<backbone>."""
    if cfg.output_dir:
        return cfg.output_dir
    if not cfg.checkpoint:
        return os.path.join("runs", f"random-{cfg.model.backbone}")
    kind, path = resolve_checkpoint(cfg.checkpoint)
    folder = os.path.dirname(os.path.abspath(path))
    if kind == "state":  # <run>/checkpoints/step-N
        folder = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return folder


def result_name(cfg, stage: str) -> str:
    """The stage's result file stem: ``val_<stage>`` on the validation split (data.test_split=holdout), so that a
    validation reading never replaces the test reading of the same checkpoint."""
    return f"val_{stage}" if cfg.data.test_split == HOLDOUT else stage


class EvalSession:
    """What every stage needs: the accelerator, the backbone and its description, the output file."""

    def __init__(self, cfg, stage: str):
        self.cfg, self.stage, self.t0 = cfg, stage, time.time()
        self.out_dir = output_folder(cfg)
        self.path = result_path(self.out_dir, result_name(cfg, stage))
        check_writable(self.path, cfg.overwrite)  # before any work
        self.accelerator = make_accelerator(cfg, seed=cfg.seed, precision_key="mixed_precision")
        setup_logging(self.accelerator.is_main_process)
        self.backbone, self.info = load_eval_backbone(cfg.checkpoint, cfg.model, cfg.init_seed)
        self.family = self.backbone.ssl_bocb_spec["family"]
        self.digest = weights_digest(self.backbone)
        log.info("%s: %s (%s) from %s", stage, self.info["backbone"], self.info["init"],
                 self.info["checkpoint"] or "random init")

    def features(self, split: str, train: bool) -> Tuple:
        cfg = self.cfg
        subset = cfg.data.subset if train else cfg.test_subset
        ds = eval_images(cfg.data, split, seed=cfg.seed, subset=subset)
        feats, labels, hit = cached_features(self.backbone, self.digest, ds, cfg.data, split, subset,
                                             self.accelerator, cfg.batch_size, cfg.cache_features, cfg.data.cache_dir)
        return feats, labels, hit, ds

    def finish(self, top1: float, top5: float, num_train: int, num_test: int, protocol: Dict, **extra) -> Dict:
        metrics = {"stage": self.stage, "top1": float(top1), "top5": float(top5), "dataset": self.cfg.data.name,
                   "split": self.cfg.data.test_split, "num_train": int(num_train), "num_test": int(num_test),
                   "checkpoint": self.info["checkpoint"], "backbone": self.info["backbone"],
                   "init": self.info["init"], "protocol": protocol, "seconds": time.time() - self.t0, **extra}
        if self.accelerator.is_main_process:
            write_metrics(self.path, metrics, self.cfg.overwrite)
            log.info("wrote %s", self.path)
        return metrics


def count_classes(*datasets) -> int:
    """Number of classes: the largest label of the given datasets plus one."""
    return int(max(max(ds.targets) for ds in datasets)) + 1


def run_knn(cfg) -> Dict:
    s = EvalSession(cfg, "knn")
    ftr, ytr, hit_tr, train_ds = s.features(cfg.data.train_split, train=True)
    fte, yte, hit_te, test_ds = s.features(cfg.data.test_split, train=False)
    ks = sorted(set(cfg.knn.ks) | {cfg.knn.k})
    backend = resolve_backend(cfg.knn.backend)
    t = time.time()
    # on the main process alone (the others would each load the whole bank onto a device); its table is shared
    table = from_main(knn_classify, ftr, ytr, fte, yte, ks=ks, temperature=cfg.knn.temperature, backend=backend,
                      num_classes=count_classes(train_ds, test_ds), chunk_size=cfg.knn.chunk_size)
    knn_seconds = time.time() - t
    head = table[cfg.knn.k]
    for k in ks:
        log.info("kNN k=%-4d top-1 %.2f  top-5 %.2f", k, table[k]["top1"], table[k]["top5"])
    protocol = dict(to_dict(cfg.knn), backend=backend, feature="L2-normalised backbone output (pooled / class token)",
                    vote="sum of exp(cos / T) over the top-k neighbours", transform=repr(eval_transform(cfg.data)),
                    train_subset=cfg.data.subset, test_subset=cfg.test_subset)
    return s.finish(head["top1"], head["top5"], len(ytr), len(yte), protocol,
                    table={str(k): v for k, v in table.items()}, feature_cache_hit=hit_tr and hit_te,
                    knn_seconds=knn_seconds)


def run_linprobe(cfg) -> Dict:
    s = EvalSession(cfg, "linprobe")
    lc = cfg.linear
    base_lr = lc.base_lr if lc.base_lr is not None else default_base_lr(s.family)
    protocol = dict(to_dict(lc), base_lr=base_lr, lr=scaled_lr(base_lr, lc.batch_size, "linear"), head="Linear, N(0, 0.01) init",
                    optimizer="SGD", schedule="cosine per epoch, no warmup", train_subset=cfg.data.subset,
                    test_subset=cfg.test_subset)
    if lc.mode == "cached":
        ftr, ytr, _, train_ds = s.features(cfg.data.train_split, train=True)
        fte, yte, _, test_ds = s.features(cfg.data.test_split, train=False)
        res = train_linear_cached(ftr, ytr, fte, yte, count_classes(train_ds, test_ds), lc.epochs, lc.batch_size, base_lr,
                                  lc.momentum, lc.weight_decay, cfg.seed, s.accelerator.device,
                                  progress=s.accelerator.is_main_process)
        protocol["train_transform"] = "none (cached features of the eval transform)"
        n_train, n_test = len(ytr), len(yte)
    else:
        train_ds = build_dataset(cfg.data, cfg.data.train_split, probe_train_transform(cfg.data), seed=cfg.seed)
        test_ds = build_dataset(cfg.data, cfg.data.test_split, eval_transform(cfg.data), seed=cfg.seed,
                                subset=cfg.test_subset)
        num_classes = count_classes(train_ds, test_ds)
        if num_classes < 2:
            raise UserError("the probe needs at least two classes")
        res = linear_probe_full(s.backbone, train_ds, test_ds, s.accelerator, num_classes, lc.epochs, lc.batch_size,
                                base_lr, lc.momentum, lc.weight_decay, num_workers(cfg.data), cfg.seed)
        protocol["train_transform"] = repr(probe_train_transform(cfg.data))
        n_train, n_test = len(train_ds), len(test_ds)
    protocol["eval_transform"] = repr(eval_transform(cfg.data))
    log.info("linear probe (%s): top-1 %.2f  top-5 %.2f", lc.mode, res["top1"], res["top5"])
    extra = {k: v for k, v in res.items() if k not in ("top1", "top5", "lr")}
    return s.finish(res["top1"], res["top5"], n_train, n_test, protocol, mode=lc.mode, **extra)
