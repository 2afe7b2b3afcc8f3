import pytest

from ssl_bocb import config
from ssl_bocb.errors import UserError

P = config.PretrainConfig


def test_misspelt_key_names_nearest():
    with pytest.raises(UserError, match="unknown config key 'optim.wieght_decay'.*did you mean 'optim.weight_decay'"):
        config.load(P, [], ["optim.wieght_decay=0.1"])
    with pytest.raises(UserError, match="did you mean 'train.epochs'"):
        config.load(P, [], ["train.epoch=3"])


def test_misspelt_key_in_yaml_names_file_and_nearest(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("data:\n  nmae: cifar10\n")
    with pytest.raises(UserError, match=r"'data.nmae' in '.*r.yaml'.*'data.name'"):
        config.load(P, [str(f)])


def test_wrong_type_names_key_and_type():
    with pytest.raises(UserError, match="'train.epochs'.*expects int, got 'ten'"):
        config.load(P, [], ["train.epochs=ten"])
    with pytest.raises(UserError, match="'optim.base_lr'.*expects float"):
        config.load(P, [], ["optim.base_lr=fast"])


def test_bad_values():
    with pytest.raises(UserError, match="optim.base_lr must be > 0"):
        config.load(P, [], ["optim.base_lr=0"])
    with pytest.raises(UserError, match="train.epochs must be > 0"):
        config.load(P, [], ["train.epochs=-2"])
    with pytest.raises(UserError, match="choose one of: linear, sqrt, none"):
        config.load(P, [], ["optim.lr_scaling=cubic"])
    with pytest.raises(UserError, match="not of the form key=value"):
        config.load(P, [], ["train.epochs"])
    with pytest.raises(UserError, match="does not exist"):
        config.load(P, ["/nonexistent.yaml"])


def test_overlay_order_and_open_mappings(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("optim:\n  name: lars\n  base_lr: 0.3\nmodel:\n  backbone_kwargs:\n    drop_path_rate: 0.1\n")
    b = tmp_path / "b.yaml"
    b.write_text("optim:\n  base_lr: 0.5\n")
    cfg = config.load(P, [str(a), str(b)], ["train.epochs=7", "model.backbone_kwargs.img_size=32"])
    assert cfg.optim.name == "lars" and cfg.optim.base_lr == 0.5 and cfg.train.epochs == 7
    assert dict(cfg.model.backbone_kwargs) == {"drop_path_rate": 0.1, "img_size": 32}


def test_saved_config_loads_again(tmp_path):
    cfg = config.load(P, [], ["train.epochs=3"])
    path = str(tmp_path / "config.yaml")
    config.save(cfg, path, derived={"lr": 0.1})
    again = config.load(P, [path])
    assert again == cfg


@pytest.mark.parametrize("path", ["configs/quickstart.yaml", "configs/cifar10_resnet18.yaml",
                                  "configs/cifar10_vit_tiny.yaml", "configs/imagenet_vit_small_adamw.yaml",
                                  "configs/imagenet_resnet50_lars.yaml", "configs/optim/adamw.yaml",
                                  "configs/optim/lamb.yaml", "configs/optim/sgd.yaml", "configs/optim/lars.yaml"])
def test_shipped_recipes_load(path):
    import os
    from conftest import REPO
    cfg = config.load(P, [os.path.join(REPO, path)])
    assert cfg.train.epochs > 0


def test_published_recipes_follow_the_paper():
    import os
    from conftest import REPO
    from ssl_bocb.optim import resolve
    vit = config.load(P, [os.path.join(REPO, "configs/imagenet_vit_small_adamw.yaml")])
    o = resolve(vit.optim)
    assert (o.entry.name, o.base_lr, o.weight_decay, vit.optim.weight_decay_policy, vit.train.epochs,
            vit.train.warmup_epochs, vit.moco.temperature, vit.model.frozen_patch_embed) == \
        ("adamw", 1.5e-4, 0.1, "all", 300, 40, 0.2, True)
    rn = config.load(P, [os.path.join(REPO, "configs/imagenet_resnet50_lars.yaml")])
    o = resolve(rn.optim)
    assert (o.entry.name, o.base_lr, o.weight_decay, o.options["momentum"], o.options["trust_coefficient"],
            o.options["trust_clip"], rn.train.warmup_epochs, rn.moco.temperature, rn.data.crop_min) == \
        ("lars", 0.6, 1e-6, 0.9, 0.001, False, 10, 1.0, 0.2)
    # one value swaps the optimizer: the recipe's LARS tuning stays with LARS, AdamW takes the table's values
    swapped = resolve(config.load(P, [os.path.join(REPO, "configs/imagenet_resnet50_lars.yaml")],
                                  ["optim.name=adamw"]).optim)
    assert (swapped.base_lr, swapped.weight_decay, swapped.sources["base_lr"]) == (1.5e-4, 0.1, "table")
    overlay = resolve(config.load(P, [os.path.join(REPO, "configs/imagenet_resnet50_lars.yaml"),
                                      os.path.join(REPO, "configs/optim/sgd.yaml")]).optim)
    assert (overlay.entry.name, overlay.base_lr, overlay.options["momentum"]) == ("sgd", 0.03, 0.9)


def test_mixed_precision_no_survives_yaml_booleans():
    assert config.load(P, [], ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert config.load(config.EvalConfig, [], ["mixed_precision=no"]).mixed_precision == "no"
    assert config.load(P, [], ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


def _numeric(tp):
    import typing
    args = typing.get_args(tp) or (tp,)
    inner = [typing.get_args(a)[0] if typing.get_origin(a) is list else a for a in args]
    return any(a in (int, float) for a in inner) and not any(typing.get_origin(a) is dict for a in args)


@pytest.mark.parametrize("schema", [config.PretrainConfig, config.EvalConfig], ids=["pretrain", "eval"])
def test_every_key_is_declared_once_with_help_and_every_numeric_key_is_bounded(schema):
    keys = list(config.declarations(schema))
    assert len(keys) == len(config.schema_keys(schema)) > 60
    assert all(f.metadata.get("help") for _, f, _ in keys), [k for k, f, _ in keys if not f.metadata.get("help")]
    unbounded = [k for k, f, tp in keys if _numeric(tp) and not any(f.metadata.get(b) is not None
                                                                  for b in ("gt", "ge", "lt", "le"))]
    assert not unbounded, f"numeric keys without a bound: {unbounded}"
    text = config.describe(schema)
    assert all(text.count(f"\n{k} (") + text.startswith(f"{k} (") == 1 for k, _, _ in keys)


def test_declared_bounds_and_choices_hold_for_both_twins():
    E = config.EvalConfig
    with pytest.raises(UserError, match="moco.momentum must be < 1, got 1.0"):
        config.load(P, [], ["moco.momentum=1.0"])
    with pytest.raises(UserError, match="optim.min_lr_ratio must be <= 1"):
        config.load(P, [], ["optim.min_lr_ratio=2"])
    with pytest.raises(UserError, match=r"knn.ks must be > 0, got \[10, -1\]"):
        config.load(E, [], ["knn.ks=[10,-1]"])
    # one declaration serves optim and finetune.optim, stability and finetune.stability
    with pytest.raises(UserError, match="finetune.optim.base_lr must be > 0"):
        config.load(E, [], ["finetune.optim.base_lr=0"])
    with pytest.raises(UserError, match="finetune.stability.rollback_lr_factor must be <= 1"):
        config.load(E, [], ["finetune.stability.rollback_lr_factor=2"])
    with pytest.raises(UserError, match="finetune.host_reads='often' is not valid; choose one of: auto, step, log"):
        config.load(E, [], ["finetune.host_reads=often"])
    assert config.load(E, [], ["finetune.optim.base_lr=0.1"]).finetune.optim.base_lr == 0.1


@pytest.mark.slow
def test_help_config_lists_keys_with_their_facts():
    import subprocess
    import sys
    from conftest import REPO
    r = subprocess.run([sys.executable, "tools/pretrain.py", "--help-config"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "train.batch_size (int; default 256; > 0)\n    Global batch size over all processes" in r.stdout
    assert "train.host_reads (str; default auto; one of auto | step | log)" in r.stdout
    assert "moco.momentum (float; default 0.99; >= 0; < 1)" in r.stdout
