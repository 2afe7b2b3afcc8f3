import io
import logging
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ssl_bocb import config
from ssl_bocb.engine import make_accelerator
from ssl_bocb.engine.step import StepSettings, compute_gradients
from ssl_bocb.optim.schedules import scaled_lr
from ssl_bocb.errors import UserError
from ssl_bocb.optim import (TABLE, clip_gradients, create_optimizer, param_groups, record, resolve, sam_perturb,
                            schedules, valid_names)

BOCB_20 = ["sgd", "sgdp", "lion", "adam", "adamax", "adamw", "adamp", "lamb", "nadam", "radam", "adan", "adabelief",
           "adabound", "adafactor", "lars", "novograd", "sophia", "adagrad", "adadelta", "rmsprop"]


def cpu_accelerator(seed=0):
    return make_accelerator(SimpleNamespace(mixed_precision="no", cpu=True), seed=seed)


def regression(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    x = torch.randn(128, 8)
    return model, x, 0.3 * x @ torch.randn(8, 1)


def fit(model, opt, x, y, steps, hessian=False):
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # create_graph's reference-cycle note; grads are reset every step
            loss.backward(create_graph=hessian)
        opt.step()
    return loss.item()


def test_table_holds_the_20_bocb_optimizers_by_family_and_the_newer_ones():
    assert set(BOCB_20) <= set(TABLE)
    assert {"muon", "adopt", "mars", "laprop", "kron"} <= set(TABLE)
    families = {n: TABLE[n].family for n in BOCB_20}
    assert [n for n in BOCB_20 if families[n] == "a"] == ["sgd", "sgdp", "lion"]
    assert [n for n in BOCB_20 if families[n] == "d"] == ["adagrad", "adadelta", "rmsprop"]
    assert sum(f == "b" for f in families.values()) == 8 and sum(f == "c" for f in families.values()) == 6
    for e in TABLE.values():
        assert e.base_lr > 0 and e.weight_decay >= 0 and e.defaults_from and e.source.count(".") >= 1
    assert [n for n, e in TABLE.items() if e.trust_ratio] == ["lamb", "lars"]
    assert TABLE["adam"].weight_decay_kind == "L2" and TABLE["adamw"].weight_decay_kind == "decoupled"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TABLE))
def test_every_entry_lowers_a_simple_loss(name):
    model, x, y = regression()
    first = nn.functional.mse_loss(model(x), y).item()
    opt = create_optimizer(model, name, min(TABLE[name].base_lr * 30, 0.05))
    last = fit(model, opt, x, y, 100, TABLE[name].hessian)
    assert math.isfinite(last) and last < 0.8 * first


@pytest.mark.parametrize("name", list(TABLE))
def test_every_entry_resumes_exactly_from_a_saved_state(name):
    lr = min(TABLE[name].base_lr * 30, 0.05)
    hessian = TABLE[name].hessian
    model, x, y = regression()
    opt = create_optimizer(model, name, lr)
    fit(model, opt, x, y, 6, hessian)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    torch.manual_seed(1)  # Sophia's Hutchinson probes draw from the global RNG (checkpointed by Accelerate)
    fit(model, opt, x, y, 6, hessian)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # what a checkpoint may hold: tensors and plain containers only
    model2, _, _ = regression(seed=5)
    model2.load_state_dict(state["model"])
    opt2 = create_optimizer(model2, name, lr)
    opt2.load_state_dict(state["opt"])
    torch.manual_seed(1)
    fit(model2, opt2, x, y, 6, hessian)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, tuple):
        return tuple(round(v * 0.9, 6) for v in value)
    return value * 0.5 if value else 0.5


