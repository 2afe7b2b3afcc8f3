"""Checkpoints through Accelerate's save_state / load_state, written atomically, verified, and loaded safely.

Layout: ``<run>/checkpoints/step-00001234/`` holds Accelerate's state (model incl. momentum encoder, optimizer,
grad scaler, RNG states), extra states as safetensors (the fine-tune EMA) and ``meta.json`` (plain dict: step,
epoch, config, backbone spec, event counts, and the size and SHA-256 of every other file). The folder is written as
``*.tmp``, flushed to disk, and renamed when complete, so a crash (even kill -9 mid-write) never leaves a
checkpoint that looks finished. ``resume=auto`` verifies the newest checkpoint against its meta.json and falls
back to the one before, with a warning, when it is truncated or corrupt.

Nothing unsafe is loaded: model weights are safetensors, and every pickle-based file (optimizer, scheduler, grad
scaler, RNG states) is read with ``torch.load(weights_only=True)``, which refuses any object other than tensors
and plain containers; such a file is refused with one line, and its payload never runs.
"""
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from typing import Dict, Optional

import torch

from ..errors import UserError
from ..files import read_json, strict

log = logging.getLogger(__name__)

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
    return read_json(os.path.join(path, "meta.json"), f"checkpoint '{path}': its meta.json",
                     fix="resume from another checkpoint")


def _sha256(path: str, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _manifest(folder: str) -> Dict[str, Dict]:
    """Size and SHA-256 of every file of a checkpoint folder (meta.json aside), flushed to disk on the way."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder)
            if rel == "meta.json":
                continue
            out[rel] = dict(size=os.path.getsize(full), sha256=_sha256(full, fsync=True))
    return out


def verify_checkpoint(path: str) -> Optional[str]:
    """None when the checkpoint's files are all there with the sizes and hashes its meta.json recorded; else the
    reason it cannot be used. (Checkpoints written before manifests existed are checked for their files only.)"""
    try:
        meta = read_meta(path)
    except (UserError, OSError) as e:
        return str(e)
    files = meta.get("files")
    if files is None:
        return None if any(f.endswith(".safetensors") for f in os.listdir(path)) else "no model weights"
    for rel, want in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != want["size"]:
            return f"{rel} has {os.path.getsize(full)} bytes, {want['size']} were written (truncated?)"
        if _sha256(full) != want["sha256"]:
            return f"{rel} does not match the SHA-256 recorded when it was written (corrupt?)"
    return None


def resolve_resume(resume: str, output_dir: str) -> Optional[str]:
    """'' -> None; 'auto' -> newest sound checkpoint in output_dir (None if there is none; a truncated or corrupt
    newest one is skipped with a warning for the one before); a checkpoint folder or a run folder (its newest
    checkpoint) -> that path, which must be sound. A path that does not exist is an error."""
    if not resume:
        return None
    if resume == "auto":
        return newest_sound_checkpoint(output_dir) if output_dir else None
    if not os.path.exists(resume):
        raise UserError(f"resume path '{resume}' does not exist; pass resume=auto or the path of a checkpoint "
                        f"folder (<run>/checkpoints/step-NNNNNNNN) or of a run folder")
    path = resume if os.path.isfile(os.path.join(resume, "meta.json")) else latest_checkpoint(resume)
    if path is None:
        raise UserError(f"resume path '{resume}' holds no complete checkpoint (no checkpoints/step-*/meta.json)")
    bad = verify_checkpoint(path)
    if bad:
        raise UserError(f"checkpoint '{path}' cannot be used: {bad}; resume from the one before it (or resume=auto, "
                        f"which skips it)")
    return path


def newest_sound_checkpoint(run_dir: str, before_step: Optional[int] = None) -> Optional[str]:
    """The newest checkpoint of ``run_dir`` that verifies (and is older than ``before_step`` when given)."""
    for path in reversed(list_checkpoints(run_dir)):
        if before_step is not None and int(CKPT_RE.match(os.path.basename(path)).group(1)) >= before_step:
            continue
        bad = verify_checkpoint(path)
        if bad is None:
            return path
        log.warning("checkpoint %s cannot be used (%s); trying the one before", path, bad)
    return None


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


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(accelerator, run_dir: str, meta: dict, keep: int = 0,
                    extra: Optional[Dict[str, Dict[str, torch.Tensor]]] = None, protect: Optional[str] = None) -> str:
    """Save the full training state at ``meta['step']``; every process must call this. ``extra`` maps a name to a
    state dict of tensors saved as ``<name>.safetensors`` beside Accelerate's files (load with load_extra). Of the
    older checkpoints, the newest ``keep`` are kept (0: all), and ``protect`` (a rollback target) in any case."""
    path = os.path.join(checkpoint_dir(run_dir), f"step-{meta['step']:08d}")
    tmp = path + ".tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        import safetensors.torch
        for name, state in (extra or {}).items():
            safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                                        os.path.join(tmp, f"{name}.safetensors"))
        meta = dict(meta, files=_manifest(tmp))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(strict(meta, "string"), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
        _fsync_dir(checkpoint_dir(run_dir))
        if keep > 0:
            for old in list_checkpoints(run_dir)[:-keep]:
                if protect is None or os.path.abspath(old) != os.path.abspath(protect):
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def _refuse_unsafe(path: str) -> None:
    """Open every pickle-based file of a checkpoint with weights_only=True (Accelerate reads the RNG states in a
    try / except that would hide a refusal); a file holding anything but tensors and plain containers stops here."""
    from accelerate.utils import load as accelerate_load  # weights_only=True plus numpy's RNG-state types
    for name in sorted(os.listdir(path)):
        if not name.endswith((".bin", ".pkl", ".pt", ".pth")):
            continue
        try:
            accelerate_load(os.path.join(path, name), map_location="cpu")
        except pickle.UnpicklingError as e:
            raise UserError(f"refusing '{os.path.join(path, name)}': it holds pickled objects other than tensors "
                            f"({str(e).splitlines()[0][:160]}); ssl_bocb never writes such files, so it was not "
                            f"written by ssl_bocb or was altered; it was not loaded") from None
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise UserError(f"cannot read '{os.path.join(path, name)}' ({str(e).splitlines()[0][:200]}); the "
                            f"checkpoint is damaged: resume from the one before it") from None


def load_checkpoint(accelerator, path: str) -> dict:
    _refuse_unsafe(path)
    try:
        accelerator.load_state(path)
    except (RuntimeError, KeyError, ValueError, FileNotFoundError) as e:
        raise UserError(f"cannot load checkpoint '{path}' ({str(e).splitlines()[0][:300]}); was it written "
                        f"by this model and optimizer?") from None
    return read_meta(path)


def load_extra(path: str, name: str) -> Optional[Dict[str, torch.Tensor]]:
    """A state saved with ``save_checkpoint(extra={name: ...})``; None when the checkpoint has none."""
    import safetensors.torch
    full = os.path.join(path, f"{name}.safetensors")
    return safetensors.torch.load_file(full) if os.path.isfile(full) else None
