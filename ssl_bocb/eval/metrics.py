"""One schema for every evaluation result file (knn_metrics.json, linprobe_metrics.json, finetune_metrics.json)."""
import json
import os
import time
from typing import Any, Dict

from ..errors import UserError
from ..files import write_text

# field -> allowed types; every stage writes these, plus its own fields
SCHEMA = {
    "stage": (str,),
    "top1": (float, int),
    "top5": (float, int),
    "dataset": (str,),
    "split": (str,),
    "num_train": (int,),
    "num_test": (int,),
    "checkpoint": (str, type(None)),
    "backbone": (str,),
    "protocol": (dict,),
    "seconds": (float, int),
}
STAGES = ("knn", "linprobe", "finetune")


def validate(metrics: Dict[str, Any]) -> None:
    """Raise ValueError naming the first field that is missing or of the wrong type."""
    for key, types in SCHEMA.items():
        if key not in metrics:
            raise ValueError(f"metrics lack '{key}'")
        if not isinstance(metrics[key], types) or isinstance(metrics[key], bool):
            raise ValueError(f"metrics field '{key}' is {type(metrics[key]).__name__}, expected "
                             f"{' or '.join(t.__name__ for t in types)}")
    if metrics["stage"] not in STAGES:
        raise ValueError(f"metrics stage {metrics['stage']!r} is not one of {STAGES}")
    for key in ("top1", "top5"):
        if not 0.0 <= metrics[key] <= 100.0:
            raise ValueError(f"metrics field '{key}' = {metrics[key]} is not a percentage")


def result_path(output_dir: str, stage: str) -> str:
    return os.path.join(output_dir, f"{stage}_metrics.json")


def check_writable(path: str, overwrite: bool) -> None:
    """An existing result is never silently replaced; checked before any work starts."""
    if os.path.exists(path) and not overwrite:
        raise UserError(f"'{path}' already exists; pass overwrite=true to replace it (the old file is kept as "
                        f"{os.path.basename(path)}.old-<time>) or output_dir=<another folder>")


def write_metrics(path: str, metrics: Dict[str, Any], overwrite: bool) -> None:
    validate(metrics)
    check_writable(path, overwrite)
    if os.path.exists(path):
        os.replace(path, f"{path}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    write_text(path, json.dumps(metrics, indent=2))