@pytest.mark.parametrize("name", list(TABLE))
def test_every_option_reaches_every_entry(name):
    e = TABLE[name]
    given = {k: _other(v) for k, v in e.options.items()}
    cfg = config.load(config.PretrainConfig, [], [f"optim.name={name}", "optim.base_lr=0.01", "optim.weight_decay=0.02"]
                      + [f"optim.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in given.items()])
    resolved = resolve(cfg.optim)
    opt = create_optimizer(nn.Linear(4, 3), name, 0.01, 0.02, **given)
    for key, value in given.items():
        got = opt.param_groups[0][e.kwarg(key)]
        assert (tuple(got) if isinstance(got, (list, tuple)) else got) == value, key
    rec = record(opt, resolved, 0.01)
    assert rec["options"] == {e.kwarg(k): list(v) if isinstance(v, tuple) else v for k, v in given.items()} | \
        {k: v for k, v in rec["options"].items() if k in e.fixed}
    assert opt.param_groups[0]["lr"] == 0.01 and rec["weight_decay"] == 0.02 and rec["ignored"] == {}


def test_betas_and_eps_reach_nadam_through_the_config(caplog):
    cfg = config.load(config.PretrainConfig, [], ["optim.name=nadam", "optim.betas=[0.5,0.6]", "optim.eps=1e-3"])
    resolved = resolve(cfg.optim)
    opt = create_optimizer(nn.Linear(4, 3), "nadam", resolved.base_lr, betas=(0.5, 0.6), eps=1e-3)
    assert opt.defaults["betas"] == (0.5, 0.6) and opt.defaults["eps"] == 1e-3
    assert record(opt, resolved, 1.0)["options"] == {"betas": [0.5, 0.6], "eps": 1e-3}


def test_an_option_the_optimizer_does_not_take_is_warned_and_recorded(caplog):
    cfg = config.load(config.PretrainConfig, [], ["optim.name=sgd", "optim.betas=[0.5,0.6]", "optim.trust_clip=true"])
    with caplog.at_level(logging.WARNING):
        resolved = resolve(cfg.optim)
    assert resolved.ignored == {"betas": [0.5, 0.6], "trust_clip": True}
    assert "optim.betas=[0.5, 0.6] is not an option of sgd (torch.optim.SGD); ignored" in caplog.text


def test_precedence_explicit_over_per_optimizer_over_table():
    per = ["optim.per_optimizer={lars: {base_lr: 0.5, trust_coefficient: 0.001}, adamw: {weight_decay: 0.05}}"]
    r = resolve(config.load(config.PretrainConfig, [], ["optim.name=lars"] + per).optim)
    assert (r.base_lr, r.options["trust_coefficient"], r.weight_decay) == (0.5, 0.001, 1e-6)
    assert r.sources["base_lr"] == "per_optimizer" and r.sources["weight_decay"] == "table"
    r = resolve(config.load(config.PretrainConfig, [], ["optim.name=lars", "optim.base_lr=0.2"] + per).optim)
    assert r.base_lr == 0.2 and r.sources["base_lr"] == "explicit"
    r = resolve(config.load(config.PretrainConfig, [], ["optim.name=adamw"] + per).optim)
    assert (r.base_lr, r.weight_decay) == (1.5e-4, 0.05)


def test_bad_optimizer_settings_fail_in_one_line():
    with pytest.raises(UserError, match="did you mean"):
        config.load(config.PretrainConfig, [], ["optim.name=adamx"])
    with pytest.raises(UserError, match="adan takes 3 betas"):
        config.load(config.PretrainConfig, [], ["optim.name=adan", "optim.betas=[0.9,0.99]"])
    with pytest.raises(UserError, match="unknown key 'optim.per_optimizer.lars.base_rl'; did you mean 'base_lr'"):
        config.load(config.PretrainConfig, [], ["optim.per_optimizer={lars: {base_rl: 0.1}}"])
    with pytest.raises(UserError, match="no default base_lr in the optimizer table; set optim.base_lr"):
        config.load(config.PretrainConfig, [], ["optim.name=madgrad"])
    with pytest.raises(UserError, match="do not fit"):
        create_optimizer(nn.Linear(2, 2), "adamw", 0.1, kwargs={"momentum": 0.9})
    assert {"adamw", "lamb", "lars", "sgd", "lion", "adan", "madgrad"} <= set(valid_names())


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4) * 1e-6)
        self.pos_embed = nn.Parameter(torch.randn(1, 3, 4))
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


def _flags(model, decay_policy, trust_policy):
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in param_groups(model, 0.1, decay_policy, trust_policy):
        for p in g["params"]:
            out[names[id(p)]] = (g["weight_decay"] > 0, g["trust_ratio"])
    return out


def test_decay_and_trust_policies_are_independent():
    m = TinyViT()
    f = _flags(m, "exclude_1d_tokens", "exclude_1d")
    assert f == {"cls_token": (False, True), "pos_embed": (False, True), "fc.weight": (True, True),
                 "fc.bias": (False, False), "norm.weight": (False, False), "norm.bias": (False, False)}
    f = _flags(m, "exclude_1d", "exclude_1d")
    assert f["cls_token"] == (True, True) and f["fc.bias"] == (False, False)
    f = _flags(m, "all", "exclude_1d")   # reference AdamW decay with SPEC's LARS trust exclusion
    assert f["fc.bias"] == (True, False) and f["norm.weight"] == (True, False) and f["fc.weight"] == (True, True)
    f = _flags(m, "exclude_1d", "all")
    assert f["fc.bias"] == (False, True)
    with pytest.raises(ValueError, match="weight-decay policy"):
        param_groups(m, 0.1, "decay_all")


