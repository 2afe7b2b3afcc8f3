"""BOCB analysis: statistics on hand-made tables, the paper's tuned settings, WeightWatcher parity, sharpness,
stability detectors and the report."""
import csv
import json
import math
import os
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, SHARED_DATA
from ssl_bocb.analysis import bocb, spectral
from ssl_bocb.analysis.sharpness import activation_fractions, hessian_top_eigenvalue, power_iteration
from ssl_bocb.engine.stability import dips, spikes

def analyze_cli(*args):
    """tools/analyze.py in this process: (exit code, stdout, stderr)."""
    import contextlib
    import importlib.util
    import io
    spec = importlib.util.spec_from_file_location("analyze_tool", os.path.join(REPO, "tools", "analyze.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            tool.main(list(args))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


PAPER_CSV = os.path.join(SHARED_DATA, "bocb_cifar100_best_lr_wd.csv")
PAPER_MODES = os.path.join(SHARED_DATA, "bocb_cifar100_mode_defaults.csv")


# --- statistics ------------------------------------------------------------------------------------------------------

def test_t_quantiles_and_intervals():
    assert bocb.t_quantile(0.975, 1) == pytest.approx(12.7062, abs=2e-3)
    assert bocb.t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-3)
    assert bocb.t_quantile(0.975, 30) == pytest.approx(2.0423, abs=1e-3)
    lo, hi = bocb.confidence_interval([1.0, 2.0, 3.0], "t")
    half = bocb.t_quantile(0.975, 2) / math.sqrt(3)  # s = 1
    assert (lo, hi) == pytest.approx((2 - half, 2 + half)) and bocb.t_quantile(0.975, 2) == pytest.approx(4.3027, abs=1e-3)
    blo, bhi = bocb.confidence_interval([1.0, 2.0, 3.0, 4.0, 5.0], "bootstrap")
    assert 1.0 < blo < 3.0 < bhi < 5.0
    assert all(math.isnan(v) for v in bocb.confidence_interval([1.0], "t"))


def test_bad_pairing_rules_on_a_hand_made_backbone():
    res = {"sgd": 80.0, "lars": 79.0, "adamw": 78.0, "lamb": 70.0}
    # quartiles (linear): q25 = 76.0, q75 = 79.25 -> IQR 3.25
    assert bocb.iqr(list(res.values())) == pytest.approx(3.25)
    # Eq. 1, gamma 3: cut = 80 - min(3.25, 3) = 77 -> only lamb
    assert bocb.flag_bad_pairs(res, "eq1", 3.0) == {"sgd": False, "lars": False, "adamw": False, "lamb": True}
    # gamma 1: cut = 79 -> adamw (78) and lamb; lars (79) is not below the cut
    assert bocb.flag_bad_pairs(res, "eq1", 1.0) == {"sgd": False, "lars": False, "adamw": True, "lamb": True}
    # t x IQR with t = 0.5: 80 - r > 1.625 -> adamw and lamb; t = 1.5: > 4.875 -> lamb
    assert [k for k, v in bocb.flag_bad_pairs(res, "iqr", 0.5).items() if v] == ["adamw", "lamb"]
    assert [k for k, v in bocb.flag_bad_pairs(res, "iqr", 1.5).items() if v] == ["lamb"]
    with pytest.raises(ValueError, match="unknown bad-pairing rule"):
        bocb.flag_bad_pairs(res, "gamma")


def test_study_summaries_drop_the_worst_and_seeds_give_intervals():
    rows = []
    table = {("r18", "sgd"): [80, 82], ("r18", "adamw"): [78, 78], ("r18", "lamb"): [60, 62],
             ("vit", "sgd"): [50, 52], ("vit", "adamw"): [70, 72], ("vit", "lamb"): [71, 71]}
    for (b, o), scores in table.items():
        for seed, s in enumerate(scores):
            rows.append(dict(backbone=b, optimizer=o, seed=seed, score=float(s)))
    st = bocb.analyze_study(rows, "eq1", 3.0)
    assert st.backbones == ["r18", "vit"] and st.optimizers == ["sgd", "adamw", "lamb"]
    c = st.cells[("r18", "sgd")]
    assert c.n == 2 and c.mean == 81.0 and c.std == pytest.approx(math.sqrt(2))
    assert (c.ci_high - c.ci_low) / 2 == pytest.approx(bocb.t_quantile(0.975, 1) * math.sqrt(2) / math.sqrt(2))
    # r18 means 81, 78, 61: IQR = 79.5 - 69.5 = 10 -> cut 81 - 3 = 78: lamb flagged, adamw (78.0) not
    assert [o for (b, o), c in st.cells.items() if b == "r18" and c.flagged] == ["lamb"]
    # vit means 51, 71, 71: cut 68 -> sgd flagged
    assert [o for (b, o), c in st.cells.items() if b == "vit" and c.flagged] == ["sgd"]
    r18 = st.per_backbone[0]
    assert (r18.worst_of, r18.mean, r18.range, r18.flagged) == ("lamb", 79.5, 3.0, 1)
    assert r18.std == pytest.approx(np.std([81, 78], ddof=1))
    sgd = st.per_optimizer[0]
    assert sgd.name == "sgd" and sgd.worst_of == "vit" and sgd.mean == 81.0 and math.isnan(sgd.std)
    assert sgd.flagged == 1
    json.dumps(st.to_json())  # plain data


def test_welch_interval_matches_scipy():
    from scipy import stats
    a, b = [80.0, 82.5, 81.0], [70.0, 77.0, 72.5, 74.0]
    diff, lo, hi = bocb.welch_interval(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(np.mean(a) - np.mean(b)) and (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-4)
    assert bocb.t_quantile(0.975, 2.5) == pytest.approx(stats.t.ppf(0.975, 2.5), rel=1e-4)  # Welch df: not whole
    assert all(math.isnan(v) for v in bocb.welch_interval([1.0], [2.0, 3.0])[1:])


def test_flags_are_marked_uncertain_when_the_interval_reaches_the_threshold():
    """r18: lamb far below the cut with tight seeds (a real coupling); vit: sgd just below the cut with noisy seeds
    (its interval reaches the cut: uncertain); one seed: every flag uncertain."""
    table = {("r18", "sgd"): [80.0, 80.4, 79.8], ("r18", "adamw"): [79.0, 79.2, 78.9],
             ("r18", "lars"): [79.6, 79.9, 79.4], ("r18", "lamb"): [60.0, 60.5, 59.8],
             ("vit", "sgd"): [64.0, 72.0, 66.0], ("vit", "adamw"): [72.0, 72.2, 71.9],
             ("vit", "lars"): [71.0, 71.3, 70.8], ("vit", "lamb"): [71.5, 71.4, 71.6]}
    rows = [dict(backbone=b, optimizer=o, seed=i, score=v) for (b, o), vals in table.items()
            for i, v in enumerate(vals)]
    st = bocb.analyze_study(rows, "eq1", 3.0)
    lamb, sgd = st.cells[("r18", "lamb")], st.cells[("vit", "sgd")]
    assert lamb.flagged and not lamb.uncertain and lamb.ci_high < lamb.cut
    # vit: means 67.33, 72.03, 71.03, 71.5 -> IQR 0.94 (< 3) -> cut 71.1; sgd's interval reaches above it
    assert sgd.flagged and sgd.uncertain and sgd.ci_high >= sgd.cut
    assert not st.cells[("vit", "lars")].uncertain  # not flagged: no mark either way
    # the gap to the row's best with its Welch interval: lamb's is far from 0, the best's is 0
    assert lamb.gap == pytest.approx(np.mean(table[("r18", "sgd")]) - np.mean(table[("r18", "lamb")]))
    assert lamb.gap_low > 15 and st.cells[("r18", "sgd")].gap == 0.0
    assert (sgd.gap_low, sgd.gap_high) == pytest.approx(bocb.welch_interval(table[("vit", "adamw")],
                                                                            table[("vit", "sgd")])[1:])
    assert sgd.gap_low < 0 < sgd.gap_high  # seed noise could explain the gap
    single = bocb.analyze_study([r for r in rows if r["seed"] == 0], "eq1", 3.0)
    assert all(c.uncertain for c in single.cells.values() if c.flagged) and any(
        c.flagged for c in single.cells.values())


def test_grid_points_pick_the_best_and_record_it():
    rows = [dict(backbone="b", optimizer="o", seed=s, lr=lr, wd="0.05", score=v)
            for lr, vals in (("0.1", [50, 52]), ("0.3", [60, 58]), ("1.0", [55, 57])) for s, v in enumerate(vals)]
    c = bocb.cell_stats(rows)[("b", "o")]
    assert (c.lr, c.wd, c.mean, c.n) == ("0.3", "0.05", 59.0, 2)
    assert bocb.best_settings(rows) == {("b", "o"): ("0.3", "0.05")}


def test_hp_robustness_on_a_hand_made_table():
    best = {("r18", "sgd"): ("0.1", "1e-4"), ("r18", "adamw"): ("0.1", "0.05"), ("r18", "lamb"): ("0.1", "1e-4"),
            ("vit", "sgd"): ("0.3", "1e-4"), ("vit", "adamw"): ("1e-3", "0.05"), ("vit", "lamb"): ("1e-3", "0.05")}
    per_b = bocb.hp_robustness(best, "backbone")
    assert per_b.modes == {"r18": ("0.1", "1e-4"), "vit": ("1e-3", "0.05")}
    assert per_b.distances[("r18", "adamw")] == 2 and per_b.distances[("vit", "sgd")] == 4
    assert per_b.per_group("backbone") == {"r18": [0, 2, 0], "vit": [4, 0, 0]}
    per_o = bocb.hp_robustness(best, "optimizer")
    # sgd: lr 0.1 / 0.3 tie -> first met (0.1); adamw lr tie -> 0.1
    assert per_o.modes["sgd"] == ("0.1", "1e-4") and per_o.distances[("vit", "sgd")] == 2
    assert bocb.onehot_distance("a", "a", ["a", "b"]) == 0 and bocb.onehot_distance("a", "b") == 2
    with pytest.raises(ValueError):
        bocb.onehot_distance("a", "z", ["a", "b"])


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_hp_robustness_on_the_papers_tuned_settings():
    rows = _read(PAPER_CSV)
    best = {(r["backbone"], r["optimizer"]): (float(r["lr"]), float(r["wd"])) for r in rows}
    assert len(best) == 320
    per_o = bocb.hp_robustness(best, "optimizer")
    modes = {r["optimizer"]: r for r in _read(PAPER_MODES)}
    for opt, (lr, wd) in per_o.modes.items():  # the modes agree with the file's (ties: the file names one of them)
        assert float(modes[opt]["mode_lr"]) == lr, opt
        assert float(modes[opt]["mode_wd"]) == wd, opt
    dist = per_o.per_group("optimizer")
    # AdamW's best wd is 0.05 for all 16 backbones: only lr moves; its lr mode holds 9 of 16 -> 7 pairs at 2
    assert sorted(dist["AdamW"]) == [0] * 9 + [2] * 7
    # LAMB: lr mode 14 / 16, wd mode 9 / 16
    lamb = [(b, d) for (b, o), d in per_o.distances.items() if o == "LAMB"]
    assert sum(d for _, d in lamb) == 2 * (16 - 14) + 2 * (16 - 9)
    per_b = bocb.hp_robustness(best, "backbone")
    means = {b: float(np.mean(d)) for b, d in per_b.per_group("backbone").items()}
    print("\nmean one-hot distance to the per-backbone mode (paper A.3 reading):",
          ", ".join(f"{b} {m:.2f}" for b, m in means.items()))
    print("mean distance to the per-optimizer mode:",
          ", ".join(f"{o} {float(np.mean(d)):.2f}" for o, d in dist.items()))
    assert all(0.0 <= m <= 4.0 for m in means.values()) and len(means) == 16
    # per backbone across 20 optimizers of very different lr scales, few pairs sit at the mode
    assert sum(d == 0 for d in per_b.distances.values()) < sum(d == 0 for d in per_o.distances.values())


# --- weight diagnostics ----------------------------------------------------------------------------------------------

def _ww_details(model):
    import weightwatcher as ww
    return ww.WeightWatcher(model=model).analyze()


@pytest.mark.parametrize("name,kwargs", [("resnet18", {}),
                                         ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=3))])
