"""Reliability: the non-finite guard and its rollback, gradient telemetry and spike / dip events, crash-consistent
and verified checkpoints, refusing unsafe pickles, and resuming on a different number of processes."""
import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from conftest import REPO, TINY
from ssl_bocb import config
from ssl_bocb.tasks import pretrain
from ssl_bocb.engine import checkpoint as ckpt
from ssl_bocb.engine.telemetry import GradNorms, RunEvents, layer_names
from ssl_bocb.errors import UserError

P = config.PretrainConfig
PRETRAIN_MODULE = sys.modules["ssl_bocb.tasks.pretrain"]


def run(out, *extra):
    return pretrain(config.load(P, [], TINY + [f"output_dir={out}", *extra]))


def rows(run_dir, name="steps.jsonl"):
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(line) for line in f]


def summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at({3, 5}): the loss of the 3rd and 5th optimisation steps of this process becomes NaN."""
    def install(steps):
        calls = [0]
        original = PRETRAIN_MODULE.moco_loss_fn

        def wrapped(*args, **kwargs):
            fn = original(*args, **kwargs)
            calls[0] += 1
            poisoned = calls[0] in steps

            def loss_fn():
                loss = fn()
                return loss * float("nan") if poisoned else loss
            return loss_fn
        monkeypatch.setattr(PRETRAIN_MODULE, "moco_loss_fn", wrapped)
    return install


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One uninterrupted run (checkpoints every 2 steps, all kept): the reference the recovery tests compare to."""
    return run(tmp_path_factory.mktemp("full") / "run", "train.save_every_steps=2", "train.keep_checkpoints=0")


def _state(path, name):
    if name.endswith(".safetensors"):
        return safetensors.torch.load_file(os.path.join(path, name))
    return torch.load(os.path.join(path, name), weights_only=True)


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_counted_and_changes_no_weight(tmp_path, nan_at, full):
    nan_at({3})
    out = run(tmp_path / "nan", "train.stop_at_step=3")
    before, after = os.path.join(full, "checkpoints", "step-00000002"), ckpt.latest_checkpoint(out)
    assert os.path.basename(after) == "step-00000003"
    w0, w1 = _state(before, "model.safetensors"), _state(after, "model.safetensors")
    assert any(k.startswith("momentum_") for k in w0) and w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # no optimizer step and no momentum update from the NaN step
    o0, o1 = _state(before, "optimizer.bin")["state"], _state(after, "optimizer.bin")["state"]
    assert o0.keys() == o1.keys() and all(torch.equal(o0[i][k], o1[i][k]) for i in o0 for k in o0[i])
    meta = ckpt.read_meta(after)
    assert meta["nonfinite_streak"] == 1 and "last_step_applied" not in meta
    s = summary(out)
    assert s["events"]["nonfinite_steps"] == 1 and s["nonfinite_steps_list"][0]["step"] == 3
    assert s["status"] == "stopped" and s["events"]["rollbacks"] == 0
    assert [r["step"] for r in rows(out)] == [1, 2]  # no log row for the skipped step
    # the next step takes no momentum-encoder update for the skipped one: the keys' encoder moves once per
    # applied step, so the run goes on exactly as if that batch had no effect on any weight
    run(tmp_path / "nan", "resume=auto")
    assert summary(out)["status"] == "finished" and summary(out)["events"]["nonfinite_steps"] == 1


@pytest.mark.slow
def test_non_finite_steps_in_a_row_roll_back_once_with_a_lower_lr(tmp_path, nan_at, full):
    nan_at({5, 6, 7})  # steps 5-7 of 8: after the 3rd in a row, back to the checkpoint of step 4
    out = run(tmp_path / "rb", "train.save_every_steps=2", "stability.nonfinite_patience=3",
              "stability.rollback_lr_factor=0.25")
    s = summary(out)
    assert s["status"] == "finished" and s["events"]["rollbacks"] == 1 and s["events"]["nonfinite_steps"] == 3
    rb = s["rollbacks_list"][0]
    assert (rb["at_step"], rb["to_step"], rb["checkpoint"], rb["lr_scale"]) == (7, 4, "step-00000004", 0.25)
    log = rows(out)
    assert [r["step"] for r in log] == list(range(1, 9))  # the rolled-back steps were replaced, not repeated
    lr_clean = {r["step"]: r["lr"] for r in rows(full)}
    assert all(r["lr"] == pytest.approx(lr_clean[r["step"]]) for r in log if r["step"] <= 4)
    assert all(r["lr"] == pytest.approx(0.25 * lr_clean[r["step"]]) for r in log if r["step"] > 4)
    assert os.path.isfile(os.path.join(out, "backbone.safetensors"))


