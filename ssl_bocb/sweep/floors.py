"""The floors of a study: what its kNN evaluation gives before anything is learned.

- ``pixels``: the kNN of the raw images, each normalised with the evaluation's per-channel mean / std, flattened
  and L2-normalised, with the study's bank, queries, k and T. A representation below it has learned nothing that the
  pixels did not already hold (SPEC section 5).
- ``random_init``: each backbone variant's kNN at random init, the mean over several init seeds (one init is one
  draw: the spread over seeds is written too).

Both are read on the validation split (``val``: the choices of a study are made there) and on the test split (the
final readings), with exactly the evaluation config of the sweep's ``val_knn`` / ``knn`` stage. Written as
``floors.json`` beside the committed results table (and in the sweep's output folder)::

    {"pixels": 39.45, "bank_per_class": 1000, "random_init": {"resnet18": 20.9, ...},   # the test split's
     "init_seeds": [0, 1, 2],
     "splits": {"val": {"pixels": ..., "random_init": {...}, "random_init_seeds": {...}, "protocol": {...}, ...},
                "test": {...}}}
"""
from __future__ import annotations

import json
import logging
import os
import statistics
from typing import Dict, List, Sequence

from torch import nn

from .. import config
from ..data import norm_stats
from ..errors import UserError
from .plan import Cell, Plan

log = logging.getLogger(__name__)

# the split each floor is read on, and the sweep stage whose evaluation config reads it
SPLITS = {"val": "val_knn", "test": "knn"}


def stage_config(plan: Plan, cell: Cell, stage: str, overrides: Sequence[str] = ()):
    """The EvalConfig of ``cell``'s ``stage`` as the runner would build it, plus ``overrides``."""
    spec = next((s for s in cell.stages if s.name == stage), None)
    if spec is None:
        return None
    return config.load(config.EvalConfig, spec.files, list(spec.overrides) + list(overrides))


def pixel_knn(cfg) -> Dict:
    """kNN top-1 of raw normalised pixels under the evaluation config ``cfg`` (bank: the train split's
    ``data.subset`` per class; queries: ``data.test_split``, ``test_subset`` per class)."""
    from ..data.pipeline import eval_images
    from ..engine import make_accelerator
    from ..eval.features import extract_features
    from ..eval.knn import knn_classify
    from ..eval.stages import count_classes
    accelerator = make_accelerator(cfg, seed=cfg.seed, precision_key="mixed_precision")
    bank = eval_images(cfg.data, cfg.data.train_split, seed=cfg.seed, subset=cfg.data.subset)
    queries = eval_images(cfg.data, cfg.data.test_split, seed=cfg.seed, subset=cfg.test_subset)
    flat = nn.Flatten()
    ftr, ytr = extract_features(flat, bank, accelerator, cfg.batch_size, 0, desc="pixels bank", channels_last=False)
    fte, yte = extract_features(flat, queries, accelerator, cfg.batch_size, 0, desc="pixels queries",
                                channels_last=False)
    table = knn_classify(ftr, ytr, fte, yte, ks=[cfg.knn.k], temperature=cfg.knn.temperature, backend="torch",
                         num_classes=count_classes(bank, queries))
    return dict(top1=float(table[cfg.knn.k]["top1"]), num_train=len(ytr), num_test=len(yte))


def _variants(plan: Plan) -> Dict[str, Cell]:
    from .baselines import variant
    out: Dict[str, Cell] = {}
    for cell in plan.cells:
        out.setdefault(variant(plan, cell), cell)
    return out


def _random_init(plan: Plan, cell: Cell, key: str, stage: str, init_seed: int) -> float:
    from ..eval.stages import run_knn
    pre = config.load(config.PretrainConfig, cell.files, cell.overrides)
    model = [f"model.{k}={json.dumps(v)}" for k, v in config.to_dict(pre.model).items()]
    folder = os.path.join(plan.output_dir, "floors", key.replace(" ", "_").replace("=", "-"), f"init{init_seed}")
    cfg = stage_config(plan, cell, stage, model + [f"output_dir={folder}", "overwrite=true", f"init_seed={init_seed}"])
    return float(run_knn(cfg)["top1"])


def bank_per_class(cfg) -> int:
    return int(cfg.data.subset)


def measure(plan: Plan, init_seeds: Sequence[int] = (0, 1, 2)) -> Dict:
    """Measure both floors on every split the sweep has a stage for; write and return ``floors.json``."""
    if len(set(init_seeds)) < 3:
        raise UserError(f"the random-init floor is a mean over at least 3 init seeds, got {list(init_seeds)}")
    first = plan.cells[0]
    splits = {name: stage for name, stage in SPLITS.items() if any(s.name == stage for s in first.stages)}
    if not splits:
        raise UserError(f"sweep {plan.name} has neither a val_knn nor a knn stage: the floors are read with them")
    variants = _variants(plan)
    out: Dict = {"splits": {}, "init_seeds": list(init_seeds)}
    for split, stage in splits.items():
        cfg = stage_config(plan, first, stage)
        log.info("floors on %s: raw pixels, then %d backbone variants x %d init seeds", split, len(variants),
                 len(init_seeds))
        pix = pixel_knn(cfg)
        mean, std = norm_stats(cfg.data)
        seeds = {key: [_random_init(plan, cell, key, stage, s) for s in init_seeds] for key, cell in variants.items()}
        out["splits"][split] = dict(
            pixels=pix["top1"], num_bank=pix["num_train"], num_queries=pix["num_test"],
            bank_per_class=bank_per_class(cfg), split=cfg.data.test_split,
            random_init={k: round(statistics.mean(v), 4) for k, v in seeds.items()},
            random_init_seeds=seeds,
            protocol=dict(k=cfg.knn.k, temperature=cfg.knn.temperature, mean=list(mean), std=list(std),
                          feature="normalised pixels, flattened, L2-normalised"))
    main = out["splits"].get("test") or out["splits"]["val"]
    out.update(pixels=main["pixels"], bank_per_class=main["bank_per_class"], random_init=main["random_init"])
    write(plan, out)
    return out


def paths(plan: Plan) -> List[str]:
    out = [os.path.join(plan.output_dir, "floors.json")]
    if plan.results:
        out.append(os.path.join(os.path.dirname(plan.results), "floors.json"))
    return out


def write(plan: Plan, floors: Dict) -> None:
    from ..files import write_json
    for p in paths(plan):
        os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
        write_json(p, floors)