def test_lars_update_equals_spec_formula():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    lr, wd, eta, mom = 0.5, 0.01, 0.02, 0.9
    opt = create_optimizer(model, "lars", lr, wd, decay_policy="all", trust_policy="exclude_1d", momentum=mom,
                           trust_coefficient=eta, trust_clip=False)
    bufs = {"w": torch.zeros(3, 4), "b": torch.zeros(3)}
    for _ in range(2):
        w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
        gw, gb = torch.randn(3, 4), torch.randn(3)
        model.weight.grad, model.bias.grad = gw.clone(), gb.clone()
        opt.step()
        u = gw + wd * w0                                    # SPEC: trust ratio eta * ||p|| / ||g + wd * p||
        bufs["w"] = mom * bufs["w"] + eta * w0.norm() / u.norm() * u
        bufs["b"] = mom * bufs["b"] + (gb + wd * b0)          # ndim 1: decayed here (policy all), no trust ratio
        assert torch.allclose(w0 - model.weight.detach(), lr * bufs["w"], rtol=1e-5, atol=1e-8)
        assert torch.allclose(b0 - model.bias.detach(), lr * bufs["b"], rtol=1e-5, atol=1e-8)


def test_lars_trust_clip_caps_the_local_lr():
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False).double()   # float64: the tiny update must not drown in rounding
    w0 = model.weight.detach().clone()
    g = torch.randn(3, 4, dtype=torch.float64) * 1e-4   # tiny gradient: eta * ||p|| / ||g|| >> 1, so LARC clips it to lr / lr = 1
    opt = create_optimizer(model, "lars", 0.1, 0.0, momentum=0.0, trust_coefficient=0.02, trust_clip=True)
    model.weight.grad = g.clone()
    opt.step()
    assert torch.allclose(w0 - model.weight.detach(), 0.1 * g, rtol=1e-5)


def test_lamb_trust_ratio_per_group_flag():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    b0, w0 = model.bias.detach().clone(), model.weight.detach().clone()
    opt = create_optimizer(model, "lamb", 0.1, 0.0)
    model.weight.grad, model.bias.grad = torch.randn(3, 4), torch.randn(3)
    gb, gw = model.bias.grad.clone(), model.weight.grad.clone()
    opt.step()
    # first Adam step with bias correction: update = g / (|g| + eps) ~ sign(g)
    assert torch.allclose(model.bias, b0 - 0.1 * torch.sign(gb), atol=1e-4)          # no trust ratio (ndim 1)
    u = torch.sign(gw)
    assert torch.allclose(model.weight, w0 - 0.1 * w0.norm() / u.norm() * u, atol=1e-4)  # ||p|| / ||u||


def quadratic():
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    return model, (lambda: ((model(x) - y) ** 2).mean())


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_equals_hand_computed_two_pass_step(adaptive):
    model, loss_fn = quadratic()
    w0 = model.weight.detach().clone()
    rho, lr = 0.1, 0.05

    def grad_at(w):
        with torch.no_grad():
            model.weight.copy_(w)
        model.weight.grad = None
        loss_fn().backward()
        return model.weight.grad.clone()
    g0 = grad_at(w0)
    e = rho * w0 ** 2 * g0 / (w0.abs() * g0).norm() if adaptive else rho * g0 / g0.norm()
    g1 = grad_at(w0 + e)
    expected = w0 - lr * g1
    with torch.no_grad():
        model.weight.copy_(w0)
        loss_w0 = loss_fn().item()
    opt = create_optimizer(model, "sgd", lr, 0.0, momentum=0.0)
    settings = StepSettings(sam_rho=rho, sam_adaptive=adaptive)
    loss, grad_norm = compute_gradients(model, opt, cpu_accelerator(), [model.weight], loss_fn, settings)
    opt.step()
    assert torch.allclose(model.weight.detach(), expected, atol=1e-7)
    assert not torch.allclose(expected, w0 - lr * g0, atol=1e-5)   # the second pass made a difference
    assert loss.item() == pytest.approx(loss_w0) and grad_norm.item() == pytest.approx(g1.norm().item(), rel=1e-5)


