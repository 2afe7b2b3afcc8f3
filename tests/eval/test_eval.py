import json
import os

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from conftest import TINY, run_tool
from ssl_bocb import config
from ssl_bocb.engine import make_accelerator
from ssl_bocb.tasks import pretrain
from ssl_bocb.eval.features import weights_digest
from ssl_bocb.tasks.finetune import run_finetune
from ssl_bocb.eval.knn import knn_classify, knn_vote, topk_faiss, topk_torch
from ssl_bocb.eval.linear import linear_probe_full, train_linear_cached
from ssl_bocb.eval.metrics import validate
from ssl_bocb.eval.stages import run_knn, run_linprobe
from ssl_bocb.data import build_dataset, eval_transform, probe_train_transform
from ssl_bocb.models import create_backbone

E = config.EvalConfig
FAKE = ["data.name=fake", "data.num_workers=0", "batch_size=32"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    return pretrain(config.load(config.PretrainConfig, [], TINY + [f"output_dir={out}", "monitor.knn_every=1",
                                                                   "monitor.knn_train_per_class=8",
                                                                   "monitor.knn_test_per_class=4"]))


def clustered(n, d=16, classes=4, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + noise * torch.randn(n, d, generator=g), y


def test_knn_equals_sklearn_distance_weighted():
    ftr, ytr = clustered(300, noise=1.5)
    fte, yte = clustered(100, noise=1.5, seed=1)
    k, T = 15, 0.07
    train = torch.nn.functional.normalize(ftr, dim=1)
    test = torch.nn.functional.normalize(fte, dim=1)
    sims, idx = topk_torch(train, test, k)
    ours = knn_vote(sims, idx, ytr, 4, k, T).argmax(1)
    # cosine distance d = 1 - sim, so exp(sim / T) = exp((1 - d) / T)
    skl = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1.0 - d) / T)).fit(ftr.numpy(), ytr.numpy())
    theirs = torch.from_numpy(skl.predict(fte.numpy()))
    assert torch.equal(ours, theirs)
    acc = knn_classify(ftr, ytr, fte, yte, ks=[k], temperature=T, backend="torch")[k]["top1"]
    assert acc == pytest.approx(100.0 * (theirs == yte).float().mean().item())


def test_faiss_and_torch_backends_agree_on_top1():
    ftr, ytr = clustered(2000, d=32, classes=10, noise=2.0)
    fte, yte = clustered(500, d=32, classes=10, noise=2.0, seed=1)
    a = knn_classify(ftr, ytr, fte, yte, backend="torch")
    b = knn_classify(ftr, ytr, fte, yte, backend="faiss")
    assert set(a) == {10, 20, 100, 200}
    for k in a:
        assert a[k]["top1"] == b[k]["top1"]
    train = torch.nn.functional.normalize(ftr, dim=1)
    test = torch.nn.functional.normalize(fte, dim=1)
    st, it = topk_torch(train, test, 20, chunk_size=64)
    sf, i_f = topk_faiss(train, test, 20)
    assert torch.equal(it[:, 0], i_f[:, 0]) and torch.allclose(st, sf, atol=1e-5)
    assert 20 < a[20]["top1"] < 100  # a real problem, neither trivial nor hopeless


def test_cached_linear_probe_separates_separable_features():
    ftr, ytr = clustered(800, d=32, classes=5, noise=0.3)
    fte, yte = clustered(200, d=32, classes=5, noise=0.3, seed=1)
    res = train_linear_cached(ftr, ytr, fte, yte, 5, epochs=30, batch_size=128, base_lr=0.1, progress=False)
    assert res["top1"] >= 99.0


def test_full_linear_probe_leaves_backbone_unchanged():
    cfg = config.load(E, [], FAKE + ["data.image_size=32"])
    acc = make_accelerator(cfg)
    backbone = create_backbone("resnet18")
    backbone.train()
    before = weights_digest(backbone)
    train_ds = build_dataset(cfg.data, "train", probe_train_transform(cfg.data))
    test_ds = build_dataset(cfg.data, "test", eval_transform(cfg.data))
    res = linear_probe_full(backbone, train_ds, test_ds, acc, 4, epochs=2, batch_size=32, base_lr=0.1, num_workers=0)
    assert res["backbone_unchanged"] is True
    assert weights_digest(backbone) == before  # BN running stats included: eval mode throughout
    assert 0.0 <= res["top1"] <= 100.0