@pytest.mark.slow
def test_host_reads_at_log_steps_undo_a_window_with_a_non_finite_step(tmp_path, nan_at, full):
    """train.host_reads=log (auto on GPUs): no read per step; the window 3-4 holding the NaN step 3 is undone from
    the device copy taken after step 2, exactly."""
    nan_at({3})
    out = run(tmp_path / "win", "train.host_reads=log", "train.log_every=2", "train.stop_at_step=4")
    w0 = _state(os.path.join(full, "checkpoints", "step-00000002"), "model.safetensors")
    w1 = _state(ckpt.latest_checkpoint(out), "model.safetensors")
    assert os.path.basename(ckpt.latest_checkpoint(out)) == "step-00000004"
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # weights, momentum encoder and BN statistics after step 2
    o0 = _state(os.path.join(full, "checkpoints", "step-00000002"), "optimizer.bin")["state"]
    o1 = _state(ckpt.latest_checkpoint(out), "optimizer.bin")["state"]
    assert all(torch.equal(o0[i][k], o1[i][k]) for i in o0 for k in o0[i])
    s = summary(out)
    assert s["events"]["nonfinite_steps"] == 1 and s["nonfinite_steps_list"][0]["step"] == 3
    assert [r["step"] for r in rows(out)] == [2]  # step 4's row belonged to the undone window
    full_loss = {r["step"]: r["loss"] for r in rows(full)}
    assert rows(out)[0]["loss"] == full_loss[2]  # the same computation as reading every step


@pytest.mark.slow
def test_host_reads_at_log_steps_still_roll_back_after_the_patience(tmp_path, nan_at):
    """Steps 5 and 7 are non-finite from a sound state (6 and 8 ran on the poisoned update of 5 / 7 and are not
    counted): two in a row, the patience, so back to the checkpoint before step 5."""
    nan_at({5, 6, 7})
    out = run(tmp_path / "winrb", "train.host_reads=log", "train.log_every=2", "train.save_every_steps=2",
              "stability.nonfinite_patience=2")
    s = summary(out)
    assert s["status"] == "finished" and s["events"]["rollbacks"] == 1 and s["events"]["nonfinite_steps"] == 2
    assert (s["rollbacks_list"][0]["at_step"], s["rollbacks_list"][0]["to_step"]) == (7, 4)
    assert [r["step"] for r in rows(out)] == [2, 4, 6, 8]


@pytest.mark.slow
def test_divergence_after_the_last_rollback_stops_with_one_line(tmp_path, nan_at):
    nan_at(set(range(3, 100)))
    with pytest.raises(UserError, match=r"training diverged: 2 non-finite steps in a row at step \d+, after 1 "
                                        r"rollbacks"):
        run(tmp_path / "dv", "train.save_every_steps=2", "stability.nonfinite_patience=2",
            "stability.max_rollbacks=1")
    s = summary(tmp_path / "dv")
    assert s["status"] == "diverged" and s["events"]["rollbacks"] == 1
    nan_at(set(range(1, 100)))
    with pytest.raises(UserError, match="before any checkpoint to roll back to"):
        run(tmp_path / "dv0", "stability.nonfinite_patience=2")


def _moco():
    from ssl_bocb.models import build_moco
    cfg = config.load(P, [], TINY + ["model.backbone=vit_tiny_patch16_224",
                                     "model.backbone_kwargs={img_size: 32, patch_size: 8, depth: 2}"])
    return build_moco(cfg.model)


def test_layer_gradient_norms_cover_every_parameter_and_sum_to_the_global_norm():
    model = _moco()
    params = [p for p in model.parameters() if p.requires_grad]
    names = layer_names(model, params)
    assert {"first_layer", "stem", "block0", "block1", "top", "projector", "predictor"} <= set(names)
    assert names[[p is model.backbone.cls_token for p in params].index(True)] == "stem"
    assert names[[p is model.backbone.norm.weight for p in params].index(True)] == "top"
    assert "first_layer" == layer_names(model, [model.backbone.patch_embed.proj.weight])[0]
    x = torch.randn(4, 3, 32, 32)
    q1, q2, _, _ = model(x, x.flip(-1))
    (q1.square().sum() + q2.sum()).backward()
    norms = GradNorms(model, params)
    vec = norms()
    assert norms.names == ["first_layer", "stem", "block0", "block1", "top", "projector", "predictor"]
    want = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    assert vec[0].item() == pytest.approx(want.item(), rel=1e-5)
    first = torch.nn.utils.get_total_norm([p.grad for p in model.backbone.patch_embed.proj.parameters()])
    assert vec[1 + norms.names.index("first_layer")].item() == pytest.approx(first.item(), rel=1e-5)
    pred = torch.nn.utils.get_total_norm([p.grad for p in model.predictor.parameters() if p.grad is not None])
    assert vec[1 + norms.names.index("predictor")].item() == pytest.approx(pred.item(), rel=1e-5)


