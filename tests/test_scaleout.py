"""Scale-out correctness shown on CPU processes: host reads only at the read points in log mode, per-process random
streams, Sophia's replicas, the cold-cache start and the kNN stage on several processes, the torch floor."""
import os
import sys

import pytest
import torch

from conftest import TINY
from ssl_bocb import config
from ssl_bocb.engine import pretrain

P = config.PretrainConfig

# Where train.host_reads=log reads the device on purpose inside a step: the window's flush (one read per log step).
# (The epoch end, checkpoints and the summary read too, outside the steps.) Any other read in a step stalls a GPU.
READ_POINTS = {("guard.py", "flush")}
# Reads of tensors that stay on the host on a GPU too: the samplers' index tensors (torch.randperm(...).tolist()) and
# torch.optim's step counters (kept on the CPU unless capturable=True).
HOST_SIDE = (os.sep + os.path.join("torch", "utils", "data") + os.sep, os.path.join("accelerate", "data_loader.py"),
             os.sep + os.path.join("torch", "optim") + os.sep)


class ReadSpy:
    """Wraps the Tensor methods that copy a value to the host and records each call made outside the read points
    while a step runs (between the loop's ``_step`` entry and exit)."""
    METHODS = ("item", "tolist", "__bool__", "nonzero", "numpy", "__int__", "__float__")

    def __init__(self, monkeypatch):
        self.reads = []
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))
        original_nonzero = torch.nonzero
        monkeypatch.setattr(torch, "nonzero", self._wrap("torch.nonzero", original_nonzero))

    def _wrap(self, name, original):
        spy = self

        def wrapped(*args, **kwargs):
            spy.check(name)
            return original(*args, **kwargs)
        return wrapped

    def check(self, name):
        frames, f = [], sys._getframe(2)
        while f is not None:
            frames.append((os.path.basename(f.f_code.co_filename), f.f_code.co_name, f.f_lineno, f.f_code.co_filename))
            f = f.f_back
        if not any(fn == "_step" and base == "loop.py" for base, fn, _, _ in frames):
            return  # not inside a training step
        if any((base, fn) in READ_POINTS for base, fn, _, _ in frames):
            return
        if any(h in frames[0][3] for h in HOST_SIDE):
            return
        self.reads.append(f"{name} at " + " <- ".join(f"{b}:{line} {fn}" for b, fn, line, _ in frames[:6]))


@pytest.mark.parametrize("extra", [
    ["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={img_size: 32, patch_size: 8, depth: 2}"],
    ["optim.sam.rho=0.05", "optim.grad_clip=1.0"],
], ids=["vit-batched-views", "sam-clip"])
def test_log_mode_reads_the_host_only_at_read_points(tmp_path, monkeypatch, extra):
    spy = ReadSpy(monkeypatch)
    out = pretrain(config.load(P, [], TINY + [f"output_dir={tmp_path / 'r'}", "train.host_reads=log",
                                               "train.log_every=4", *extra]))
    assert os.path.isfile(os.path.join(out, "backbone.safetensors"))
    assert not spy.reads, "host reads outside the read points:\n" + "\n".join(spy.reads[:10])


def test_the_spy_catches_a_read_in_a_step(tmp_path, monkeypatch):
    """The check above can fail: an .item() added to the loss is caught."""
    spy = ReadSpy(monkeypatch)
    from ssl_bocb.engine import step as step_mod
    original = step_mod.contrastive_loss

    def loss_with_a_read(*args, **kwargs):
        loss = original(*args, **kwargs)
        loss.item()
        return loss
    monkeypatch.setattr(step_mod, "contrastive_loss", loss_with_a_read)
    pretrain(config.load(P, [], TINY + [f"output_dir={tmp_path / 'r'}", "train.host_reads=log", "train.log_every=4",
                                        "train.stop_at_step=2"]))
    assert spy.reads and spy.reads[0].startswith("item at ")


# The first torch release with each API the code calls; the floor in setup.cfg must cover every one in use.
TORCH_APIS = {"torch.accelerator": (2, 6), "get_total_norm": (2, 6), "clip_grads_with_norm_": (2, 6),
              "sdpa_kernel": (2, 3), "part.compile()": (2, 2)}


def test_torch_floor_covers_the_apis_the_code_calls():
    import configparser
    import re
    from conftest import REPO
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines()]
    floor = next(tuple(int(x) for x in r.split(">=")[1].split(".")[:2]) for r in reqs if re.match(r"torch>=", r))
    code = ""
    for folder in ("ssl_bocb", "tools"):
        for root, _, files in os.walk(os.path.join(REPO, folder)):
            code += "".join(open(os.path.join(root, f)).read() for f in files if f.endswith(".py"))
    used = {api: v for api, v in TORCH_APIS.items() if api in code}
    assert "get_total_norm" in used and "torch.accelerator" in used  # the scan sees the code
    assert floor >= max(used.values()), f"setup.cfg admits torch {floor}, the code calls {used}"
