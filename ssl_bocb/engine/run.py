"""One way to run a training task: ``run_task`` owns the setup every task shares (the run folder, resolved and
checked before anything is written; the accelerator with its precision and seeded sampler; logging; the resume;
config.yaml; the trackers; the loop; the curves figure; the end of training) and calls the task's hooks for what
is its own."""
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from . import logs
from .loop import Task, TrainLoop
from .tracking import start_trackers
from .setup import RunFolder, make_accelerator, open_run_folder, resolve_run_folder, shared_path

log = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """Where a task's run goes and how its accelerator is made, read off the task's config."""
    resume: str                  # "", "auto" or a checkpoint / run folder
    output_dir: str              # "" for the default folder
    default_dir: str             # the folder without output_dir and checkpoint
    overwrite: bool
    accelerator_cfg: Any         # the config section holding mixed_precision and cpu
    seed: int
    precision_key: str = "train.mixed_precision"
    resume_key: str = "resume"
    # a check of the resolved folder before the task is built (a checkpoint of another model, a result that exists)
    check: Optional[Callable[[RunFolder], None]] = None


def run_task(build: Callable[[Any, str], Task], cfg, spec: RunSpec,
             figure: Optional[Callable[[str], str]] = None) -> Any:
    """Build the task with ``build(accelerator, run_dir)``, resume it when asked, train it through the one loop and
    return ``task.finish(status, loop, seconds)``. Bad input fails before any folder is touched."""
    t0 = time.time()
    folder = resolve_run_folder(spec.resume, spec.output_dir, spec.default_dir, spec.overwrite, spec.resume_key)
    if spec.check is not None:
        spec.check(folder)
    accelerator = make_accelerator(spec.accelerator_cfg, seed=spec.seed, precision_key=spec.precision_key)
    folder.path = shared_path(accelerator, folder.path)
    logs.setup_logging(accelerator.is_main_process)
    task = build(accelerator, folder.path)
    if folder.resuming:  # before anything is written: a checkpoint that does not fit fails cleanly
        task.resume(folder.resume_path, folder.meta)
    open_run_folder(accelerator, folder, cfg, task.derived)
    start_trackers(accelerator, getattr(cfg, "log", None), folder.path, task.config, fresh=not folder.resuming)
    loop = TrainLoop(task, task.loop_settings(), folder.meta)
    task.log_setup(folder, loop)
    status = loop.run()
    result = task.finish(status, loop, time.time() - t0)
    loop.close(figure)
    accelerator.end_training()
    log.info("run folder: %s", folder.path)
    return result
