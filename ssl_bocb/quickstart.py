"""Pretrain -> kNN -> cached linear probe, next to the same backbone at random init (the quickstart job)."""
import logging
import os

from omegaconf import OmegaConf

from . import config
from .tasks import pretrain
from .eval.stages import run_knn, run_linprobe

log = logging.getLogger(__name__)


def eval_config(pre_cfg, **top) -> "config.DictConfig":
    """Evaluation config on the pretraining dataset: full train split as bank / probe set, full test split."""
    cfg = config.load(config.EvalConfig)
    for key in ("name", "root", "cache_dir", "image_size", "num_workers", "mean", "std", "train_split",
                "test_split", "fake_per_class", "fake_classes"):
        cfg.data[key] = pre_cfg.data[key]
    cfg.model = OmegaConf.merge(cfg.model, pre_cfg.model)
    for key, value in top.items():
        cfg[key] = value
    return cfg


def run(pre_cfg, name: str = "quickstart") -> dict:
    run_dir = pretrain(pre_cfg, name)
    results = {}
    for label, cfg in (("MoCo v3", eval_config(pre_cfg, checkpoint=run_dir)),
                       ("random init", eval_config(pre_cfg, output_dir=os.path.join(run_dir, "random-init")))):
        results[label] = (run_knn(cfg), run_linprobe(cfg))
    epochs = pre_cfg.train.epochs
    lines = [f"{'':24s}{'kNN top-1 (k=20)':>18s}{'linear probe top-1':>20s}"]
    for label, (knn, lin) in results.items():
        tag = f"{label} ({epochs} ep)" if label == "MoCo v3" else label
        lines.append(f"{tag:24s}{knn['top1']:18.2f}{lin['top1']:20.2f}")
    table = "\n".join(lines)
    print(f"\n{pre_cfg.model.backbone} on {pre_cfg.data.name} ({knn['num_test']} test images, cached probe):\n{table}\n"
          f"results: {run_dir}/{{knn,linprobe}}_metrics.json, random-init/, curves.png", flush=True)
    return {"run_dir": run_dir, "results": results}
