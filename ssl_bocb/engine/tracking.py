"""The run's experiment trackers, through Accelerate's tracker classes: TensorBoard (the default), Weights & Biases
and MLflow (``log.trackers``). They are registered on the accelerator, so that ``accelerator.log`` writes to each
and ``accelerator.end_training`` closes them; only the main process writes.

A run's tracker ids are kept in ``<run>/trackers.json`` from its first start: a resumed run (``resume=auto``, after
a stop, a kill or a preemption) continues the same wandb run and the same MLflow run. The resolved config is logged
as the hyper-parameters once, when the run starts fresh.
"""
import json
import logging
import os
import secrets
from typing import Dict, List, Optional

from ..errors import UserError
from ..files import read_json, write_json

log = logging.getLogger(__name__)

IDS_FILE = "trackers.json"


def _flat(d: Dict, prefix: str = "") -> Dict:
    """The config as {dotted key: int | float | str | bool}, what every tracker takes as a hyper-parameter."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (bool, int, float, str)):
            out[prefix + k] = v
        else:
            out[prefix + k] = "null" if v is None else json.dumps(v)
    return out


def _need(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"log.trackers has {extra}, which needs the {module} package: pip install "
                        f"'ssl_bocb[{extra}]' (or drop {extra} from log.trackers)") from None


def read_ids(run_dir: str) -> Dict[str, str]:
    path = os.path.join(run_dir, IDS_FILE)
    return read_json(path, "tracker ids", fix="delete it to start new tracker runs") if os.path.isfile(path) else {}


def _make(name: str, log_cfg, run_dir: str, run_name: str, ids: Dict[str, str]):
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker
    if name == "tensorboard":
        return TensorBoardTracker("tb", run_dir)
    if name == "wandb":
        kwargs = dict(id=ids.get("wandb") or secrets.token_hex(4), resume="allow", dir=run_dir, name=run_name)
        if log_cfg.wandb_mode:
            kwargs["mode"] = log_cfg.wandb_mode
        return WandBTracker(log_cfg.project, **kwargs)
    import mlflow
    uri = (log_cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
           or "file:" + os.path.abspath("mlruns"))
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 keeps its file store in maintenance mode and asks for this opt-in; a server or a database URI
        # (log.mlflow_tracking_uri, $MLFLOW_TRACKING_URI) needs none
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    return MLflowTracker(experiment_name=log_cfg.project, run_id=ids.get("mlflow"), run_name=run_name)


def _run_id(name: str, tracker) -> Optional[str]:
    if name == "wandb":
        return tracker.run.id
    if name == "mlflow":
        return tracker.active_run.info.run_id
    return None


def start_trackers(accelerator, log_cfg, run_dir: str, config: Dict, fresh: bool) -> List[str]:
    """Start the trackers of ``log.trackers`` for the run in ``run_dir`` (the folder exists), log ``config`` as the
    hyper-parameters when ``fresh``, and keep their run ids; returns the trackers' names."""
    names = list(log_cfg.trackers) if log_cfg is not None else ["tensorboard"]
    if not names or not accelerator.is_main_process:
        return names
    for name in ("wandb", "mlflow"):  # a missing package fails before any tracker starts
        if name in names:
            _need(name, name)
    ids = read_ids(run_dir)  # this folder's runs (an overwritten folder's files were moved away)
    run_name = log_cfg.run_name or os.path.basename(os.path.normpath(run_dir))
    started = {}
    for name in dict.fromkeys(names):
        tracker = _make(name, log_cfg, run_dir, run_name, ids)
        tracker.start()
        if fresh:
            tracker.store_init_configuration(_flat(config))
        accelerator.trackers.append(tracker)
        started[name] = _run_id(name, tracker)
    kept = {k: v for k, v in started.items() if v}
    if kept and kept != ids:
        write_json(os.path.join(run_dir, IDS_FILE), kept)
    if kept:
        log.info("trackers: %s", ", ".join(f"{k} run {v}" if v else k for k, v in started.items()))
    return names
