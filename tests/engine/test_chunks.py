"""train.query_chunks: every key first, then the queries chunk by chunk, gradients accumulated (issue 23)."""
import json
import os

import pytest
import safetensors.torch
import torch

from conftest import TINY
from ssl_bocb import config
from ssl_bocb.tasks import pretrain
from ssl_bocb.engine.setup import make_accelerator
from ssl_bocb.engine.step import StepSettings, compute_gradients
from ssl_bocb.tasks.pretrain import moco_chunked_loss_fn, moco_loss_fn
from ssl_bocb.errors import UserError
from ssl_bocb.losses import contrastive_loss
from ssl_bocb.models import build_moco

P = config.PretrainConfig
VIT = ["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={img_size: 32, patch_size: 8, depth: 2}"]
NO_BN = VIT + ["model.proj_hidden_bn=false", "model.pred_hidden_bn=false", "model.proj_last_bn=false",
               "model.pred_last_bn=false"]


def _step_grads(cfg, x1, x2, loss_fn_of):
    torch.manual_seed(0)
    model = build_moco(cfg.model)
    acc = make_accelerator(cfg.train)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    loss, _ = compute_gradients(model, opt, acc, params, loss_fn_of(model, acc), StepSettings())
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, tol=1e-5):
    """Equal to float round-off: the difference is a tiny fraction of the tensor's norm (sums run in other orders)."""
    return float((a - b).norm()) <= tol * max(float(b.norm()), 1e-12)


def _batch(n=16, size=32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)


def test_chunks_give_the_full_batch_loss_and_gradient_without_batchnorm():
    cfg = config.load(P, [], TINY + NO_BN)
    x1, x2 = _batch()
    full = _step_grads(cfg, x1, x2, lambda m, a: moco_loss_fn(m, m, a, x1, x2, 0.2))
    for k in (2, 4, 16):
        part = _step_grads(cfg, x1, x2, lambda m, a: moco_chunked_loss_fn(m, m, a, x1, x2, 0.2, k))
        assert torch.allclose(part[0], full[0], rtol=1e-6), k
        assert all(_close(part[1][name], g) for name, g in full[1].items()), k


def test_with_batchnorm_each_chunk_normalises_its_own_samples():
    """ResNet-18 and BN heads: K chunks equal one backward through a forward that normalises the same K groups (as K
    processes without SyncBN), keys included; and differ from the full-batch normalisation."""
    cfg = config.load(P, [], TINY)
    x1, x2 = _batch()
    groups = [slice(0, 8), slice(8, 16)]

    def grouped(model, acc):
        def loss_fn():
            outs = [model(x1[g], x2[g]) for g in groups]
            q1, q2 = (torch.cat([o[i] for o in outs]) for i in (0, 1))
            k1 = torch.cat([model.forward_momentum(x1[g]) for g in groups])
            k2 = torch.cat([model.forward_momentum(x2[g]) for g in groups])
            return contrastive_loss(q1, k2, 0.2) + contrastive_loss(q2, k1, 0.2)
        return loss_fn
    ref = _step_grads(cfg, x1, x2, grouped)
    part = _step_grads(cfg, x1, x2, lambda m, a: moco_chunked_loss_fn(m, m, a, x1, x2, 0.2, 2))
    full = _step_grads(cfg, x1, x2, lambda m, a: moco_loss_fn(m, m, a, x1, x2, 0.2))
    assert torch.allclose(part[0], ref[0], rtol=1e-6) and not torch.allclose(part[0], full[0], rtol=1e-4)
    assert all(_close(part[1][name], g) for name, g in ref[1].items())


def losses(run_dir):
    """{step: loss} of the logged steps."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "steps.jsonl"))]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_a_chunked_run_follows_the_full_batch_run_and_resumes_exactly(tmp_path):
    """Without BN, SGD: K = 4 logs the K = 1 losses and ends at its weights to round-off; with drop-path (drawn per
    chunk) a run stopped mid-epoch and resumed repeats the uninterrupted chunked run exactly."""
    base = TINY + NO_BN + ["optim.name=sgd", "optim.base_lr=0.05", "optim.grad_clip=1.0"]
    one = pretrain(config.load(P, [], base + [f"output_dir={tmp_path / 'k1'}"]))
    four = pretrain(config.load(P, [], base + [f"output_dir={tmp_path / 'k4'}", "train.query_chunks=4"]))
    assert list(losses(one).values()) == pytest.approx(list(losses(four).values()), rel=1e-5)
    a, b = (safetensors.torch.load_file(os.path.join(d, "backbone.safetensors")) for d in (one, four))
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
    import yaml
    derived = yaml.safe_load(open(os.path.join(four, "config.yaml")))["derived"]
    assert derived["query_chunks"] == 4 and derived["query_chunk_size"] == 4
    drop = base + ["train.query_chunks=2", "train.save_every_steps=2", "train.host_reads=log", "train.log_every=2",
                   "model.backbone_kwargs={img_size: 32, patch_size: 8, depth: 2, drop_path_rate: 0.3}"]
    full = pretrain(config.load(P, [], drop + [f"output_dir={tmp_path / 'full'}"]))
    pretrain(config.load(P, [], drop + [f"output_dir={tmp_path / 'part'}", "train.stop_at_step=3"]))
    part = pretrain(config.load(P, [], drop + [f"output_dir={tmp_path / 'part'}", "resume=auto"]))
    logged, resumed = losses(full), losses(part)  # the resumed run also logged its stop step, 3
    assert len(logged) == 4 and all(resumed[step] == loss for step, loss in logged.items())


@pytest.mark.parametrize("extra, message", [
    (["train.query_chunks=3"], "train.query_chunks=3 does not divide the per-process batch of 16"),
    (["train.query_chunks=2", "optim.sam.rho=0.05"], "with SAM (optim.sam.rho > 0) is not supported"),
    (["train.query_chunks=2", "optim.name=sophia"], "with optim.name=sophia is not supported"),
    (["train.query_chunks=2", "moco.momentum=0"], "needs the momentum encoder"),
    (["train.query_chunks=0"], "train.query_chunks"),
])
def test_settings_chunks_cannot_serve_are_refused(tmp_path, extra, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        pretrain(config.load(P, [], TINY + extra + [f"output_dir={tmp_path / 'x'}"]))
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_chunk_their_queries_against_the_gathered_keys(tmp_path):
    """Under DDP the keys are gathered once and the gradient all-reduced after the last chunk: two processes with
    K = 2 log the losses of two processes with K = 1 (no BN)."""
    import subprocess
    import sys
    from conftest import REPO

    def launch(out, *extra):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               os.path.join(REPO, "tools", "pretrain.py"), *TINY, *NO_BN, "optim.name=sgd", "optim.base_lr=0.05",
               "train.stop_at_step=4", f"output_dir={out}", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return losses(out)
    one, two = launch(tmp_path / "k1"), launch(tmp_path / "k2", "train.query_chunks=2")
    assert len(one) == 4 and list(one.values()) == pytest.approx(list(two.values()), rel=1e-5)