def test_a_synthetic_spike_is_detected_at_its_step_and_first_layer():
    layers = ["first_layer", "block0", "block1", "projector"]
    ev = RunEvents(layers, factor=3.0, window=20, min_history=5, dip_drop=2.0, monitor=True)
    found = []
    for step in range(1, 41):
        per = [1.0, 1.0, 1.0, 1.0]
        if step in (24, 25):
            per[0] = 10.0        # the patch projection blows up first ...
        if step == 25:
            per[2] = 10.0        # ... then a later block, with the global norm
        total = sum(v * v for v in per) ** 0.5
        found += ev.observe(step, 1.0, total, per)
    assert [(e["kind"], e["step"]) for e in found] == [("grad_spike", 24)]
    assert found[0]["first_layer"] == "first_layer" and ev.counts["grad_spikes"] == 1
    # a spike whose layer spiked alone: the block, and consecutive spiking steps are one event
    ev2 = RunEvents(layers, 3.0, 20, 5, 2.0, True)
    out = []
    for step in range(1, 31):
        per = [1.0, 1.0, 20.0 if step in (12, 13, 14) else 1.0, 1.0]
        out += ev2.observe(step, 1.0, sum(v * v for v in per) ** 0.5, per)
    assert [(e["step"], e["first_layer"]) for e in out] == [(12, "block1")]
    assert dict(ev2.first_layers) == {"block1": 1}


def test_a_dip_in_a_scripted_monitor_series_is_detected():
    ev = RunEvents(["first_layer"], 3.0, 20, 5, dip_drop=2.0, monitor=True)
    series = [10.0, 12.0, 15.0, 12.5, 14.0, 11.0, 10.5, 16.0]
    found = [e for i, v in enumerate(series) for e in ev.observe_dip(10 * (i + 1), i + 1, v)]
    assert [(e["epoch"], e["knn_top1"], e["best"]) for e in found] == [(4, 12.5, 15.0), (6, 11.0, 15.0)]
    assert ev.counts["knn_dips"] == 2  # 11.0 then 10.5 in a row are one dip
    state = json.loads(json.dumps(ev.state()))  # what a checkpoint carries: a resumed run goes on the same way
    again = RunEvents(["first_layer"], 3.0, 20, 5, 2.0, True)
    again.load(state)
    assert again.observe_dip(90, 9, 13.5) and again.counts["knn_dips"] == 3


