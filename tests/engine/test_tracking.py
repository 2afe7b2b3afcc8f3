"""log.trackers through Accelerate's trackers, offline: wandb in offline mode and MLflow with a file store, the run
ids kept across a kill and a resume, the config logged as hyper-parameters once."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY
from ssl_bocb import config
from ssl_bocb.engine import tracking
from ssl_bocb.errors import UserError


def test_the_trackers_key_takes_known_names_only():
    cfg = config.load(config.PretrainConfig, [], [])
    assert list(cfg.log.trackers) == ["tensorboard"]
    with pytest.raises(UserError, match=r"log.trackers='wandbb' is not valid; choose one of: tensorboard, wandb, "
                                        r"mlflow \(did you mean 'wandb'\?\)"):
        config.load(config.PretrainConfig, [], ["log.trackers=[tensorboard,wandbb]"])
    with pytest.raises(UserError, match="needs the no_such_tracker_pkg package: pip install 'ssl_bocb\\[x\\]'"):
        tracking._need("no_such_tracker_pkg", "x")


def test_the_config_is_flattened_to_values_every_tracker_takes():
    flat = tracking._flat({"a": {"b": 1, "c": [1, 2], "d": None}, "e": "x", "f": True})
    assert flat == {"a.b": 1, "a.c": "[1, 2]", "a.d": "null", "e": "x", "f": True}


@pytest.mark.slow
def test_wandb_and_mlflow_continue_the_same_runs_after_a_kill_and_a_resume(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, os.path.join(REPO, "tools", "pretrain.py"), *TINY, "train.epochs=6",
            "train.save_every_steps=2", "log.trackers=[tensorboard,wandb,mlflow]", "log.wandb_mode=offline",
            f"log.mlflow_tracking_uri=file:{tmp_path / 'mlruns'}", f"output_dir={run}"]
    env = dict(os.environ, WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not glob.glob(str(run / "checkpoints" / "step-*" / "meta.json")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # no chance to close anything
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = json.load(open(run / "trackers.json"))
    assert set(first) == {"wandb", "mlflow"}
    steps_before = len(open(run / "steps.jsonl").readlines())
    assert 0 < steps_before < 24  # killed mid-run
    resumed = subprocess.run(args + ["resume=auto"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.load(open(run / "trackers.json")) == first
    offline = sorted(glob.glob(str(run / "wandb" / "offline-run-*")))
    assert len(offline) == 2 and all(p.endswith("-" + first["wandb"]) for p in offline)  # one wandb run, 2 parts
    runs = glob.glob(str(tmp_path / "mlruns" / "*" / first["mlflow"]))
    assert len(runs) == 1 and len(glob.glob(str(tmp_path / "mlruns" / "*" / "*" / "meta.yaml"))) == 1
    logged = [int(line.split()[2]) for line in open(os.path.join(runs[0], "metrics", "train", "loss"))]
    assert max(logged) == 24 and min(logged) == 1  # both parts' steps in the one MLflow run
    params = os.listdir(os.path.join(runs[0], "params"))
    assert "optim.base_lr" in params and "train.epochs" in params
    assert glob.glob(str(run / "tb" / "events.out.tfevents.*"))  # TensorBoard still written
