"""Run folders and logs: claiming an output folder safely, JSON-lines logs, peak memory, console logging."""
import json
import logging
import os
import resource
import sys
import time
from typing import Dict

import torch

from ..errors import UserError
from ..files import atomic_write, read_jsonl

RUN_FILES = ("config.yaml", "checkpoints", "log.jsonl", "backbone.safetensors")


def default_run_dir(name: str) -> str:
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def holds_run(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in RUN_FILES)


def check_run_dir(path: str, resuming: bool, overwrite: bool, resume_key: str = "resume") -> None:
    """Refuse to write into a folder that holds another run, unless resuming it or asked to overwrite."""
    if holds_run(path) and not resuming and not overwrite:
        raise UserError(f"output_dir '{path}' already holds a run; pass {resume_key}=auto to continue it, overwrite=true "
                        f"to move it aside (to {os.path.basename(path)}.old-<time>), or choose another output_dir")


def claim_run_dir(path: str, resuming: bool, overwrite: bool) -> None:
    """Create the run folder; with overwrite, move an earlier run aside instead of deleting it. Main process."""
    if holds_run(path) and not resuming and overwrite:
        aside = f"{path.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(path, aside)
        logging.getLogger(__name__).warning("moved the earlier run in %s to %s", path, aside)
    os.makedirs(path, exist_ok=True)


# What a run writes before its first checkpoint; a restart (resume=auto with no checkpoint) removes them.
RUN_LOGS = ("log.jsonl", "steps.jsonl", "tb", "train.log", "curves.png", "config.yaml")


def restarting(path: str, resume: str, resuming: bool) -> bool:
    """True for resume=auto on a folder that holds a run but no checkpoint (killed before its first one): there is
    nothing to continue, so the run starts again in that folder. A finished export without checkpoints is refused."""
    restart = resume == "auto" and not resuming and holds_run(path)
    if restart and os.path.exists(os.path.join(path, "backbone.safetensors")):
        raise UserError(f"'{path}' holds a finished export but no checkpoint to continue from; choose another "
                        f"output_dir or pass overwrite=true (without resume) to move it aside")
    return restart


def clear_run_logs(path: str) -> None:
    """Remove the logs of a run that never reached a checkpoint, so its restart keeps nothing stale. Main process."""
    import shutil
    for name in RUN_LOGS:
        target = os.path.join(path, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
    shutil.rmtree(os.path.join(path, "checkpoints"), ignore_errors=True)  # only *.tmp leftovers can be there


def setup_logging(is_main: bool, log_file: str = None) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint messages
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader's messages
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_ssl_bocb", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(fmt)
        h._ssl_bocb = True
        root.addHandler(h)
    if log_file and is_main:
        for h in list(root.handlers):
            if getattr(h, "_ssl_bocb_file", False):
                root.removeHandler(h)
                h.close()
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        fh._ssl_bocb_file = True
        root.addHandler(fh)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA), else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def append_jsonl(path: str, row: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_jsonl(path: str, max_step: int) -> None:
    """Keep the rows logged up to ``max_step`` (a resumed run rewrites what came after its checkpoint)."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= max_step]
    with atomic_write(path) as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
