"""The package as users install it: the ssl-bocb entry point, the recipes found by name, tools/ as thin shims, the
sweep runner launching the package (not the checkout's tools/), and a wheel installed outside the checkout."""
import glob
import os
import subprocess
import sys

import pytest
import safetensors.torch
import timm
import torch

from conftest import REPO, TINY

# a two-block ViT on 4 classes of synthetic images (as the sweep tests use)
VIT = ["data.name=fake", "data.fake_per_class=16", "data.fake_classes=4", "data.num_workers=0",
       "model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs.img_size=32", "model.backbone_kwargs.patch_size=8",
       "model.backbone_kwargs.depth=2", "model.hidden_dim=32", "model.out_dim=16", "train.batch_size=16",
       "train.epochs=1", "train.warmup_epochs=0", "monitor.knn_every=0", "train.log_every=1"]
from ssl_bocb import config, recipes
from ssl_bocb.errors import UserError


def ssl_bocb(*args, cwd=None, python=sys.executable, timeout=600):
    return subprocess.run([python, "-m", "ssl_bocb", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


@pytest.mark.slow
def test_the_entry_point_lists_its_commands_and_refuses_a_typo():
    out = ssl_bocb("--help")
    assert out.returncode == 0
    for command in ("pretrain", "knn", "linprobe", "finetune", "sweep", "analyze", "export", "recipes"):
        assert f"  {command} " in out.stdout
    bad = ssl_bocb("pretran")
    assert bad.returncode == 2 and "unknown command 'pretran'; did you mean 'pretrain'?" in bad.stderr
    assert "--help-config" in ssl_bocb("pretrain", "--help").stdout


def test_every_console_script_points_at_a_module_that_exists():
    import configparser
    import importlib
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    scripts = [line for line in cfg["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    assert scripts == ["ssl-bocb = ssl_bocb.cli.main:main"]
    from ssl_bocb.cli.main import COMMANDS
    for module, _ in COMMANDS.values():
        assert callable(importlib.import_module(f"ssl_bocb.cli.{module}").main)


def test_recipes_are_found_by_name_or_path_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = os.path.realpath(os.path.join(REPO, "configs", "quickstart.yaml"))
    for name in ("quickstart", "quickstart.yaml", "configs/quickstart.yaml"):
        assert os.path.realpath(recipes.find(name)) == target
    assert os.path.realpath(recipes.find("ablations/patch_frozen")).endswith("configs/ablations/patch_frozen.yaml")
    own = tmp_path / "quickstart.yaml"  # a file of the user's own wins over a shipped recipe of the same name
    own.write_text("train: {epochs: 1}\n")
    assert recipes.find("quickstart.yaml") == str(own)
    with pytest.raises(UserError, match="config file 'quickstrat' does not exist .*did you mean 'quickstart'"):
        recipes.find("quickstrat")
    names = recipes.names()
    assert {"quickstart", "sweeps/cpu_mini", "eval/cifar10", "optim/lars"} <= set(names)
    assert len(recipes.names("ablations")) == len(os.listdir(os.path.join(REPO, "configs", "ablations")))
    cfg = config.load(config.PretrainConfig, ["quickstart"], [])
    assert cfg.model.backbone == "resnet18"


def test_the_tools_are_thin_shims_that_insert_no_sys_path():
    for path in glob.glob(os.path.join(REPO, "tools", "*.py")):
        text = open(path).read()
        assert "sys.path" not in text, path
    for name in ("pretrain", "knn", "linprobe", "finetune", "quickstart", "sweep", "analyze", "floors", "optimizers"):
        lines = [line for line in open(os.path.join(REPO, "tools", f"{name}.py")) if line.strip()]
        assert len(lines) <= 6 and f"from ssl_bocb.cli.{name} import main\n" in lines, name


def test_a_sweep_stage_runs_the_package_entry_point(tmp_path):
    from ssl_bocb.sweep import plan
    from ssl_bocb.sweep.runner import stage_command
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nrecipe: [quickstart]\naxes:\n  optimizer: {key: optim.name, values: [sgd]}\n"
                    "stages:\n  knn: {config: eval/cifar10}\n")
    p = plan(str(path), [])
    cell = p.cells[0]
    for stage in ("pretrain", "knn"):
        cmd = stage_command(p, cell, stage, p.resources, False, 29500)
        assert cmd[:4] == [sys.executable, "-m", "ssl_bocb", stage] and not any("tools" in a for a in cmd)
    assert os.path.realpath(cell.files[0]) == os.path.realpath(os.path.join(REPO, "configs", "quickstart.yaml"))


def _pretrained(tmp_path, *extra):
    from ssl_bocb.tasks import pretrain
    out = str(tmp_path / "run")
    pretrain(config.load(config.PretrainConfig, [], TINY + ["train.epochs=1", f"output_dir={out}", *extra]))
    return out


@pytest.mark.slow
def test_export_writes_a_folder_timm_loads_with_the_same_weights(tmp_path):
    from ssl_bocb.cli.export import main
    run = _pretrained(tmp_path, *VIT)
    out = str(tmp_path / "exported")
    main([run, "--out", out])
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]
    ours = safetensors.torch.load_file(os.path.join(run, "backbone.safetensors"))
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True)
    by_name = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0, img_size=32, patch_size=8,
                                depth=2, pretrained_cfg_overlay=dict(file=os.path.join(out, "model.safetensors")))
    for model in (by_dir, by_name):
        state = model.state_dict()
        assert state.keys() == ours.keys() and all(torch.equal(state[k], ours[k]) for k in ours)
    card = open(os.path.join(out, "README.md")).read()
    assert "library_name: timm" in card and "vit_tiny_patch16_224" in card
    with pytest.raises(SystemExit) as e:  # a second export into the same folder damages nothing
        main([run, "--out", out])
    assert e.value.code == 2 and sorted(os.listdir(out)) == ["README.md", "config.json", "model.safetensors"]


