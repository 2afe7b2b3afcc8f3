import hashlib
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import safetensors.torch
import timm
import torch
import yaml

from conftest import REPO, TINY, run_tool
from ssl_bocb import config
from ssl_bocb.tasks import pretrain
from ssl_bocb.engine.checkpoint import list_checkpoints
from ssl_bocb.errors import UserError

P = config.PretrainConfig


def run(out, *extra):
    return pretrain(config.load(P, [], TINY + [f"output_dir={out}", *extra]))


def losses(run_dir):
    with open(os.path.join(run_dir, "steps.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.slow
def test_interrupted_then_resumed_run_reproduces_losses(tmp_path):
    extra = ["data.num_workers=2", "model.backbone_kwargs={drop_path_rate: 0.2}", "train.save_every_steps=3"]
    full = run(tmp_path / "full", *extra)
    part = run(tmp_path / "part", *extra, "train.stop_at_step=5")  # mid-epoch 2 (4 steps per epoch)
    assert len(losses(part)) == 5
    assert not os.path.exists(os.path.join(part, "backbone.safetensors"))
    run(tmp_path / "part", *extra, "resume=auto")
    assert losses(part) == losses(full)  # bit-exact: same data order, augmentations, drop-path masks
    assert yaml.safe_load(open(os.path.join(part, "config.yaml")))["derived"]["data_pipeline"] == "batched"
    a = safetensors.torch.load_file(os.path.join(full, "backbone.safetensors"))
    b = safetensors.torch.load_file(os.path.join(part, "backbone.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_run_outputs(tmp_path):
    out = run(tmp_path / "r", "data.pipeline=pil")  # the other tests' fake data takes the batched path
    for f in ("config.yaml", "log.jsonl", "steps.jsonl", "backbone.safetensors", "backbone.json", "train.log"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(out, "tb")))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(os.path.join(out, "tb"))
    ea.Reload()
    by_step, by_images = ea.Scalars("epoch/loss"), ea.Scalars("by_images/epoch/loss")
    assert [e.step for e in by_step] == [4, 8] and [e.step for e in by_images] == [64, 128]  # 4 steps x 16 images
    assert [e.value for e in by_step] == [e.value for e in by_images]
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"loss", "lr", "wd", "momentum", "grad_norm", "images_per_s", "peak_mem_mb"} <= set(rows[0])
    saved = config.load(P, [os.path.join(out, "config.yaml")])
    assert saved.train.batch_size == 16
    import yaml
    derived = yaml.safe_load(open(os.path.join(out, "config.yaml")))["derived"]
    assert derived["lr"] == pytest.approx(1e-3 * 16 / 256) and derived["steps_per_epoch"] == 4
    assert derived["data_pipeline"] == "pil" and derived["channels_last"] is True and derived["compile"] is False
    spec = json.load(open(os.path.join(out, "backbone.json")))
    m = timm.create_model(spec["timm_name"], num_classes=0, **spec["timm_kwargs"])
    m.load_state_dict(safetensors.torch.load_file(os.path.join(out, "backbone.safetensors")))
    assert len(list_checkpoints(out)) >= 1


@pytest.mark.slow
def test_existing_run_is_never_overwritten_unless_asked(tmp_path):
    out = run(tmp_path / "r")
    before = digest(os.path.join(out, "backbone.safetensors"))
    config_before = digest(os.path.join(out, "config.yaml"))
    with pytest.raises(UserError, match="already holds a run; pass resume=auto"):
        run(tmp_path / "r")
    # a failing resume (another model) leaves the earlier run as it was
    with pytest.raises(UserError, match="belongs to another model.*model.out_dim"):
        run(tmp_path / "r", "resume=auto", "model.out_dim=16")
    with pytest.raises(UserError, match="trained with optimizer adamw and parameter groups"):  # same sizes
        run(tmp_path / "r", "resume=auto", "optim.weight_decay_policy=all")
    assert digest(os.path.join(out, "backbone.safetensors")) == before
    assert digest(os.path.join(out, "config.yaml")) == config_before
    run(tmp_path / "r", "overwrite=true", "seed=1")
    moved = [d for d in os.listdir(tmp_path) if d.startswith("r.old-")]
    assert len(moved) == 1
    assert digest(os.path.join(tmp_path, moved[0], "backbone.safetensors")) == before


def test_resume_path_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run(tmp_path / "x", f"resume={tmp_path / 'nowhere'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no complete checkpoint"):
        run(tmp_path / "x", f"resume={tmp_path / 'empty'}")


def test_bf16_mixed_precision_runs_on_cpu(tmp_path, caplog):
    # a few steps: bf16 is emulated (slow) on CPUs without AVX-512-BF16 / AMX, which the tests pretend this one is
    out = run(tmp_path / "bf16", "train.mixed_precision=bf16", "train.epochs=1", "train.stop_at_step=2")
    assert len(losses(out)) == 2 and all(torch.isfinite(torch.tensor(losses(out))))
    assert "train.mixed_precision=bf16 on cpu: the CPU has no avx512_bf16 / amx_bf16" in caplog.text
    import yaml
    assert yaml.safe_load(open(os.path.join(out, "config.yaml")))["derived"]["mixed_precision"] == "bf16"


@pytest.mark.slow
def test_vit_pretraining_with_frozen_patch_projection(tmp_path):
    out = run(tmp_path / "vit", "model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={img_size: 32, patch_size: 8}",
              "model.frozen_patch_embed=true", "train.epochs=1")
    w = safetensors.torch.load_file(os.path.join(out, "backbone.safetensors"))
    assert "patch_embed.proj.weight" in w and "pos_embed" in w


@pytest.mark.parametrize("args,message", [
    (["optim.wieght_decay=0.1"], "did you mean 'optim.weight_decay'"),
    (["train.epochs=many"], "'train.epochs' in the command line expects int"),
    (["model.backbone=resnet18x"], "unknown backbone 'resnet18x'"),
    (["optim.name=adamx"], "unknown optimizer 'adamx'"),
    (["optim.base_lr=-1"], "optim.base_lr must be > 0"),
    (["train.epochs=0"], "train.epochs must be > 0"),
    (["data.name=cifar10", "data.root=/nonexistent/data"], "cifar10 train data not found"),
    (["--config", "/nonexistent.yaml"], "does not exist"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    proc = run_tool("pretrain", *TINY, f"output_dir={tmp_path / 'o'}", *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not os.path.exists(tmp_path / "o")  # nothing written


def _launch2(*args):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(REPO, "tools", "pretrain.py"), *TINY, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_run_with_accelerate_launch(tmp_path, caplog):
    proc = _launch2(f"output_dir={tmp_path / 'ddp'}", "train.stop_at_step=5")  # stopped in epoch 2 of 2
    assert proc.returncode == 0, proc.stderr[-3000:]
    import yaml
    derived = yaml.safe_load(open(tmp_path / "ddp" / "config.yaml"))["derived"]
    assert derived["world_size"] == 2 and derived["per_device_batch"] == 8
    # resumed on one process: the epoch goes on with the images the two processes had not trained on
    run(tmp_path / "ddp", "resume=auto")
    assert "the checkpoint was written by 2 processes, this run has 1" in caplog.text
    assert [json.loads(line)["step"] for line in open(tmp_path / "ddp" / "steps.jsonl")] == list(range(1, 9))
    assert os.path.isfile(tmp_path / "ddp" / "backbone.safetensors")
    bad = _launch2(f"output_dir={tmp_path / 'bad'}", "train.batch_size=15")
    assert bad.returncode != 0
    assert "error: train.batch_size=15 does not divide by the 2 processes" in bad.stderr


@pytest.mark.slow
def test_real_cifar10_smoke_loss_goes_down(tmp_path, shared_data):
    out = pretrain(config.load(P, [], [
        "data.name=cifar10", f"data.root={shared_data}", "data.subset=50", "data.num_workers=1",
        "model.hidden_dim=256", "train.batch_size=64", "train.epochs=5", "train.warmup_epochs=1",
        "optim.name=lars", "optim.base_lr=0.3", "optim.trust_coefficient=0.02", "optim.trust_clip=true",
        "optim.weight_decay=1e-6", f"output_dir={tmp_path / 'c10'}"]))
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert len(rows) == 5
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05, [r["loss"] for r in rows]


@pytest.mark.slow
def test_sam_with_agc_resumes_exactly_and_records_the_optimizer(tmp_path):
    import yaml
    extra = ["optim.name=nadam", "optim.betas=[0.8,0.95]", "optim.sam.rho=0.05", "optim.grad_clip_mode=agc",
             "optim.grad_clip=0.05", "train.save_every_steps=3"]
    full = run(tmp_path / "full", *extra)
    part = run(tmp_path / "part", *extra, "train.stop_at_step=5")
    run(tmp_path / "part", *extra, "resume=auto")
    assert losses(part) == losses(full) and all(torch.isfinite(torch.tensor(losses(full))))
    plain = run(tmp_path / "plain", "optim.name=nadam", "optim.betas=[0.8,0.95]")
    assert losses(plain)[1:] != losses(full)[1:]   # SAM and AGC changed the trajectory
    opt = yaml.safe_load(open(os.path.join(full, "config.yaml")))["derived"]["optimizer"]
    assert opt["source"] == "torch.optim.NAdam" and opt["options"]["betas"] == [0.8, 0.95]
    assert opt["options"]["eps"] == 1e-8 and opt["sources"]["eps"] == "table" and opt["sources"]["betas"] == "explicit"


def test_sophia_estimates_the_hessian_on_a_vit(tmp_path):
    out = run(tmp_path / "sophia", "optim.name=sophia", "model.backbone=vit_tiny_patch16_224",
              "model.backbone_kwargs={img_size: 32, patch_size: 8, depth: 2}", "train.epochs=1")
    assert all(torch.isfinite(torch.tensor(losses(out))))
    (ckpt_dir,) = list_checkpoints(out)
    state = torch.load(os.path.join(ckpt_dir, "optimizer.bin"), weights_only=True)["state"]
    moments = [s["hessian_moment"] for s in state.values()]
    assert moments and sum(float(m.abs().sum()) for m in moments) > 0   # the Hutchinson pass ran (step 0)


@pytest.mark.slow
def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(tmp_path):
    # what a run leaves when it is killed before its first checkpoint: its config, logs and a half-written one
    out = tmp_path / "killed"
    first = run(out, "train.stop_at_step=3")
    import shutil
    shutil.rmtree(os.path.join(first, "checkpoints"))
    os.makedirs(os.path.join(first, "checkpoints", "step-00000002.tmp"))
    with open(os.path.join(first, "steps.jsonl"), "a") as f:
        f.write(json.dumps({"step": 99, "loss": 123.0}) + "\n")
    with pytest.raises(UserError, match="already holds a run"):  # without resume=auto: refused as before
        run(out)
    again = run(out, "resume=auto")
    steps = [json.loads(line)["step"] for line in open(os.path.join(again, "steps.jsonl"))]
    assert steps == list(range(1, 9))  # 2 epochs x 4 steps, from step 1, nothing stale kept
    assert os.path.isfile(os.path.join(again, "backbone.safetensors"))
    assert not os.path.exists(os.path.join(again, "checkpoints", "step-00000002.tmp"))
    assert open(os.path.join(again, "train.log")).read().count("started again from step 0") == 1
    # a finished export whose checkpoints are gone is not restarted over
    shutil.rmtree(os.path.join(again, "checkpoints"))
    with pytest.raises(UserError, match="finished export but no checkpoint"):
        run(out, "resume=auto")


def test_momentum_zero_and_first_layer_clipping_pretrain(tmp_path):
    vit = ["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs.img_size=32",
           "model.backbone_kwargs.patch_size=8", "model.backbone_kwargs.depth=2", "train.epochs=1"]
    out = run(tmp_path / "m0", *vit, "moco.momentum=0", "optim.grad_clip_mode=first_layer", "optim.grad_clip=0.01",
              "model.mlp_norm=batchnorm", "model.pool=avg")
    rows = [json.loads(line) for line in open(os.path.join(out, "steps.jsonl"))]
    assert all(r["momentum"] == 0.0 for r in rows) and all(torch.isfinite(torch.tensor([r["loss"] for r in rows])))
    state = safetensors.torch.load_file(os.path.join(list_checkpoints(out)[-1], "model.safetensors"))
    assert not any(k.startswith("momentum_") for k in state)
    log = open(os.path.join(out, "train.log")).read()
    assert "no momentum encoder" in log and "the first layer only (2 tensors)" in log


@pytest.mark.gpu
def test_pretraining_runs_on_the_gpu_accelerate_picks(tmp_path):
    out = run(tmp_path / "gpu", "train.mixed_precision=auto")
    derived = yaml.safe_load(open(os.path.join(out, "config.yaml")))["derived"]
    assert derived["machine"] == torch.cuda.get_device_name(0)
    assert derived["mixed_precision"] in ("bf16", "fp16")
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["peak_mem_mb"] > 0



def test_a_checkpoint_of_the_older_format_gets_the_momentum_update_it_was_owed():
    """Older checkpoints hold the key encoder before the next step's update (``last_step_applied`` in the meta); the
    current ones after it. Loading an older one does that update, with the momentum of the step to come."""
    from ssl_bocb.tasks.pretrain import PretrainTask
    calls = []
    fake = SimpleNamespace(unwrapped=SimpleNamespace(has_momentum_encoder=True, update_momentum=calls.append),
                           derived=dict(total_steps=10),
                           extra_schedule=lambda step, total: dict(momentum=step / total))
    fake._momentum_update = lambda step: PretrainTask._momentum_update(fake, step)
    PretrainTask._catch_up_momentum(fake, dict(step=4, last_step_applied=True))
    assert calls == [0.4]
    PretrainTask._catch_up_momentum(fake, dict(step=4, last_step_applied=False))  # a skipped step: nothing owed
    PretrainTask._catch_up_momentum(fake, dict(step=4))  # the current format: nothing owed
    assert calls == [0.4]
