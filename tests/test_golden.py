"""The golden record: short pretraining (three variants, each also stopped and resumed), a resumed fine-tune, kNN
and linear probes, recorded by tools/golden.py before the house was rearranged (tests/golden/reference.json). A
change that is meant to be behaviour-neutral must reproduce it: bit for bit on the machine and torch that recorded
it, within a relative 1e-3 elsewhere (other CPUs round differently; the digests are then not compared)."""
import json
import os

import pytest

from conftest import REPO, run_tool

REFERENCE = os.path.join(REPO, "tests", "golden", "reference.json")


@pytest.mark.slow
def test_golden_runs_match_the_reference(tmp_path):
    out = tmp_path / "now.json"
    r = run_tool("golden", "record", str(out), timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    c = run_tool("golden", "compare", REFERENCE, str(out))
    assert c.returncode == 0, c.stdout[-3000:]
    assert "0 differ" in c.stdout
    runs = json.load(open(out))
    assert {"eval-knn", "eval-linprobe-cached", "finetune-ema-resumed", "sam_agc-resumed"} <= set(runs)


def test_golden_compare_names_a_changed_value(tmp_path):
    ref = json.load(open(REFERENCE))
    ref["sam_agc-full"]["steps.jsonl"][1]["loss"] *= 1.01
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(ref))
    c = run_tool("golden", "compare", REFERENCE, str(changed))
    assert c.returncode == 1
    assert "sam_agc-full/steps.jsonl row 1: loss" in c.stdout
    assert "bit-identical comparison" in c.stdout
    ref["_machine"]["machine"] = "another CPU"
    tensor = next(k for k in ref["sam_agc-full"] if k.startswith("checkpoints/"))
    name = next(iter(ref["sam_agc-full"][tensor]))
    ref["sam_agc-full"][tensor][name] = "0" * 16  # digests are not compared across machines
    ref["sam_agc-full"]["steps.jsonl"][1]["loss"] /= 1.01
    ref["sam_agc-full"]["steps.jsonl"][2]["loss"] *= 1 + 1e-5  # within the cross-machine tolerance
    changed.write_text(json.dumps(ref))
    c = run_tool("golden", "compare", REFERENCE, str(changed))
    assert c.returncode == 0, c.stdout
    assert "cross-machine comparison" in c.stdout
