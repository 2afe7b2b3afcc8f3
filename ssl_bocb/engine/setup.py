"""What every training task sets up the same way: the accelerator, the run folder (resolved, checked before anything
is written, then claimed), the resolved config with its derived values, and the log lines describing the
optimizer. Pretraining and fine-tuning call these; each builds its own data and model."""
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed

from .. import config as config_mod
from ..data import order_seed
from ..device import resolve_precision
from ..dist import process_seed
from ..errors import UserError
from . import checkpoint as ckpt
from . import logs

log = logging.getLogger(__name__)


def make_accelerator(train_cfg, seed: int = 0, precision_key: str = "train.mixed_precision") -> Accelerator:
    """Accelerate decides the device; the seedable sampler makes each epoch's order a function of
    (seed, epoch), so a resumed run continues the same permutation, and different seeds never share an order."""
    # Several processes on a machine with no accelerator (torchrun / accelerate launch --multi_gpu on a CPU box)
    # need Accelerate's CPU mode to form a gloo process group instead of running as independent copies.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = train_cfg.cpu or (launched and not torch.accelerator.is_available())
    if not launched:  # one process may run several stages (quickstart, tests), each with its own settings
        AcceleratorState._reset_state(reset_partial_state=True)
    # the device first (Accelerate's process state decides it), then the precision that suits it
    precision = resolve_precision(train_cfg.mixed_precision, PartialState(cpu=cpu).device, precision_key)
    try:
        return Accelerator(mixed_precision=precision, cpu=cpu,
                           # non_blocking: the batch's copy to a GPU overlaps the step (pinned by the loaders)
                           dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True,
                                                                     data_seed=order_seed(seed)))
    except ValueError as e:
        raise UserError(f"{precision_key}={precision} cannot run here ({e}); use auto, bf16 or no on CPU") from None


@dataclass
class RunFolder:
    """Where a run writes, and whether it continues an earlier one."""
    path: str
    resume_path: Optional[str]   # the checkpoint to continue from
    restart: bool                # resume=auto on a folder killed before its first checkpoint: start it again there
    overwrite: bool
    meta: Optional[dict] = None  # the checkpoint's meta.json

    @property
    def resuming(self) -> bool:
        return self.resume_path is not None


def resolve_run_folder(resume: str, output_dir: str, default: str, overwrite: bool,
                       resume_key: str = "resume") -> RunFolder:
    """The run folder and the checkpoint to resume, checked before anything is written: the folder must not hold
    another run unless resuming it or asked to overwrite. ``default`` is used without output_dir or checkpoint."""
    resume_path = ckpt.resolve_resume(resume, output_dir)
    if resume and resume != "auto" and resume_path is None:
        raise UserError(f"nothing to resume at '{resume}'")
    if output_dir:
        path = output_dir
    elif resume_path:
        path = os.path.dirname(os.path.dirname(os.path.abspath(resume_path)))
    else:
        path = default
    restart = logs.restarting(path, resume, resume_path is not None)
    logs.check_run_dir(path, resume_path is not None or restart, overwrite, resume_key=resume_key)
    meta = ckpt.read_meta(resume_path) if resume_path else None
    return RunFolder(path, resume_path, restart, overwrite, meta)


def shared_path(accelerator, path: str) -> str:
    """The main process's choice of folder (its clock named it), so that every process agrees."""
    return broadcast_object_list([path])[0] if accelerator.num_processes > 1 else path


def open_run_folder(accelerator, folder: RunFolder, cfg, derived: dict) -> None:
    """Claim the folder (moving an earlier run aside with overwrite), clear a restarted run's logs, start train.log
    and write config.yaml with the derived values. Call once bad input can no longer fail the run."""
    if accelerator.is_main_process:
        logs.claim_run_dir(folder.path, folder.resuming or folder.restart, folder.overwrite)
        if folder.restart:
            logs.clear_run_logs(folder.path)
    accelerator.wait_for_everyone()
    logs.setup_logging(accelerator.is_main_process, os.path.join(folder.path, "train.log"))
    if accelerator.is_main_process:
        config_mod.save(cfg, os.path.join(folder.path, "config.yaml"), derived)
    log.info("run folder: %s", folder.path)


def log_optimizer(resolved, lr: float, batch_size: int, wd: float, wd_end: float, optimizer_record: dict, groups,
                  settings) -> None:
    """The optimizer as built: lr and where it came from, weight decay, options, groups, SAM and clipping."""
    log.info("optimizer %s (%s): lr = %g (base_lr %g x %s scaling of batch %d), weight decay %g -> %g; options %s",
             resolved.entry.name, resolved.entry.source, lr, resolved.base_lr, resolved.lr_scaling, batch_size, wd,
             wd_end, optimizer_record["options"])
    for g in groups:
        log.info("param group %-16s %4d tensors %11d params weight_decay %g trust_ratio %s", g["name"], g["tensors"],
                 g["params"], g["weight_decay"], g["trust_ratio"] if resolved.entry.trust_ratio else "n/a")
    if settings.sam_rho > 0:
        log.info("SAM%s rho %g: two forward / backward passes per step", " (adaptive)" if settings.sam_adaptive
                 else "", settings.sam_rho)
    if settings.first_layer:
        log.info("gradient clipping: the first layer only (%d tensors), norm <= %g", len(settings.first_layer),
                 settings.clip)


def seed_process_streams(accelerator, seed: int) -> None:
    """After the model is built (the same initial weights everywhere): each process draws from its own random
    streams from here on (dist.process_seed; process 0 keeps ``seed``'s stream as it was). Checkpoints keep each
    process's states (Accelerate's random_states_<i>.pkl), so a resume continues every stream exactly."""
    if accelerator.process_index > 0:
        set_seed(process_seed(seed, accelerator.process_index))