def test_sam_keeps_bn_statistics_of_one_forward_and_restores_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    x = torch.randn(8, 3)
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ref.load_state_dict(model.state_dict())
    ref(x)                                             # one forward at w0: the statistics SAM must end with
    opt = create_optimizer(model, "sgd", 0.1, 0.0, momentum=0.0)
    opt.step = lambda: None   # no update: after SAM's two passes the weights must be back exactly at w0
    w = [p.detach().clone() for p in model.parameters()]
    compute_gradients(model, opt, cpu_accelerator(), list(model.parameters()), lambda: model(x).pow(2).mean(),
                      StepSettings(sam_rho=0.5))
    opt.step()
    assert torch.allclose(model[1].running_mean, ref[1].running_mean)
    assert torch.allclose(model[1].running_var, ref[1].running_var)
    assert all(torch.equal(a, b) for a, b in zip(w, model.parameters()))
    model[0].weight.grad = torch.full_like(model[0].weight, float("nan"))  # overflowed fp16 gradient
    saved = sam_perturb([model[0].weight, model[1].weight], 0.1)  # decided on the device: nothing moves
    assert torch.equal(model[0].weight, w[0]) and torch.equal(saved[0], w[0])


def test_agc_clips_exactly_the_units_over_the_ratio():
    lin = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0], [1e-5, 0, 0]]))
    lam = 0.1
    g = torch.tensor([[0.5, 0, 0], [0, 0.1, 0], [0, 0.2, 0.4], [0, 1e-5, 0]])
    lin.weight.grad = g.clone()   # ||g|| / ||w|| per row: 0.5 (clip), 0.05, 0.149 (clip), 1e-5 / max(1e-5, 1e-3)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    norm = clip_gradients(cpu_accelerator(), opt, [lin.weight], "agc", lam)
    out = lin.weight.grad
    assert norm.item() == pytest.approx(g.norm().item())
    assert torch.equal(out[1], g[1]) and torch.equal(out[3], g[3])          # under the ratio: untouched
    for row, w_norm in ((0, 1.0), (2, 3.0)):
        assert out[row].norm().item() == pytest.approx(lam * w_norm, rel=1e-5)  # clipped to lambda * ||w||
        assert torch.allclose(out[row] / out[row].norm(), g[row] / g[row].norm())
    lin.weight.grad = g.clone()
    clip_gradients(cpu_accelerator(), opt, [lin.weight], "norm", 0.1)
    assert lin.weight.grad.norm().item() == pytest.approx(0.1, rel=1e-5)


def orders(seed, epochs=6):
    acc = cpu_accelerator(seed)
    loader = acc.prepare(torch.utils.data.DataLoader(list(range(64)), batch_size=8, shuffle=True,
                                                     generator=torch.Generator().manual_seed(seed)))
    out = []
    for e in range(epochs):
        loader.set_epoch(e)
        out.append(torch.cat(list(loader)).tolist())
    return out


def test_two_seeds_give_different_data_orders_at_every_epoch():
    a, b = orders(0), orders(1)
    assert orders(0) == a                                   # reproducible
    assert all(x != y for x, y in zip(a, b))                # different at every epoch
    assert all(b[e] != a[e + 1] for e in range(len(a) - 1))  # seed 1 is not seed 0 shifted by one epoch
    assert all(sorted(x) == list(range(64)) for x in a + b)


def test_schedule_end_points():
    assert schedules.warmup_cosine(0, 100, 10, 1.0) == 0.0
    assert schedules.warmup_cosine(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert schedules.warmup_cosine(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert schedules.warmup_cosine(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert schedules.warmup_cosine(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert schedules.momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert schedules.momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert schedules.momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert schedules.momentum(70, 100, 0.99, "constant") == 0.99
    m_t = 1 - 0.5 * (1 + math.cos(math.pi * 30 / 100)) * (1 - 0.99)
    assert schedules.momentum(30, 100, 0.99) == pytest.approx(m_t)


def test_lr_scaling_rules():
    assert scaled_lr(0.3, 512, "linear") == pytest.approx(0.6)
    assert scaled_lr(0.3, 1024, "sqrt") == pytest.approx(0.6)
    assert scaled_lr(0.3, 1024, "none") == pytest.approx(0.3)


def test_a_bf16_optimizer_on_a_cpu_without_native_bf16_is_warned(caplog, monkeypatch):
    from ssl_bocb.optim import registry
    monkeypatch.setattr(registry, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        create_optimizer(nn.Linear(4, 3), "muon", 1e-3)
        create_optimizer(nn.Linear(4, 3), "adamw", 1e-3)
    assert caplog.text.count("which this CPU emulates") == 1 and "muon computes in bf16" in caplog.text
    caplog.clear()
    monkeypatch.setattr(registry, "cpu_has_native_bf16", lambda: True)
    with caplog.at_level(logging.WARNING):
        create_optimizer(nn.Linear(4, 3), "muon", 1e-3)
    assert "emulates" not in caplog.text