KILLER = """
import os, sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, os.path.join({repo!r}, "tests"))
import ssl_bocb.engine.checkpoint as c
real = os.rename
def rename(src, dst):
    if src.endswith("step-00000006.tmp"):   # the state is written, the folder not yet renamed: kill -9 now
        os.kill(os.getpid(), 9)
    return real(src, dst)
c.os.rename = rename
from conftest import TINY
from ssl_bocb import config
from ssl_bocb.tasks import pretrain
pretrain(config.load(config.PretrainConfig, [], TINY + ["output_dir={out}", "train.save_every_steps=2",
                                                         "train.keep_checkpoints=0"]))
"""


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path, full):
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER.format(repo=REPO, out=out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert os.path.isdir(out / "checkpoints" / "step-00000006.tmp")
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(out)] == ["step-00000002", "step-00000004"]
    assert summary(out)["checkpoint"] == "step-00000004"  # summary.json matches the newest usable checkpoint
    run(out, "train.save_every_steps=2", "train.keep_checkpoints=0", "resume=auto")
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(full)]  # exact continuation
    assert [r["epoch"] for r in rows(out, "log.jsonl")] == [1, 2]
    assert not os.path.exists(out / "checkpoints" / "step-00000006.tmp")


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, caplog, full):
    out = tmp_path / "part"
    run(out, "train.save_every_steps=2", "train.keep_checkpoints=0", "train.stop_at_step=6")
    newest = ckpt.latest_checkpoint(out)
    weights = os.path.join(newest, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    assert "truncated" in ckpt.verify_checkpoint(newest)
    with pytest.raises(UserError, match="cannot be used: model.safetensors has"):
        run(out, "train.save_every_steps=2", "train.keep_checkpoints=0", f"resume={newest}")
    run(out, "train.save_every_steps=2", "train.keep_checkpoints=0", "resume=auto")
    assert "step-00000006 cannot be used" in caplog.text
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in rows(full)]
    # a flipped byte is caught by the hash
    good = ckpt.list_checkpoints(out)[0]
    opt = os.path.join(good, "optimizer.bin")
    data = bytearray(open(opt, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(opt, "wb").write(bytes(data))
    assert "SHA-256" in ckpt.verify_checkpoint(good)


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["random_states_0.pkl", "optimizer.bin"])
def test_a_checkpoint_file_whose_unpickling_runs_code_is_refused(tmp_path, victim):
    out = run(tmp_path / "run", "train.stop_at_step=2")
    path = ckpt.latest_checkpoint(out)
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(str(marker))}, os.path.join(path, victim))
    meta = ckpt.read_meta(path)  # an attacker can rewrite the manifest too: the hash check is not the defence
    meta["files"] = ckpt._manifest(path)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    assert ckpt.verify_checkpoint(path) is None
    with pytest.raises(UserError, match=f"refusing '.*{victim}': it holds pickled objects other than tensors"):
        run(tmp_path / "run", "resume=auto")
    assert not marker.exists()