@pytest.mark.slow
def test_knn_and_linprobe_tools_write_valid_metrics_and_reuse_features(pretrained, tmp_path):
    cfg = config.load(E, [], FAKE + [f"checkpoint={pretrained}"])
    m = run_knn(cfg)
    validate(m)
    assert m["feature_cache_hit"] is False and m["init"] == "pretrained"
    assert set(m["table"]) == {"10", "20", "100", "200"}
    path = os.path.join(pretrained, "knn_metrics.json")
    validate(json.load(open(path)))
    lin = run_linprobe(config.load(E, [], FAKE + [f"checkpoint={pretrained}", "linear.epochs=5"]))
    validate(lin)
    assert lin["mode"] == "cached"
    again = run_knn(config.load(E, [], FAKE + [f"checkpoint={pretrained}", "overwrite=true"]))
    assert again["feature_cache_hit"] is True and again["top1"] == m["top1"]
    assert any(f.startswith("knn_metrics.json.old-") for f in os.listdir(pretrained))
    # other weights (the checkpoint folder of the same run at an earlier step would do; random init here) miss
    other = run_knn(config.load(E, [], FAKE + [f"output_dir={tmp_path / 'rand'}"]))
    assert other["feature_cache_hit"] is False and other["init"] == "random" and other["checkpoint"] is None


def test_eval_reads_checkpoint_folders(pretrained, tmp_path):
    from ssl_bocb.engine.checkpoint import latest_checkpoint
    ck = latest_checkpoint(pretrained)
    m = run_knn(config.load(E, [], FAKE + [f"checkpoint={ck}", f"output_dir={tmp_path / 'ckpt'}"]))
    exported = run_knn(config.load(E, [], FAKE + [f"checkpoint={pretrained}", f"output_dir={tmp_path / 'export'}"]))
    assert m["init"] == exported["init"] == "pretrained" and m["checkpoint"] != exported["checkpoint"]
    assert m["top1"] == exported["top1"]  # the final checkpoint holds the exported backbone


@pytest.mark.slow
def test_existing_result_is_not_overwritten_and_bad_checkpoint_exits_2(pretrained, tmp_path):
    proc = run_tool("knn", *FAKE, f"checkpoint={pretrained}")
    if not os.path.exists(os.path.join(pretrained, "knn_metrics.json")):
        pytest.fail("fixture result missing")
    assert proc.returncode == 2 and "already exists; pass overwrite=true" in proc.stderr
    proc = run_tool("linprobe", *FAKE, f"checkpoint={tmp_path / 'missing'}")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_online_knn_monitor_is_logged(pretrained):
    rows = [json.loads(line) for line in open(os.path.join(pretrained, "log.jsonl"))]
    assert all(0.0 <= r["knn_top1"] <= 100.0 for r in rows) and len(rows) == 2
    assert os.path.isfile(os.path.join(pretrained, "curves.png"))


@pytest.mark.slow
def test_finetune_on_tiny_data_beats_chance(tmp_path):
    cfg = config.load(E, [], FAKE + [f"output_dir={tmp_path / 'ft'}", "data.fake_per_class=24", "finetune.epochs=6",
                                     "finetune.batch_size=16", "finetune.warmup_epochs=1", "finetune.mixup_prob=0",
                                     "finetune.randaugment=", "finetune.optim.base_lr=0.05",
                                     "finetune.ema_decay=0.9"])
    m = run_finetune(cfg)
    validate(m)
    assert m["top1"] > 50.0  # 4 classes: chance is 25 %
    rows = [json.loads(line) for line in open(tmp_path / "ft" / "log.jsonl")]
    assert len(rows) == 6 and "ema_top1" in rows[-1] and rows[-1]["grad_norm"] > 0
    assert os.path.isfile(tmp_path / "ft" / "finetune_metrics.json")


