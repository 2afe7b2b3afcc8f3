"""What makes a study a measurement: the validation split, the floors, choosing on validation with bracketed grids."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_bocb import config
from ssl_bocb.data.datasets import HOLDOUT, subset_base
from ssl_bocb.errors import UserError
from ssl_bocb.sweep import plan, select
from test_sweep import BASE, write_sweep

FAKE = ["data.name=fake", "data.fake_per_class=16", "data.fake_classes=4", "data.num_workers=0"]


def data_cfg(*overrides):
    return config.load(config.PretrainConfig, [], FAKE + list(overrides)).data


# --- the validation split ----------------------------------------------------------------------------------------------

def test_holdout_keeps_the_last_images_of_each_class_out_of_the_train_split():
    d = data_cfg("data.holdout_per_class=4")
    base, train = subset_base(d, "train")
    _, held = subset_base(d, HOLDOUT)
    targets = list(base.targets)
    assert len(train) == 48 and len(held) == 16 and not set(train) & set(held)
    for c in range(4):
        of_class = [i for i, t in enumerate(targets) if t == c]
        assert sorted(i for i in held if targets[i] == c) == of_class[-4:]
    # data.subset draws from what is left, and the held-out images are never part of it
    _, bank = subset_base(d, "train", 13)
    assert len(bank) == 48 and not set(bank) & set(held)
    _, small = subset_base(d, HOLDOUT, 2)
    assert len(small) == 8 and set(small) <= set(held)
    # without a holdout the train split is whole, as before
    assert len(subset_base(data_cfg(), "train")[1]) == 64


def test_holdout_errors_are_one_line():
    with pytest.raises(UserError, match="needs data.holdout_per_class > 0"):
        subset_base(data_cfg(), HOLDOUT)
    with pytest.raises(UserError, match="leaves no training image of class"):
        subset_base(data_cfg("data.holdout_per_class=16"), "train")
    with pytest.raises(UserError, match="data.holdout_per_class must be >= 0"):
        data_cfg("data.holdout_per_class=-1")


def test_a_validation_reading_writes_its_own_file_and_never_replaces_the_test_reading(tmp_path):
    from ssl_bocb.eval.stages import run_knn
    common = FAKE + ["data.holdout_per_class=4", "knn.ks=[5]", "knn.k=5", f"output_dir={tmp_path}",
                     "model.backbone=resnet18"]
    test = run_knn(config.load(config.EvalConfig, [], common))
    val = run_knn(config.load(config.EvalConfig, [], common + ["data.test_split=holdout"]))
    assert os.path.isfile(tmp_path / "knn_metrics.json") and os.path.isfile(tmp_path / "val_knn_metrics.json")
    assert test["num_test"] == 64 and val["num_test"] == 16 and val["split"] == "holdout"
    assert test["num_train"] == val["num_train"] == 48
    assert json.load(open(tmp_path / "knn_metrics.json"))["top1"] == test["top1"]


def test_random_init_draws_follow_init_seed(tmp_path):
    from ssl_bocb.eval.features import load_eval_backbone, weights_digest
    m = config.load(config.EvalConfig, [], ["model.backbone=resnet18"]).model
    a, b, a2 = (weights_digest(load_eval_backbone("", m, s)[0]) for s in (0, 1, 0))
    assert a == a2 and a != b


# --- floors --------------------------------------------------------------------------------------------------------------

def test_pixel_floor_is_the_knn_of_normalised_flattened_pixels():
    from ssl_bocb.data import eval_transform
    from ssl_bocb.data.datasets import build_base
    from ssl_bocb.eval.knn import knn_classify
    from ssl_bocb.sweep.floors import pixel_knn
    cfg = config.load(config.EvalConfig, [], FAKE + ["data.holdout_per_class=4", "data.test_split=holdout",
                                                     "knn.k=5", "knn.ks=[5]", "data.pipeline=pil"])
    got = pixel_knn(cfg)
    # by hand: the same images through the eval transform, flattened
    base = build_base(cfg.data, "train")
    t = eval_transform(cfg.data)
    xs = torch.stack([t(base[i][0].convert("RGB")) for i in range(len(base))]).flatten(1)
    ys = torch.tensor(base.targets)
    held = torch.zeros(len(base), dtype=torch.bool)
    for c in range(4):
        held[torch.nonzero(ys == c).flatten()[-4:]] = True
    ref = knn_classify(xs[~held], ys[~held], xs[held], ys[held], ks=[5], temperature=cfg.knn.temperature,
                       backend="torch", num_classes=4)
    assert got["num_train"] == 48 and got["num_test"] == 16
    assert got["top1"] == pytest.approx(ref[5]["top1"])
    # the decoded path (no PIL) reads the same pixels to rounding
    decoded = pixel_knn(config.load(config.EvalConfig, [], FAKE + ["data.holdout_per_class=4",
                                                                   "data.test_split=holdout", "knn.k=5",
                                                                   "knn.ks=[5]"]))
    assert decoded["top1"] == pytest.approx(ref[5]["top1"])
    assert F.normalize(xs, dim=1).shape[1] == 3 * 32 * 32


@pytest.mark.slow
def test_floors_tool_writes_both_floors_for_each_split(tmp_path):
    from conftest import run_tool
    path = write_sweep(tmp_path, name="f", overrides=BASE + ["data.holdout_per_class=4"],
                       axes={"optimizer": {"key": "optim.name", "values": ["sgd"]}},
                       stages={"val_knn": {"overrides": ["knn.ks=[5]", "knn.k=5"]},
                               "knn": {"overrides": ["test_subset=4", "knn.ks=[5]", "knn.k=5"]}})
    proc = run_tool("floors", path, "--init-seeds", "0", "1", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    floors = json.load(open(tmp_path / "out" / "f" / "floors.json"))
    assert set(floors["splits"]) == {"val", "test"} and floors["bank_per_class"] == 0
    val = floors["splits"]["val"]
    assert val["split"] == "holdout" and val["num_queries"] == 16 and val["num_bank"] == 48
    draws = val["random_init_seeds"]["vit_tiny_patch16_224"]
    assert len(draws) == 3 and val["random_init"]["vit_tiny_patch16_224"] == pytest.approx(sum(draws) / 3, abs=1e-3)
    assert floors["splits"]["test"]["num_queries"] == 16 and 0 <= floors["pixels"] <= 100
    proc = run_tool("floors", path, "--init-seeds", "0", "1")
    assert proc.returncode == 2 and "at least 3 init seeds" in proc.stderr


# --- choosing on validation ----------------------------------------------------------------------------------------------

def test_choose_says_where_the_best_point_lies():
    assert select.choose({0.1: 30.0, 0.3: 35.0, 1.0: 33.0}) == (0.3, select.BRACKETED)
    assert select.choose({0.1: 30.0, 0.3: 35.0, 1.0: 36.0}) == (1.0, select.HIGH_END)
    assert select.choose({0.1: 37.0, 0.3: 35.0, 1.0: 36.0}) == (0.1, select.LOW_END)
    assert select.choose({0.1: 35.0, 0.3: 35.0, 1.0: 30.0}) == (0.1, select.LOW_END)  # a tie: the smaller value
    assert select.next_point([0.1, 0.3, 1.0], select.HIGH_END) == 3.33
    assert select.next_point([0.1, 0.3, 1.0], select.LOW_END) == pytest.approx(0.0333)


def _select_sweep(tmp_path, **extra):
    fields = dict(overrides=BASE + ["data.holdout_per_class=4"],
                  axes={"optimizer": {"key": "optim.name", "values": ["sgd"]}},
                  grid={"sgd": {"base_lr": [0.01, 0.1, 1.0]}}, seeds=[0, 1, 2],
                  stages={"val_knn": {"overrides": ["knn.ks=[5]", "knn.k=5"]},
                          "knn": {"overrides": ["test_subset=4", "knn.ks=[5]", "knn.k=5"]}},
                  select={"metric": "val_knn_top1", "stages": ["knn"], "extend": 2})
    fields.update(extra)
    return write_sweep(tmp_path, name="sel", **fields)


def test_select_runs_the_grid_first_extends_an_unbracketed_end_then_seeds_the_choice(tmp_path, monkeypatch):
    path = _select_sweep(tmp_path)
    scores = {}
    monkeypatch.setattr(select, "cell_score", lambda cell, metric: scores.get(cell.labels["lr"]))
    p = plan(path)
    assert [c.name for c in p.cells] == ["sgd__lr=0.01__s0", "sgd__lr=0.1__s0", "sgd__lr=1__s0"]
    assert all([s.name for s in c.stages] == ["val_knn"] for c in p.cells)  # no test stage on the grid
    assert p.selection["sgd"]["where"] == select.PENDING
    scores.update({"0.01": 20.0, "0.1": 25.0, "1": 30.0})  # rising to the top end: one more point past it
    p = plan(path)
    assert [c.labels["lr"] for c in p.cells] == ["0.01", "0.1", "1", "10"]
    assert p.selection["sgd"]["added"] == ["10"] and p.selection["sgd"]["where"] == select.PENDING
    scores["10"] = 28.0  # now inside: the choice gets the test stage and the other seeds
    p = plan(path)
    names = [c.name for c in p.cells]
    assert names == ["sgd__lr=0.01__s0", "sgd__lr=0.1__s0", "sgd__lr=1__s0", "sgd__lr=10__s0", "sgd__lr=1__s1",
                     "sgd__lr=1__s2"]
    chosen = p.find("sgd__lr=1__s0")
    assert [s.name for s in chosen.stages] == ["val_knn", "knn"]
    assert [s.name for s in p.find("sgd__lr=0.1__s0").stages] == ["val_knn"]
    assert p.selection["sgd"] == dict(key="base_lr", grid="sgd", points={"0.01": 20.0, "0.1": 25.0, "1": 30.0,
                                                                         "10": 28.0},
                                      chosen="1", where=select.BRACKETED, added=["10"])
    # the chosen point keeps its pretraining: same hash, same folder as its grid cell
    assert chosen.hash == plan(path).find("sgd__lr=1__s0").hash


def test_select_stops_extending_at_its_limit_and_leaves_the_pair_unseeded(tmp_path, monkeypatch):
    path = _select_sweep(tmp_path, select={"metric": "val_knn_top1", "stages": ["knn"], "extend": 1})
    scores = {"0.01": 30.0, "0.1": 25.0, "1": 20.0, "0.001": 31.0}
    monkeypatch.setattr(select, "cell_score", lambda cell, metric: scores.get(cell.labels["lr"]))
    p = plan(path)
    assert [c.labels["lr"] for c in p.cells] == ["0.001", "0.01", "0.1", "1"]
    assert p.selection["sgd"]["where"] == select.LOW_END and all(c.labels["seed"] == "0" for c in p.cells)


def test_select_block_errors(tmp_path):
    with pytest.raises(UserError, match="choose on a validation stage"):
        plan(_select_sweep(tmp_path, select={"metric": "knn_top1", "stages": []}))
    with pytest.raises(UserError, match="at least 3 points"):
        plan(_select_sweep(tmp_path, grid={"sgd": {"base_lr": [0.1, 1.0]}}))
    with pytest.raises(UserError, match="holds none out|cells hold none out"):
        plan(_select_sweep(tmp_path, overrides=BASE))


def test_grid_keys_can_name_a_backbone_and_an_optimizer(tmp_path):
    path = write_sweep(tmp_path, name="g", axes={
        "backbone": {"vit": [], "vit2": ["model.backbone_kwargs.depth=1"]},
        "optimizer": {"key": "optim.name", "values": ["sgd"]}},
        grid={"sgd": {"base_lr": [0.1, 0.3]}, "vit2:sgd": {"base_lr": [1.0, 3.0, 9.0]}})
    lrs = {}
    for c in plan(path).cells:
        lrs.setdefault(c.labels["backbone"], []).append(c.labels["lr"])
    assert lrs == {"vit": ["0.1", "0.3"], "vit2": ["1", "3", "9"]}


@pytest.mark.slow
def test_results_carry_base_lr_machine_precision_and_relative_folders(tmp_path):
    from ssl_bocb.sweep import collect, run_local
    path = write_sweep(tmp_path, name="r", axes={"optimizer": {"key": "optim.name", "values": ["sgd"]}},
                       overrides=BASE + ["data.holdout_per_class=4", "train.mixed_precision=no"],
                       stages={"val_knn": {"overrides": ["knn.ks=[5]", "knn.k=5"]}})
    p = plan(path)
    assert run_local(p, progress=False)["done"] == [p.cells[0].id]
    import csv
    (row,) = list(csv.DictReader(open(collect(p)["csv"])))
    assert float(row["base_lr"]) == 0.03 and row["precision"] == "fp32" and "cores)" in row["machine"]
    assert row["folder"] == os.path.join("cells", p.cells[0].id) and 0 <= float(row["val_knn_top1"]) <= 100
    assert not any(str(tmp_path) in v for v in row.values())


# --- flags that seed noise cannot raise: simulated studies -------------------------------------------------------------

# Seed noise as measured: the per-cell standard deviations of the 12 cells x 3 seeds of studies/cpu_study (kNN top-1,
# points; pooled 0.464 on 24 degrees of freedom).
MEASURED_SD = [0.23, 0.27, 0.63, 0.53, 0.36, 0.25, 0.39, 0.34, 0.37, 0.41, 0.74, 0.69]


def _simulated_rows(rng, coupling=0.0, seeds=3, backbones=("resnet", "vit"),
                    optimizers=("sgd", "lars", "adamw", "lamb")):
    """One simulated 2 x 4 study: backbone and optimizer main effects (which are not coupling), each cell's noise sd
    drawn from the measured ones, and ``coupling`` points taken from the vit x sgd pair alone."""
    rows = []
    b_eff = {b: rng.normal(40, 5) for b in backbones}
    o_eff = {o: rng.normal(0, 1) for o in optimizers}
    for b in backbones:
        for o in optimizers:
            sd = rng.choice(MEASURED_SD)
            mu = b_eff[b] + o_eff[o] - (coupling if (b, o) == ("vit", "sgd") else 0.0)
            rows += [dict(backbone=b, optimizer=o, seed=s, score=float(rng.normal(mu, sd))) for s in range(seeds)]
    return rows


def _equal_rows(rng, seeds=3):
    """A null study of identical cells: every pair of a row has the same mean, only seed noise differs."""
    rows = []
    for b, mu in (("resnet", 30.0), ("vit", 35.0)):
        for o in ("sgd", "lars", "adamw", "lamb"):
            sd = rng.choice(MEASURED_SD)
            rows += [dict(backbone=b, optimizer=o, seed=s, score=float(rng.normal(mu, sd))) for s in range(seeds)]
    return rows


def test_on_a_null_study_at_most_5_percent_of_pairs_are_flagged_certain():
    from ssl_bocb.analysis.bocb import analyze_study
    rng = np.random.default_rng(0)
    certain = flagged = pairs = coupled = 0
    studies = 400
    for _ in range(studies):
        st = analyze_study(_equal_rows(rng))
        cells = list(st.cells.values())
        pairs += len(cells)
        flagged += sum(c.flagged for c in cells)
        certain += sum(c.certain for c in cells)
        coupled += st.interaction["p"] < 0.05
    assert flagged / pairs > 0.25         # Eq. 1 alone flags a good part of pure noise, as the issue measured
    assert certain / pairs <= 0.05        # the calibrated test does not
    assert coupled / studies <= 0.08      # nor does the interaction test (5 % nominal; 400 draws)


def test_a_true_3_point_coupling_is_flagged_certain_in_80_percent_of_studies():
    from ssl_bocb.analysis.bocb import analyze_study
    rng = np.random.default_rng(1)
    hits = found = 0
    studies = 300
    for _ in range(studies):
        st = analyze_study(_simulated_rows(rng, coupling=3.0))
        c = st.cells[("vit", "sgd")]
        # a main effect can make vit x sgd the best of its row only if sgd is far ahead overall; count it as missed
        hits += c.certain
        eff = next(e for e in st.interaction["effects"] if (e["backbone"], e["optimizer"]) == ("vit", "sgd"))
        found += eff["high"] < 0
    assert hits / studies >= 0.80
    assert found / studies >= 0.80        # the interaction contrast sees the same coupling


def test_main_effects_without_coupling_do_not_make_the_interaction_significant():
    from ssl_bocb.analysis.bocb import analyze_study
    rng = np.random.default_rng(2)
    studies = 300
    sig = sum(analyze_study(_simulated_rows(rng)).interaction["p"] < 0.05 for _ in range(studies))
    assert sig / studies <= 0.08