@pytest.mark.slow
def test_alpha_and_matrix_entropy_match_weightwatcher(name, kwargs):
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0, **kwargs)
    ours = [r for r in spectral.model_metrics(model) if not r["skipped"]]
    details = _ww_details(model)
    assert len(ours) == len(details) > 5
    for r, (_, w) in zip(ours, details.iterrows()):
        assert r["num_evals"] == w["num_evals"]
        assert r["alpha"] == pytest.approx(w["alpha"], rel=1e-6), r["name"]
        assert r["matrix_entropy"] == pytest.approx(w["entropy"], rel=1e-6), r["name"]
        assert r["xmin"] == pytest.approx(w["xmin"], rel=1e-6)
    kinds = {r["kind"] for r in ours}
    assert kinds == ({"conv"} if name == "resnet18" else {"conv", "linear"})


def test_small_spectra_and_skip_rules_match_weightwatcher():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 4), nn.Conv2d(3, 5, 3), nn.Linear(4, 30000 // 1))
    rows = spectral.model_metrics(model)
    # Linear(12 -> 4): 4 eigenvalues < 8 -> skipped; Conv2d 3 -> 5, 3x3: 27 eigenvalues; Linear(4 -> 30000): skipped
    assert [bool(r["skipped"]) for r in rows] == [False, True, False, True]
    details = _ww_details(model)
    kept = [r for r in rows if not r["skipped"]]
    assert len(details) == len(kept)
    for r, (_, w) in zip(kept, details.iterrows()):  # 12 eigenvalues: the small-sample path
        assert r["alpha"] == pytest.approx(w["alpha"], rel=1e-6)
        assert r["matrix_entropy"] == pytest.approx(w["entropy"], rel=1e-6)


def test_a_conv_kernel_larger_than_its_channels_matches_weightwatcher():
    """3 out, 2 in, 5x5: WeightWatcher flips its 'channels first' guess back for PyTorch layers and still pools the
    25 [out, in] slices (50 eigenvalues); reading 3 x 2 = 6 kernels of 5x5 instead gave alpha 3.909 against 3.613."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 5), nn.Conv2d(3, 16, 7), nn.Conv2d(16, 4, 9))
    rows = spectral.model_metrics(model)
    details = _ww_details(model)
    kept = [r for r in rows if not r["skipped"]]
    assert len(kept) == len(details) == 3
    for r, (_, w) in zip(kept, details.iterrows()):
        assert r["num_evals"] == w["num_evals"]
        assert r["alpha"] == pytest.approx(w["alpha"], rel=1e-6), r["name"]
        assert r["matrix_entropy"] == pytest.approx(w["entropy"], rel=1e-6), r["name"]


def test_pca_energy_and_entropies_against_direct_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(40, 10)) @ np.diag(np.linspace(3, 0.1, 10))
    energy, k = spectral.pca_energy(w, frac=0.2)
    cov = np.cov(w, rowvar=False)
    ev = np.sort(np.linalg.eigvalsh(cov))[::-1]
    assert k == 2 and energy == pytest.approx(ev[:2].sum() / ev.sum(), rel=1e-9)
    values = rng.normal(size=5000)
    counts, _ = np.histogram(values, bins=30)
    p = counts[counts > 0] / counts.sum()
    assert spectral.value_entropy(values, bins=30) == pytest.approx(-(p * np.log(p)).sum())
    u = rng.uniform(size=100000)  # near-uniform over 10 bins -> entropy close to log 10
    assert spectral.value_entropy(u, bins=10) == pytest.approx(math.log(10), abs=1e-3)
    # matrix entropy: equal singular values -> 1; one dominant -> close to 0
    assert spectral.matrix_entropy(np.ones(50), 50) == pytest.approx(1.0, abs=1e-6)
    assert spectral.matrix_entropy(np.array([1.0] + [1e-12] * 49), 50) < 0.05
    # alpha of a sample from a known power law (density ~ x^-2.5 above 1) comes back near 2.5
    x = (1 - rng.uniform(size=4000)) ** (-1 / 1.5)
    assert spectral.powerlaw_alpha(x)[0] == pytest.approx(2.5, abs=0.15)


# --- sharpness, activity, stability ----------------------------------------------------------------------------------

def test_power_iteration_finds_the_top_eigenvalue_of_a_quadratic():
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    eig = torch.tensor([5.0, 2.0, 1.0, 0.5, -0.5, 0.1], dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    top, history = hessian_top_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iters=200, tol=1e-10)
    assert top == pytest.approx(5.0, rel=1e-6) and len(history) > 2
    # the raw operator form, on two parameter tensors (block-diagonal Hessian 3 and 7)
    top2, _ = power_iteration(lambda v: [3 * v[0], 7 * v[1]], [torch.zeros(2), torch.zeros(3)], iters=100, tol=1e-12)
    assert top2 == pytest.approx(7.0, rel=1e-6)


def test_activation_fractions_per_block():
    class Block(nn.Module):
        def __init__(self, bias):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU()
            with torch.no_grad():
                self.fc.weight.copy_(torch.eye(4))
                self.fc.bias.fill_(bias)

        def forward(self, x):
            return self.act(self.fc(x))

    model = nn.Module()
    model.blocks = nn.Sequential(Block(0.0), Block(-10.0))
    model.forward = lambda x: model.blocks(x)
    x = torch.tensor([[1.0, -1.0, 2.0, -2.0]])
    frac = activation_fractions(model, x)
    assert frac == {"blocks.0": 0.5, "blocks.1": 0.0}


def test_spike_and_dip_detectors():
    grad = [1.0] * 30
    grad[12] = 5.0   # 5 x the running median
    grad[20] = 2.5   # below 3 x: not a spike
    assert spikes(grad) == [12]
    assert spikes([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]) == []  # a falling series has none
    knn = [10.0, 20.0, 25.0, 22.0, 30.0, 27.5, 31.0]
    assert dips(knn, drop=2.0) == [3, 5]
    assert dips(knn, drop=3.0) == [] and dips([None, 5.0, 1.0]) == [2]


# --- the report ------------------------------------------------------------------------------------------------------

class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.tables = [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        if tag == "table":
            self.tables += 1


def test_analyze_a_csv_writes_report_html_with_every_figure(tmp_path):
    path = tmp_path / "study.csv"
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["backbone", "optimizer", "seed", "lr", "wd", "score"])
        for b, base in (("resnet18", {"sgd": 80, "lars": 79, "adamw": 77, "lamb": 60}),
                        ("vit_small", {"sgd": 50, "lars": 55, "adamw": 75, "lamb": 74})):
            for o, m in base.items():
                for lr in ("0.1", "0.3"):
                    for seed in (0, 1):
                        w.writerow([b, o, seed, lr, "0.05", m + (lr == "0.3") + rng.normal(0, 0.3)])
    out = tmp_path / "report"
    code, stdout, stderr = analyze_cli(str(path), "--out", str(out))
    assert code == 0, stderr
    assert "Study table" in stdout
    md = (out / "report.md").read_text()
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    linked = [line.split("](")[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert len(linked) == len(parser.images) >= 3
    for link, img in zip(linked, parser.images):  # each figure named in the report is embedded, and is a PNG
        assert img["data-file"] == os.path.basename(link)
        assert img["src"].startswith("data:image/png;base64,")
        import base64
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / link).is_file()
    assert parser.tables >= 5
    data = json.loads((out / "bocb.json").read_text())
    cells = {(c["backbone"], c["optimizer"]): c for c in data["study"]["cells"]}
    assert cells[("resnet18", "lamb")]["flagged"] and cells[("vit_small", "sgd")]["flagged"]
    assert not cells[("resnet18", "sgd")]["flagged"] and cells[("resnet18", "sgd")]["lr"] == "0.3"
    assert data["study"]["rule"]["rule"] == "eq1" and data["study"]["rule"]["threshold"] == 3.0
    assert "BOCB Eq. 1" in md and "Student t interval" in md
    assert "Welch t interval" in md and ("**bad**" in md or "**bad?** (uncertain)" in md)
    assert all(math.isfinite(c["cut"]) and c["gap"] >= 0 for c in data["study"]["cells"])
    assert data["families"] == {"sgd": "a", "lars": "c", "adamw": "b", "lamb": "b"}
    assert {d["distance"] for d in data["hp_robustness"]["backbone"]["distances"]} == {0}
    assert "### Sensitivity over the grid" in md and len(data["hp_sensitivity"]) == 8
    assert all(s["span"] == pytest.approx(3.0) and 0.0 < s["spread"] < 3.0 for s in data["hp_sensitivity"])


def test_analyze_refuses_bad_input_with_one_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("model,score\nr18,1\n")
    for args, message in (([str(bad)], "needs the columns backbone and optimizer"),
                          ([str(tmp_path / "nope")], "does not exist"),
                          ([str(tmp_path)], "has no results.csv")):
        code, _, stderr = analyze_cli(*args)
        assert code == 2 and message in stderr and stderr.count("\n") == 1, stderr


def test_sharpness_of_a_real_vit_run_is_reproducible(tmp_path):
    from conftest import TINY
    from ssl_bocb import config
    from ssl_bocb.analysis.sharpness import run_sharpness
    from ssl_bocb.tasks.pretrain import pretrain
    out = pretrain(config.load(config.PretrainConfig, [], TINY + [
        f"output_dir={tmp_path / 'vit'}", "model.backbone=vit_tiny_patch16_224",
        "model.backbone_kwargs={img_size: 32, patch_size: 8, depth: 2}", "train.epochs=1", "train.stop_at_step=2",
        "train.save_every_steps=2"]))
    a = run_sharpness(out, batch=8, iters=4, seed=0)
    b = run_sharpness(out, batch=8, iters=4, seed=0)
    assert math.isfinite(a["hessian_top_eig"]) and a["hessian_top_eig"] != 0
    assert a["hessian_history"] == b["hessian_history"]            # fixed batch, augmentations and start vector
    assert list(a["activation"]) == ["blocks.0", "blocks.1"] and 0 < a["activation_mean"] < 1


def test_report_shows_each_runs_instability_from_its_summary_json(tmp_path):
    path = tmp_path / "study.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["backbone", "optimizer", "seed", "score", "folder"])
        for i, (b, o, spikes_, nan, rb) in enumerate([("vit", "lamb", 5, 7, 1), ("vit", "lamb", 3, 0, 0),
                                                       ("vit", "adamw", 0, 0, 0), ("r18", "lamb", 1, 0, 0)]):
            run_dir = tmp_path / f"run{i}"
            run_dir.mkdir()
            (run_dir / "summary.json").write_text(json.dumps({
                "status": "finished", "step": 100, "events": {
                    "grad_spikes": spikes_, "loss_spikes": 0, "knn_dips": None, "nonfinite_steps": nan,
                    "overflow_skips": 0, "rollbacks": rb},
                "first_layer_counts": {"first_layer": spikes_} if spikes_ else {}}))
            w.writerow([b, o, i, 50 + i, str(run_dir)])
    out = tmp_path / "report"
    code, _, stderr = analyze_cli(str(path), "--out", str(out), "--no-weights")
    assert code == 0, stderr
    md = (out / "report.md").read_text()
    assert "| run0 | summary.json | 100 | 5 | 0 | - | 7 | 1 | first_layer x5 |" in md
    assert "| vit | lamb | 4.00 | - | 3.50 | 0.50 |" in md  # the pair's mean over its two runs
    data = json.loads((out / "bocb.json").read_text())
    assert data["stability"]["run1"]["first_layers"] == {"first_layer": 3}


def test_a_committed_sweep_table_without_its_run_folders_keeps_its_stability_counts(tmp_path):
    """A study's table read on another machine: the run folders are not there, so the stability section takes each
    cell's counts from the table (source results.csv), and a cell whose table has no counts is left out of it."""
    header = ["cell", "hash", "optimizer", "seed", "timm_model", "optim_name", "state", "knn_top1", "images_per_s",
              "grad_spikes", "knn_dips", "nonfinite_steps", "rollbacks", "folder"]
    rows = [["sgd__s0", "a1", "sgd", 0, "resnet18", "sgd", "done", 30.0, 100.0, 2, "", 1, 0, "/nowhere/a"],
            ["sgd__s1", "a2", "sgd", 1, "resnet18", "sgd", "done", 31.0, 110.0, 0, "", 0, 0, "/nowhere/b"],
            ["lars__s0", "b1", "lars", 0, "resnet18", "lars", "done", 35.0, 90.0, "", "", "", "", "/nowhere/c"]]
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    from ssl_bocb.analysis.report import analyze
    paths = analyze(str(path), str(tmp_path / "report"), progress=False)
    data = json.load(open(paths["json"]))
    assert set(data["stability"]) == {"sgd__s0", "sgd__s1"}
    assert data["stability"]["sgd__s0"] == dict(source="results.csv", logged_steps=None, loss_spikes=None, dips=None,
                                                 grad_spikes=2, knn_dips=None, nonfinite_steps=1, rollbacks=0)
    md = open(paths["md"]).read()
    assert "| sgd__s0 | results.csv |" in md and "## Cost" in md
    assert "| resnet18 | sgd | 1.00 | - | 0.50 | 0.00 |" in md  # the pair's means over the table's counts


def test_hp_sensitivity_gives_each_pairs_scores_over_its_grid_and_their_spread():
    rows = [dict(backbone="vit", optimizer="adamw", lr=lr, wd="0.05", seed=s, score=v)
            for lr, vals in (("0.00015", (34.0, 36.0)), ("5e-05", (33.0,)), ("0.00045", (34.5,))) for s, v in
            enumerate(vals)]
    rows += [dict(backbone="vit", optimizer="lamb", lr=lr, wd="0.05", seed=0, score=v)
             for lr, v in (("0.0015", 34.0), ("0.0045", 28.0), ("0.0005", 33.0))]
    rows += [dict(backbone="vit", optimizer="sgd", lr="0.03", wd="", seed=0, score=35.0)]  # one point: no entry
    sens = bocb.hp_sensitivity(rows)
    assert list(sens) == [("vit", "adamw"), ("vit", "lamb")]
    adamw, lamb = sens[("vit", "adamw")], sens[("vit", "lamb")]
    assert [p[0] for p in adamw.points] == ["5e-05", "0.00015", "0.00045"]  # sorted by the lr's value
    assert adamw.points[1] == ("0.00015", "0.05", 35.0, 2)
    assert adamw.spread == pytest.approx(2.0) and lamb.spread == pytest.approx(6.0)
    assert adamw.span == pytest.approx(9.0) and lamb.span == pytest.approx(9.0)


def test_report_html_comes_from_the_template_with_text_escaped(tmp_path):
    from ssl_bocb.analysis.document import Doc
    fig = tmp_path / "f.png"
    fig.write_bytes(b"\x89PNG fake")
    doc = Doc()
    doc.h(2, "a <b> & 'c'")
    doc.p("**bold** and `x<y`")
    doc.table(["pair", "top-1"], [["vit / sgd", 40.123], ["r18 | lars", None]])
    doc.img(str(fig), "caption 'q'")
    page = doc.html("title <t>")
    assert page.startswith("<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>title &lt;t&gt;</title>")
    assert "<h2>a &lt;b&gt; &amp; &#x27;c&#x27;</h2>" in page
    assert "<p><b>bold</b> and <code>x&lt;y</code></p>" in page
    assert "<tr><td>vit / sgd</td><td>40.12</td></tr><tr><td>r18 / lars</td><td>-</td></tr>" in page
    assert "data-file='f.png' src='data:image/png;base64,iVBORyBmYWtl'" in page
    assert page.endswith("</figure>\n</body></html>\n")