@pytest.mark.slow
def test_finetune_resume_and_vit_layer_decay(tmp_path):
    base = FAKE + [f"output_dir={tmp_path / 'vit'}", "model.backbone=vit_tiny_patch16_224",
                   "model.backbone_kwargs={img_size: 32, patch_size: 8}", "finetune.batch_size=16",
                   "finetune.epochs=2", "finetune.layer_decay=0.65", "finetune.optim.name=lamb"]
    run_finetune(config.load(E, [], base + ["finetune.epochs=1"]))
    m = run_finetune(config.load(E, [], base + ["finetune.resume=auto"]))
    rows = [json.loads(line) for line in open(tmp_path / "vit" / "log.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2] and m["epochs"] == 2
    import yaml
    groups = yaml.safe_load(open(tmp_path / "vit" / "config.yaml"))["derived"]["param_groups"]
    assert len(groups) > 4  # one pair per layer depth


def test_metrics_schema_rejects_broken_files():
    good = {"stage": "knn", "top1": 50.0, "top5": 90.0, "dataset": "x", "split": "test", "num_train": 1,
            "num_test": 1, "checkpoint": None, "backbone": "resnet18", "protocol": {}, "seconds": 1.0}
    validate(good)
    for key, value in [("top1", "50"), ("stage", "other"), ("top5", 120.0), ("num_test", 1.5)]:
        with pytest.raises(ValueError):
            validate(dict(good, **{key: value}))
    with pytest.raises(ValueError, match="lack 'seconds'"):
        validate({k: v for k, v in good.items() if k != "seconds"})


@pytest.mark.slow
def test_quickstart_tool_prints_both_rows(tmp_path):
    proc = run_tool("quickstart", *TINY, f"output_dir={tmp_path / 'q'}", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MoCo v3 (1 ep)" in proc.stdout and "random init" in proc.stdout
    assert os.path.isfile(tmp_path / "q" / "random-init" / "linprobe_metrics.json")


def test_finetune_trains_the_position_embedding_unless_told_not_to():
    from ssl_bocb.tasks.finetune import build_finetune_model
    vit = FAKE + ["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={img_size: 32, patch_size: 8}",
                  "model.pos_embed=sincos"]
    model, _ = build_finetune_model(config.load(E, [], vit), 4)
    assert model.pos_embed.requires_grad
    model, _ = build_finetune_model(config.load(E, [], vit + ["finetune.train_pos_embed=false"]), 4)
    assert not model.pos_embed.requires_grad and model.head.out_features == 4


@pytest.mark.slow
def test_finetune_skips_a_non_finite_step_and_records_it(tmp_path, monkeypatch):
    """Fine-tuning runs in the same loop as pretraining: a NaN loss is skipped (it used to stop the run), counted in
    summary.json, and the EMA takes no update from it; steps.jsonl has per-layer gradient norms."""
    from ssl_bocb.tasks import finetune as ft_mod
    original, calls = ft_mod.FinetuneTask.loss_fn, [0]

    def loss_fn(self, inputs):
        fn = original(self, inputs)
        calls[0] += 1
        return (lambda: fn() * float("nan")) if calls[0] == 3 else fn
    monkeypatch.setattr(ft_mod.FinetuneTask, "loss_fn", loss_fn)
    out = tmp_path / "ft"
    m = run_finetune(config.load(E, [], FAKE + [f"output_dir={out}", "finetune.epochs=2", "finetune.batch_size=16",
                                                "finetune.mixup_prob=0", "finetune.randaugment=",
                                                "finetune.ema_decay=0.9", "finetune.log_every=1"]))
    validate(m)
    s = json.load(open(out / "summary.json"))
    assert s["status"] == "finished" and s["events"]["nonfinite_steps"] == 1 and s["nonfinite_steps_list"][0]["step"] == 3
    steps = [json.loads(line) for line in open(out / "steps.jsonl")]
    assert [r["step"] for r in steps] == [1, 2, 4, 5, 6, 7, 8]
    assert {"first_layer", "stem", "layer1.0", "head"} <= set(steps[0]["layer_grad_norm"])
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert rows[0]["nonfinite_steps"] == 1 and "top1_dips" in rows[-1]
