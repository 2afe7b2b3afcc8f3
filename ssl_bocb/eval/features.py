"""Frozen-backbone inputs for evaluation: loading what was pretrained, extracting and caching features."""
import hashlib
import json
import logging
import os
from typing import Dict, Optional, Tuple

import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import data_root
from ..data.archive import default_cache_dir
from ..data.pipeline import num_workers, worker_options
from ..device import use_channels_last
from ..engine import checkpoint as ckpt
from ..errors import UserError
from ..files import atomic_path
from ..models import create_backbone, load_backbone
from ..models.backbones import backbone_kwargs_from_cfg

log = logging.getLogger(__name__)


def resolve_checkpoint(path: str) -> Tuple[str, str]:
    """Classify ``checkpoint=``: ('export', backbone.safetensors path) or ('state', checkpoint folder)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint '{path}' does not exist; pass a pretraining run folder, a checkpoint folder "
                        f"or a backbone.safetensors file")
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "export", path
        raise UserError(f"checkpoint '{path}' is a file but not a .safetensors export; pass the run folder instead")
    if os.path.isfile(os.path.join(path, "backbone.safetensors")):
        return "export", os.path.join(path, "backbone.safetensors")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return "state", path
    latest = ckpt.latest_checkpoint(path)
    if latest:
        return "state", latest
    raise UserError(f"'{path}' holds neither backbone.safetensors nor a checkpoint (checkpoints/step-*/); is it a "
                    f"pretraining run folder?")


def load_eval_backbone(checkpoint: str, model_cfg, init_seed: int = 0) -> Tuple[nn.Module, Dict]:
    """The backbone to evaluate and a description of it. Without a checkpoint: ``model.backbone`` at random init
    drawn with ``init_seed`` (the baseline every result is read against; seed 0 unless asked)."""
    if not checkpoint:
        torch.manual_seed(init_seed)
        model = create_backbone(model_cfg.backbone, **backbone_kwargs_from_cfg(model_cfg))
        return model, {"checkpoint": None, "backbone": model_cfg.backbone, "init": "random", "init_seed": init_seed}
    kind, path = resolve_checkpoint(checkpoint)
    if kind == "export":
        model = load_backbone(path)
        return model, {"checkpoint": os.path.abspath(path), "backbone": model.ssl_bocb_spec["timm_name"],
                       "init": "pretrained"}
    meta = ckpt.read_meta(path)
    mcfg = meta.get("config", {}).get("model")
    if mcfg is None:
        raise UserError(f"'{path}' is not an ssl_bocb pretraining checkpoint (meta.json has no model config)")
    from omegaconf import OmegaConf
    model = create_backbone(mcfg["backbone"], **backbone_kwargs_from_cfg(OmegaConf.create(mcfg)))
    weights = os.path.join(path, "model.safetensors")
    if not os.path.isfile(weights):
        raise UserError(f"checkpoint '{path}' has no model.safetensors")
    state = safetensors.torch.load_file(weights)
    backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    try:
        model.load_state_dict(backbone_state)
    except RuntimeError as e:
        raise UserError(f"checkpoint '{path}' does not fit {mcfg['backbone']} ({str(e).splitlines()[0]})") from None
    return model, {"checkpoint": os.path.abspath(path), "backbone": mcfg["backbone"], "init": "pretrained",
                   "pretrain_step": meta.get("step")}


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes and bytes): the cache key of its content."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_loader(dataset, accelerator, batch_size: int = 256, num_workers: int = 2):
    """The sharded, in-order loader :func:`extract_features` reads; build it once to embed the same data again (its
    workers then stay alive between passes)."""
    options = {"num_workers": num_workers, **getattr(dataset, "loader_kwargs", {})}  # decoded data: no workers
    options.update(worker_options(options["num_workers"]))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=accelerator.device.type == "cuda",
                        **options)
    return accelerator.prepare_data_loader(loader)


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset, accelerator, batch_size: int = 256, num_workers: int = 2,
                     desc: str = "features", channels_last: Optional[bool] = None,
                     loader=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backbone features in eval mode: [N, num_features] float32 and labels [N], in dataset order, on CPU.

    Runs through Accelerate: each process embeds its shard and ``gather_for_metrics`` drops the padding that
    evens out the last batch. ``channels_last`` as ``train.channels_last`` (None = auto for the device). ``loader``:
    one from :func:`feature_loader` over ``dataset``, reused.
    """
    layout = (torch.channels_last if use_channels_last(channels_last, backbone, accelerator.device)
              else torch.contiguous_format)
    model = backbone.to(accelerator.device, memory_format=layout)
    loader = loader if loader is not None else feature_loader(dataset, accelerator, batch_size, num_workers)
    model.eval()
    feats, labels = [], []
    bar = tqdm(total=len(dataset), unit="img", unit_scale=True, desc=desc, disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    for x, y, _ in loader:
        with accelerator.autocast():
            f = model(x.contiguous(memory_format=layout))
        f, y = accelerator.gather_for_metrics((f.float().contiguous(), y))
        feats.append(f.cpu())
        labels.append(y.cpu())
        bar.update(f.shape[0])
    bar.close()
    return torch.cat(feats), torch.cat(labels)


def feature_cache_key(digest: str, data_cfg, split: str, subset: int, transform, precision: str = "no") -> str:
    """Features are reused only for the same weights, data, split, subset, transform and precision."""
    key = {"weights": digest, "dataset": data_cfg.name, "root": os.path.abspath(data_root(data_cfg.root)),
           "split": split, "subset": subset, "transform": repr(transform), "precision": precision}
    if getattr(data_cfg, "holdout_per_class", 0):  # only when set, so that earlier caches keep their keys
        key["holdout_per_class"] = data_cfg.holdout_per_class
    desc = json.dumps(key, sort_keys=True)
    return hashlib.sha256(desc.encode()).hexdigest()[:24]


def load_cached(path: str):
    """A feature-cache file read with weights_only=True. A file holding other pickled objects is refused (it was not
    written here, or was altered); a damaged one is reported and recomputed (None)."""
    import pickle
    try:
        blob = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing feature cache '{path}': it holds pickled objects other than tensors "
                        f"({str(e).splitlines()[0][:160]}); ssl_bocb never writes such files; delete it (or set "
                        f"use_cache=false) and run again; it was not loaded") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        log.warning("feature cache %s is damaged (%s); computing the features again", path, str(e).splitlines()[0])
        return None
    if not (isinstance(blob, dict) and torch.is_tensor(blob.get("features")) and torch.is_tensor(blob.get("labels"))):
        log.warning("feature cache %s does not hold features and labels; computing them again", path)
        return None
    return blob


def cached_features(backbone: nn.Module, digest: str, dataset, data_cfg, split: str, subset: int, accelerator,
                    batch_size: int, use_cache: bool = True, cache_dir: str = "") -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """Features from the cache when the same weights, dataset, split, subset and transform were embedded before;
    returns (features, labels, hit)."""
    layout = "channels_last" if use_channels_last(None, backbone, accelerator.device) else "contiguous"
    key = feature_cache_key(digest, data_cfg, split, subset, dataset.transform,
                            f"{accelerator.mixed_precision}/{layout}")
    path = os.path.join(default_cache_dir(cache_dir), "features", f"{key}.pt")
    if use_cache and os.path.isfile(path):
        blob = load_cached(path)
        if blob is not None:
            log.info("feature cache hit for %s %s (%s)", data_cfg.name, split, path)
            return blob["features"], blob["labels"], True
    feats, labels = extract_features(backbone, dataset, accelerator, batch_size, num_workers(data_cfg),
                                     desc=f"{data_cfg.name} {split}")
    if use_cache and accelerator.is_main_process:
        with atomic_path(path) as tmp:
            torch.save({"features": feats, "labels": labels}, tmp)
    return feats, labels, False