@pytest.mark.slow
def test_export_refuses_a_backbone_plain_timm_does_not_build(tmp_path, capsys):
    from ssl_bocb.cli.export import main
    run = _pretrained(tmp_path, "model.backbone=resnet18", "model.cifar_stem=true")
    with pytest.raises(SystemExit) as e:
        main([run, "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "the CIFAR stem" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.slow
def test_the_wheel_installed_outside_the_checkout_pretrains_evaluates_and_sweeps(tmp_path):
    """Build the wheel, install it (no dependencies: they come from this environment, the checkout does not) into
    a fresh venv, and run the entry point from an empty folder."""
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    REPO], check=True, capture_output=True, timeout=600)
    (wheel,) = glob.glob(str(dist / "ssl_bocb-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    with open(os.path.join(site, "deps.pth"), "w") as f:  # the dependencies, not the editable checkout
        f.write("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel], check=True,
                   capture_output=True, timeout=600)
    work = tmp_path / "empty"
    work.mkdir()
    where = subprocess.run([python, "-c", "import ssl_bocb, sys; print(ssl_bocb.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(site) and not where.startswith(REPO)
    assert ssl_bocb("recipes", "sweeps", cwd=work, python=python).stdout.split()[:1] == ["sweeps/cifar_bocb"]
    pre = ssl_bocb("pretrain", "--config", "quickstart", *VIT, "output_dir=run", cwd=work, python=python)
    assert pre.returncode == 0, pre.stderr[-2000:]
    assert os.path.isfile(work / "run" / "backbone.safetensors")
    knn = ssl_bocb("knn", *VIT[:4], "checkpoint=run", "test_subset=4", "knn.ks=[5]", "knn.k=5", cwd=work, python=python)
    assert knn.returncode == 0, knn.stderr[-2000:]
    assert os.path.isfile(work / "run" / "knn_metrics.json")
    (work / "s.yaml").write_text(
        "name: s\nrecipe: [quickstart]\noverrides: [" + ", ".join(VIT) + "]\n"
        "axes:\n  optimizer: {key: optim.name, values: [sgd, adamw]}\n"
        "stages:\n  knn: {overrides: [test_subset=4, 'knn.ks=[5]', knn.k=5]}\nresources: {parallel: 1, threads: 1}\n")
    sweep = ssl_bocb("sweep", "run", "s.yaml", cwd=work, python=python)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert len(glob.glob(str(work / "runs" / "sweeps" / "s" / "cells" / "*" / "knn_metrics.json"))) == 2