def test_a_feature_cache_file_whose_unpickling_runs_code_is_refused(tmp_path):
    from ssl_bocb.eval.features import load_cached
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"features": _Payload(str(marker)), "labels": torch.zeros(2)}, bad)
    with pytest.raises(UserError, match="refusing feature cache .*pickled objects other than tensors"):
        load_cached(str(bad))
    assert not marker.exists()
    damaged = tmp_path / "damaged.pt"
    torch.save({"features": torch.ones(3, 2), "labels": torch.zeros(3)}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert load_cached(str(damaged)) is None  # damaged, not unsafe: recomputed
    good = tmp_path / "good.pt"
    torch.save({"features": torch.ones(3, 2), "labels": torch.zeros(3)}, good)
    assert torch.equal(load_cached(str(good))["features"], torch.ones(3, 2))


def test_every_torch_load_in_the_project_is_weights_only():
    import re
    found = []
    for root in ("ssl_bocb", "tools"):
        for dirpath, _, files in os.walk(os.path.join(REPO, root)):
            for name in files:
                if name.endswith(".py"):
                    text = open(os.path.join(dirpath, name)).read()
                    for call in re.findall(r"torch\.load\([^)]*\)", text):
                        found.append(call)
                        assert "weights_only=True" in call, f"{name}: {call}"
                    assert "register_for_checkpointing" not in text, name  # Accelerate unpickles those unsafely
                    assert "pickle.load(" not in text, name
    assert found


def _indices(num_processes, skip_steps, epoch, n=64, global_batch=16, seed=0):
    """The images each global step of ``epoch`` trains on, for a run on ``num_processes`` processes resumed after
    ``skip_steps`` steps, through the same DataLoader, Accelerate sharding and skipping as pretraining."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader
    from ssl_bocb.data import order_seed
    per_device = global_batch // num_processes
    shards = []
    for rank in range(num_processes):
        loader = DataLoader(list(range(n)), batch_size=per_device, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed))
        loader = prepare_data_loader(loader, torch.device("cpu"), num_processes=num_processes, process_index=rank,
                                     use_seedable_sampler=True, data_seed=order_seed(seed))
        loader.set_epoch(epoch)
        shards.append([b.tolist() for b in (skip_first_batches(loader, skip_steps) if skip_steps else loader)])
    return [sorted(sum((s[i] for s in shards), [])) for i in range(len(shards[0]))]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (4, 2)])
def test_resuming_on_another_number_of_processes_continues_the_epochs_images_exactly(before, after):
    for epoch in (0, 3):
        done = _indices(before, 0, epoch)[:1]   # one global step on `before` processes, then preempted
        rest = _indices(after, 1, epoch)        # resumed on `after` processes
        seen = sum(done + rest, [])
        assert sorted(seen) == list(range(64))  # every image once: none repeated, none skipped
        assert done + rest == _indices(before, 0, epoch)  # and the same batches as the uninterrupted run


@pytest.fixture
def diverge_after(monkeypatch):
    """diverge_after(k): a state-dependent divergence. The loss turns NaN once the weights have taken k optimizer
    updates (AdamW's step count), so every restore to an earlier state is followed by a few finite steps and then
    the same blow-up again, whatever the batch."""
    def install(k):
        task_cls = PRETRAIN_MODULE.PretrainTask
        original = task_cls.loss_fn

        def loss_fn(self, inputs):
            fn = original(self, inputs)
            state = self.optimizer.optimizer.state
            updates = int(next(iter(state.values()))["step"]) if state else 0

            def poisoned():
                loss = fn()
                return loss * float("nan") if updates >= k else loss
            return poisoned
        monkeypatch.setattr(task_cls, "loss_fn", loss_fn)
    return install


@pytest.mark.slow
@pytest.mark.parametrize("host_reads", ["step", "log"])
def test_a_state_dependent_divergence_rolls_back_the_same_way_in_both_host_read_modes(tmp_path, diverge_after,
                                                                                         host_reads):
    """NaN from the 11th update on. step mode: steps 11-13 skipped, back to the checkpoint of step 8. log mode (windows
    of 4 steps): each window replays 2 finite steps from the state after step 8, then the NaN; the undone windows
    count toward the patience, so after 3 of them the run goes back to the same checkpoint, with the same lr cut,
    although the checkpoints written during the streak (steps 12, 16) would have rotated it out (keep 2)."""
    diverge_after(10)
    out = tmp_path / host_reads
    with pytest.raises(UserError, match=r"training diverged: 3 non-finite steps in a row at step \d+, after 2 "
                                        r"rollbacks \(lr x0.25\)"):
        run(out, f"train.host_reads={host_reads}", "train.log_every=4", "train.save_every_steps=4", "train.epochs=6",
            "stability.nonfinite_patience=3", "stability.rollback_lr_factor=0.5", "stability.max_rollbacks=2")
    s = summary(out)
    assert s["status"] == "diverged" and s["events"]["rollbacks"] == 2
    assert [(r["to_step"], r["checkpoint"], r["lr_scale"]) for r in s["rollbacks_list"]] == [
        (8, "step-00000008", 0.5), (8, "step-00000008", 0.25)]
    assert s["events"]["nonfinite_steps"] == 9  # 3 per attempt, each from the state after step 8
    assert os.path.isdir(out / "checkpoints" / "step-00000008")


@pytest.mark.slow
def test_an_interrupt_in_log_mode_checks_the_pending_steps_before_saving(tmp_path, nan_at, full, monkeypatch):
    """Ctrl-C during step 7 with steps 5 (NaN) and 6 pending since the read point at 4: the window is judged and
    undone before the checkpoint is written, so the checkpoint at step 6 holds the sound state after step 4."""
    nan_at({5})
    task_cls = PRETRAIN_MODULE.PretrainTask
    original, calls = task_cls.loss_fn, [0]

    def loss_fn(self, inputs):
        calls[0] += 1
        if calls[0] == 7:
            raise KeyboardInterrupt
        return original(self, inputs)
    monkeypatch.setattr(task_cls, "loss_fn", loss_fn)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "ctrlc", "train.host_reads=log", "train.log_every=4")
    saved = ckpt.latest_checkpoint(tmp_path / "ctrlc")
    assert os.path.basename(saved) == "step-00000006"
    w0 = _state(os.path.join(full, "checkpoints", "step-00000004"), "model.safetensors")
    w1 = _state(saved, "model.safetensors")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    s = summary(tmp_path / "ctrlc")
    assert s["status"] == "interrupted" and s["events"]["nonfinite_steps"] == 1


@pytest.mark.slow
def test_the_momentum_encoder_moves_again_after_a_skipped_step(tmp_path, nan_at):
    nan_at({3})
    out = run(tmp_path / "m", "train.stop_at_step=5", "train.save_every_steps=4", "train.keep_checkpoints=0")
    w4 = _state(os.path.join(out, "checkpoints", "step-00000004"), "model.safetensors")
    w5 = _state(os.path.join(out, "checkpoints", "step-00000005"), "model.safetensors")
    moving = [k for k in w4 if k.startswith("momentum_") and "running_" not in k and w4[k].is_floating_point()]
    assert moving and any(not torch.equal(w4[k], w5[k]) for k in moving)
