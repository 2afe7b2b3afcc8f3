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
