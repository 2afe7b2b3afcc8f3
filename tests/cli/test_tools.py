"""The optimizer tools: table, cost benchmark and health check, run as a user runs them."""
import json
import os

import pytest

from conftest import TINY, run_tool


@pytest.mark.slow
def test_optimizers_tool_lists_every_entry_with_its_family():
    out = run_tool("optimizers")
    assert out.returncode == 0, out.stderr
    for name in ("sgd", "lion", "adan", "adabound", "sophia", "rmsprop", "muon", "kron"):
        assert f"\n{name} " in out.stdout
    rows = json.loads(run_tool("optimizers", "--json").stdout)
    assert len(rows) == 25 and sum(r["family"] in "abcd" for r in rows) == 20


@pytest.mark.slow
def test_bench_optim_measures_state_memory_per_parameter(tmp_path):
    out = run_tool("bench_optim", "--models", "resnet18", "--optimizers", "sgd", "adamw", "adafactor", "--steps", "2",
                   "--warmup", "1", "--batch", "2", "--out", str(tmp_path / "b"))
    assert out.returncode == 0, out.stderr
    rows = {r["optimizer"]: r for r in json.load(open(tmp_path / "b.json"))["rows"]}
    # SGD keeps one fp32 momentum buffer per parameter, AdamW two moments; Adafactor factors its second moment
    assert abs(rows["sgd"]["state_bytes_per_param"] - 4) < 0.01
    assert abs(rows["adamw"]["state_bytes_per_param"] - 8) < 0.01
    assert rows["adafactor"]["state_bytes_per_param"] < 2
    assert all(r["step_ms_mean"] > 0 for r in rows.values())
    assert "| resnet18 (11.2 M) | AdamW | b |" in open(tmp_path / "b.md").read()


@pytest.mark.slow
def test_optim_check_runs_each_optimizer_once_and_tabulates(tmp_path):
    args = ["--config", "configs/quickstart.yaml", "--optimizers", "adamw", "lars", "--out", str(tmp_path / "c"),
            *TINY, "monitor.knn_every=1", "monitor.knn_train_per_class=8", "monitor.knn_test_per_class=4"]
    out = run_tool("optim_check", *[a for a in args if not a.startswith("optim.base_lr")])
    assert out.returncode == 0, out.stderr
    rows = json.load(open(tmp_path / "c" / "optim_check.json"))
    assert [r["optimizer"] for r in rows] == ["adamw", "lars"]
    assert all(r["steps"] == 8 and r["knn_top1"] is not None and not r["error"] for r in rows)
    assert rows[0]["first_loss"] != rows[1]["first_loss"] or rows[0]["last_loss"] != rows[1]["last_loss"]
    exported = tmp_path / "c" / "adamw" / "backbone.safetensors"
    before = os.path.getmtime(exported)
    again = run_tool("optim_check", *[a for a in args if not a.startswith("optim.base_lr")])
    assert again.returncode == 0 and os.path.getmtime(exported) == before   # a finished run is read, not re-run
    assert json.load(open(tmp_path / "c" / "optim_check.json"))[0]["last_loss"] == rows[0]["last_loss"]
    failed = run_tool("optim_check", "--config", "configs/quickstart.yaml", "--optimizers", "adamw", "--out",
                      str(tmp_path / "d"), *TINY, "model.backbone=resnet18x")
    assert failed.returncode == 2 and "1 optimizer run(s) failed" in failed.stderr
