"""What the report measures on each run folder: weight diagnostics (cached), optimizer-state memory, images seen and
pretraining FLOPs, instability events, sharpness."""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..files import write_text
from .plots import read_jsonl
from .options import Options
from .sources import has_folder


LAYER_METRICS = ("alpha", "matrix_entropy", "value_entropy", "l2_norm", "pca_energy")


def _cache_key(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_size}-{int(st.st_mtime_ns)}"


def weight_rows(folder: str, cache_dir: str, pca_frac: float, bins: int) -> Optional[List[Dict]]:
    """Per-layer diagnostics of a run's exported backbone (cached by file size and time under ``cache_dir``)."""
    weights = os.path.join(folder, "backbone.safetensors")
    if not os.path.isfile(weights):
        return None
    key = f"{_cache_key(weights)}-{pca_frac}-{bins}"
    cache = os.path.join(cache_dir, os.path.basename(os.path.normpath(folder)) + ".weights.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved["layers"]
    from ..models.export import load_backbone
    from .spectral import model_metrics
    layers = model_metrics(load_backbone(folder), bins=bins, pca_frac=pca_frac)
    write_text(cache, json.dumps(dict(key=key, layers=layers)))
    return layers


def optimizer_state_mb(folder: str) -> Optional[float]:
    """Size of the optimizer state (its tensors) in the run's newest checkpoint, MB."""
    from ..engine.checkpoint import latest_checkpoint
    ckpt = latest_checkpoint(folder) if folder and os.path.isdir(folder) else None
    path = os.path.join(ckpt, "optimizer.bin") if ckpt else ""
    if not os.path.isfile(path):
        return None
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    total = 0

    def walk(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(state.get("state", {}))
    return total / 2 ** 20


def run_config(folder: str) -> Dict:
    """A run's saved config.yaml as a plain dict ({} when there is none)."""
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        return {}
    import yaml
    with open(path) as f:
        return yaml.safe_load(f) or {}


def images_seen(folder: str, c: Dict) -> Optional[int]:
    epochs = read_jsonl(os.path.join(folder, "log.jsonl"))
    if not epochs or not c:
        return None
    d = c.get("derived", {})
    batch = d.get("per_device_batch", 0) * d.get("world_size", 1)
    return int(epochs[-1]["step"]) * int(batch) if batch else None


def pretrain_flops(folder: str, c: Dict, images: Optional[int]) -> Optional[float]:
    """Approximate pretraining compute: forward FLOPs of the backbone on one image (torch's FLOP counter, at the
    run's image size) x 8 per image (two views, each a forward and a backward of about twice its cost, plus the
    momentum encoder's forward) x images seen. Heads are left out; with no momentum encoder it is x 6."""
    if not images or not c or not os.path.isfile(os.path.join(folder, "backbone.safetensors")):
        return None
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..models.export import load_backbone
    size = int(c.get("data", {}).get("image_size", 224))
    per_image = 8 if float(c.get("moco", {}).get("momentum", 0.99)) > 0 else 6
    model = load_backbone(folder).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops()) * per_image * images


@dataclass
class RunMeasurements:
    """What the report measures in each run folder, keyed by cell (or folder name)."""
    by_key: Dict[str, Dict]
    pairs: List[Tuple[str, str]]
    events: Dict = field(default_factory=OrderedDict)
    finetune_events: Dict = field(default_factory=OrderedDict)
    opt_mb: Dict = field(default_factory=OrderedDict)
    seen: Dict = field(default_factory=OrderedDict)
    flops: Dict = field(default_factory=OrderedDict)
    weights: Dict = field(default_factory=OrderedDict)
    sharp: Dict = field(default_factory=OrderedDict)

    def pair_mean(self, values: Dict[str, Optional[float]], pair) -> Optional[float]:
        v = [x for k, x in values.items() if x is not None and
             (self.by_key[k]["backbone"], self.by_key[k]["optimizer"]) == pair]
        return float(np.mean(v)) if v else None


def measure_runs(folders: List[Dict], opts: Options, out_dir: str, progress: bool) -> RunMeasurements:
    from tqdm import tqdm
    from .stability import run_events
    runs = RunMeasurements(by_key={(r.get("cell") or os.path.basename(r["folder"])): r for r in folders},
                           pairs=list(OrderedDict.fromkeys((r["backbone"], r["optimizer"]) for r in folders)))
    cache_dir = os.path.join(out_dir, "cache")
    bar = tqdm(folders, desc="run folders", unit="run", disable=not progress)
    for r in bar:
        bar.set_postfix_str(os.path.basename(r["folder"])[:40])
        key = r.get("cell") or os.path.basename(r["folder"])
        if not has_folder(r):  # only the table's counts: no folder here
            runs.events[key] = dict(r["table_events"])
            continue
        runs.events[key] = run_events(r["folder"])
        finetune = os.path.join(r["folder"], "finetune")
        if os.path.isfile(os.path.join(finetune, "summary.json")):
            runs.finetune_events[key] = run_events(finetune)
        runs.opt_mb[key] = optimizer_state_mb(r["folder"])
        cfg = run_config(r["folder"])
        runs.seen[key] = images_seen(r["folder"], cfg)
        runs.flops[key] = pretrain_flops(r["folder"], cfg, runs.seen[key])
        if opts.weights:
            w = weight_rows(r["folder"], cache_dir, opts.pca_frac, opts.bins)
            if w is not None:
                runs.weights[key] = w
        if opts.sharpness:
            from .sharpness import run_sharpness
            runs.sharp[key] = run_sharpness(r["folder"], opts.sharpness_batch, opts.sharpness_iters)
    bar.close()
    return runs


def mean_layers(runs: List[List[Dict]]) -> List[Dict]:
    """Layer by layer, the mean of each weight metric over runs (non-finite values left out)."""
    layers = []
    for i in range(len(runs[0])):
        layer = dict(name=runs[0][i]["name"])
        for key in LAYER_METRICS:
            vals = [run[i][key] for run in runs if run[i][key] is not None and math.isfinite(run[i][key])]
            layer[key] = float(np.mean(vals)) if vals else None
        layers.append(layer)
    return layers
