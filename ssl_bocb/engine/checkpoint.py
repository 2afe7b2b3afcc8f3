"""Checkpoints through Accelerate's save_state / load_state, written atomically and self-describing.

Layout: ``<run>/checkpoints/step-00001234/`` holds Accelerate's state (model incl. momentum encoder, optimizer,
grad scaler, RNG states) and ``meta.json`` (plain dict: step, epoch, config, backbone spec). The folder is
written as ``*.tmp`` and renamed when complete, so a crash never leaves a checkpoint that looks finished.
"""
import json
import os
import re
import shutil
from typing import Optional

from ..errors import UserError

CKPT_RE = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str):
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := CKPT_RE.match(d))]
    return [p for _, p in sorted(found) if os.path.isfile(os.path.join(p, "meta.json"))]


def latest_checkpoint(run_dir: str) -> Optional[str]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def read_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def resolve_resume(resume: str, output_dir: str) -> Optional[str]:
    """'' -> None; 'auto' -> newest checkpoint in output_dir (None if there is none); a checkpoint folder or a
    run folder (its newest checkpoint) -> that path. A path that does not exist is an error."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir) if output_dir else None
    if not os.path.exists(resume):
        raise UserError(f"resume path '{resume}' does not exist; pass resume=auto or the path of a checkpoint "
                        f"folder (<run>/checkpoints/step-NNNNNNNN) or of a run folder")
    if os.path.isfile(os.path.join(resume, "meta.json")):
        return resume
    latest = latest_checkpoint(resume)
    if latest is None:
        raise UserError(f"resume path '{resume}' holds no complete checkpoint (no checkpoints/step-*/meta.json)")
    return latest


def check_same_model(meta: dict, model_cfg: dict, path: str) -> None:
    """A checkpoint must come from the same model configuration as the run that loads it."""
    saved = meta.get("config", {}).get("model")
    if saved is None:
        raise UserError(f"'{path}' is not an ssl_bocb pretraining checkpoint (meta.json has no model config)")
    from ..config import ModelConfig, to_dict
    from omegaconf import OmegaConf
    saved = {**to_dict(OmegaConf.structured(ModelConfig)), **saved}  # keys added since then take their defaults
    diff = sorted(k for k in set(saved) | set(model_cfg) if saved.get(k) != model_cfg.get(k))
    if diff:
        pairs = ", ".join(f"model.{k}: checkpoint {saved.get(k)!r} vs config {model_cfg.get(k)!r}" for k in diff)
        raise UserError(f"checkpoint '{path}' belongs to another model ({pairs}); resume with the config it was "
                        f"trained with or start a new run")


def check_same_optimizer(meta: dict, derived: dict, path: str) -> None:
    """A resumed run must use the optimizer and parameter groups its checkpoint was trained with: an optimizer
    state would otherwise load into groups of the same sizes and silently carry the old settings."""
    saved = meta.get("derived", {})

    def groups(d):
        return [(g["name"], g["tensors"], g["params"]) for g in d.get("param_groups", [])]
    old_name, new_name = saved.get("optimizer", {}).get("name"), derived["optimizer"]["name"]
    if old_name != new_name or groups(saved) != groups(derived):
        raise UserError(f"checkpoint '{path}' was trained with optimizer {old_name} and parameter groups "
                        f"{groups(saved)}, this config asks for {new_name} with {groups(derived)}; resume with the "
                        f"optim settings it was trained with (optim.name, optim.weight_decay_policy, "
                        f"optim.trust_ratio_policy) or start a new run")


def save_checkpoint(accelerator, run_dir: str, meta: dict, keep: int = 0) -> str:
    """Save the full training state at ``meta['step']``; every process must call this."""
    path = os.path.join(checkpoint_dir(run_dir), f"step-{meta['step']:08d}")
    tmp = path + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
        if keep > 0:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator, path: str) -> dict:
    try:
        accelerator.load_state(path)
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as e:
        raise UserError(f"cannot load checkpoint '{path}' ({str(e).splitlines()[0][:300]}); was it written "
                        f"by this model and optimizer?") from None
    return read_meta(path)
