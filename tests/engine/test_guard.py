"""The non-finite guard and the training loop's hooks, each on its own (no MoCo, no data pipeline): a linear model
and a task written here."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssl_bocb import config
from ssl_bocb.engine import guard as guard_mod
from ssl_bocb.engine import make_accelerator
from ssl_bocb.engine.guard import APPLIED, NOTHING, ROLL_BACK, SKIPPED, Guard, Outcome, StepReads, WindowReads
from ssl_bocb.engine.loop import LoopSettings, Task, TrainLoop
from ssl_bocb.engine.step import StepSettings
from ssl_bocb.engine.telemetry import RunEvents
from ssl_bocb.errors import UserError


def accelerator():
    return make_accelerator(SimpleNamespace(mixed_precision="no", cpu=True), seed=0)


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def out(step, loss, status=None):
    return Outcome(step, [loss, 1.0], {"lr": 0.1}, status)


def test_judge_counts_a_streak_and_asks_for_a_rollback_at_the_patience():
    g = Guard("step", bn_model(), None, accelerator(), patience=3)
    assert [g.judge(out(1, 1.0)), g.judge(out(2, math.nan, "nonfinite")), g.judge(out(3, math.nan, "nonfinite"))] \
        == [APPLIED, SKIPPED, SKIPPED]
    assert (g.streak, g.first_bad) == (2, 2)
    assert g.judge(out(4, 1.0, "overflow")) == NOTHING and g.streak == 2  # an fp16 skip neither ends nor extends it
    assert g.judge(out(5, math.nan, "nonfinite")) == ROLL_BACK and g.first_bad == 2
    assert g.judge(out(6, 1.0)) == APPLIED and g.streak == 0
    g2 = Guard("log", bn_model(), torch.optim.SGD(bn_model().parameters(), 0.1), accelerator(), patience=2)
    assert g2.judge(out(1, math.nan, "nonfinite")) == SKIPPED
    assert g2.judge(out(2, 1.0, "undone")) == NOTHING and g2.streak == 1
    assert g2.judge(out(3, 1.0, "ignored")) == NOTHING


def test_guard_state_survives_a_checkpoint():
    g = Guard("step", bn_model(), None, accelerator())
    g.judge(out(7, math.nan, "nonfinite"))
    meta = dict(step=7, events={}, **g.state())
    h = Guard("step", bn_model(), None, accelerator())
    h.load(meta)
    assert (h.streak, h.first_bad) == (1, 7)
    old = Guard("step", bn_model(), None, accelerator())
    old.load(dict(step=7))  # a checkpoint from before the guard: a fresh streak
    assert (old.streak, old.first_bad) == (0, 0)


def test_step_reads_skip_a_nonfinite_step_and_put_the_batchnorm_statistics_back():
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reads = StepReads(model, opt, accelerator())
    w0 = [p.detach().clone() for p in model.parameters()]
    stats0 = model[1].running_mean.clone()
    reads.before_step()
    model(torch.randn(8, 3)).sum().backward()  # moves the running statistics
    applied = []
    [o] = reads.submit(1, torch.tensor([math.nan, 1.0]), {}, False, applied.append)
    assert o.status == "nonfinite" and applied == []
    assert torch.equal(model[1].running_mean, stats0)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    reads.before_step()
    model(torch.randn(8, 3)).sum().backward()
    [o] = reads.submit(2, torch.tensor([1.0, 1.0]), {}, False, applied.append)
    assert o.status is None and applied == [2]
    assert not all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


def test_window_reads_undo_a_window_holding_a_nonfinite_step():
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reads = WindowReads(model, opt, accelerator())
    reads.start()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    for step, loss in ((1, 1.0), (2, math.nan), (3, 1.0)):
        model(torch.randn(8, 3)).sum().backward()
        result = reads.submit(step, torch.tensor([loss, 1.0]), {}, step == 3, seen.append)
    assert seen == [1, 2, 3]  # applied at once, judged at the read point
    assert [o.status for o in result] == ["undone", "nonfinite", "ignored"]
    reads.end_window(rolled_back=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in w0.items())
    assert opt.state_dict()["state"] == {}  # the optimizer's momentum is that of the window's start too


def test_roll_back_returns_to_the_sound_checkpoint_before_the_streak(monkeypatch, tmp_path):
    g = Guard("step", bn_model(), None, accelerator(), patience=2)
    for s in (5, 6):
        g.judge(out(s, math.nan, "nonfinite"))
    events = RunEvents(["w"], 3.0, 20, 5, 2.0, monitor=False)
    stability = SimpleNamespace(max_rollbacks=1, rollback_lr_factor=0.5)
    asked = []
    monkeypatch.setattr(guard_mod.ckpt, "newest_sound_checkpoint",
                        lambda run_dir, before_step=None: asked.append(before_step) or str(tmp_path / "step-4"))
    monkeypatch.setattr(guard_mod.ckpt, "load_checkpoint", lambda acc, path: dict(step=4))
    diverged = []
    back = g.roll_back(None, str(tmp_path), 6, events, stability, "optim", lambda: diverged.append(1))
    assert back["step"] == 4 and back["path"].endswith("step-4") and asked == [5]
    assert events.lr_scale == 0.5 and events.counts["rollbacks"] == 1 and g.streak == 0 and not diverged
    for s in (7, 8):
        g.judge(out(s, math.nan, "nonfinite"))
    with pytest.raises(UserError, match="after 1 rollbacks .*raise stability.max_rollbacks"):
        g.roll_back(None, str(tmp_path), 8, events, stability, "optim", lambda: diverged.append(1))
    assert diverged == [1]


def test_roll_back_without_a_checkpoint_stops_with_one_line(monkeypatch, tmp_path):
    g = Guard("step", bn_model(), None, accelerator(), patience=1)
    g.judge(out(3, math.nan, "nonfinite"))
    monkeypatch.setattr(guard_mod.ckpt, "newest_sound_checkpoint", lambda run_dir, before_step=None: None)
    monkeypatch.setattr(guard_mod.ckpt, "latest_checkpoint", lambda run_dir: None)
    events = RunEvents(["w"], 3.0, 20, 5, 2.0, monitor=False)
    with pytest.raises(UserError, match="before any checkpoint to roll back to; lower finetune.optim.base_lr"):
        g.roll_back(None, str(tmp_path), 3, events, SimpleNamespace(max_rollbacks=2, rollback_lr_factor=0.5),
                    "finetune.optim", lambda: None)


class Recorder(Task):
    """A regression task that records every hook call of the loop."""

    def __init__(self, acc, run_dir, poison=()):
        torch.manual_seed(0)
        x = torch.randn(32, 4)
        loader = DataLoader(TensorDataset(x, x @ torch.randn(4, 1)), batch_size=8, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        model = nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.accelerator, self.run_dir, self.poison = acc, run_dir, set(poison)
        self.model, self.optimizer, self.loader = acc.prepare(model, optimizer, loader)
        self.unwrapped = acc.unwrap_model(self.model)
        self.dataset = SimpleNamespace(set_epoch=lambda epoch: None)
        self.step_settings = StepSettings()
        self.config, self.derived = {}, dict(steps_per_epoch=4, total_steps=8)
        self.calls = []

    def prepare(self, batch, epoch):
        self.calls.append(("prepare", epoch))
        return batch, torch.zeros(1)

    def extra_schedule(self, step, total_steps):
        return dict(ramp=step / total_steps)

    def loss_fn(self, inputs):
        x, y = inputs
        scale = math.nan if len([c for c in self.calls if c[0] == "prepare"]) in self.poison else 1.0

        def fn():
            return ((self.model(x) - y) ** 2).mean() * scale
        return fn

    def after_applied(self, step):
        self.calls.append(("after_applied", step, self.unwrapped.weight.detach().clone()))

    def epoch_end(self, epoch, step):
        self.calls.append(("epoch_end", epoch, step))
        return dict(val_top1=50.0 + epoch)


def loop_for(task, **kw):
    stability = config.load(config.PretrainConfig, [], []).stability
    ls = LoopSettings(epochs=2, batch_size=8, lr=0.1, warmup_steps=0, min_lr=0.0, weight_decay=0.0,
                      weight_decay_end=0.0, log_every=1, save_every=1, stability=stability, **kw)
    return TrainLoop(task, ls)


def test_loop_calls_the_hooks_in_order_and_logs_the_epoch_values(tmp_path):
    task = Recorder(accelerator(), str(tmp_path))
    loop = loop_for(task)
    assert loop.run() == "finished" and loop.step == 8
    kinds = [c[0] for c in task.calls]
    assert kinds[:3] == ["prepare", "after_applied", "prepare"]
    assert [c for c in task.calls if c[0] == "epoch_end"] == [("epoch_end", 0, 4), ("epoch_end", 1, 8)]
    applied = [c for c in task.calls if c[0] == "after_applied"]
    assert [c[1] for c in applied] == list(range(1, 9))
    # called after the update: each call sees new weights, and the last call the final ones
    assert all(not torch.equal(a[2], b[2]) for a, b in zip(applied, applied[1:]))
    assert torch.equal(applied[-1][2], task.unwrapped.weight)
    from ssl_bocb.files import read_jsonl
    epochs = read_jsonl(str(tmp_path / "log.jsonl"))
    assert [r["val_top1"] for r in epochs] == [50.0, 51.0] and "ramp" in epochs[0]


def test_loop_tells_the_task_a_skipped_step_was_not_applied(tmp_path):
    task = Recorder(accelerator(), str(tmp_path), poison={2})
    loop = loop_for(task)
    assert loop.run() == "finished"
    assert [c[1] for c in task.calls if c[0] == "after_applied"] == [1, 3, 4, 5, 6, 7, 8]  # not the skipped step
    assert loop.events.counts["nonfinite_steps"] == 1


def test_train_step_is_the_loops_step(tmp_path):
    task = Recorder(accelerator(), str(tmp_path))
    loop = loop_for(task)
    batch = next(iter(task.loader))
    w0 = task.unwrapped.weight.detach().clone()
    [o] = loop.train_step(batch, 0)
    assert loop.step == 1 and o.status is None and math.isfinite(o.values[0])
    assert not torch.equal(w0, task.unwrapped.weight)
    assert [c[0] for c in task.calls] == ["prepare", "after_applied"]


def test_a_task_that_breaks_the_contract_fails_in_one_line(tmp_path):
    class NoLoss(Task):
        def prepare(self, batch, epoch):
            return batch, torch.zeros(1)
    with pytest.raises(TypeError, match="abstract method.*loss_fn"):
        NoLoss()
    task = Recorder(accelerator(), str(tmp_path))
    task.derived = None
    with pytest.raises(TypeError, match=r"task Recorder does not set derived \(engine.loop.Task.REQUIRED\)"):
        loop_for(task)
    with pytest.raises(TypeError, match="SimpleNamespace is not an engine.loop.Task"):
        TrainLoop(SimpleNamespace(), None)
