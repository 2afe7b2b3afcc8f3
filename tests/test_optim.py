import math

import pytest
import torch
from torch import nn

from ssl_bocb import config
from ssl_bocb.errors import UserError
from ssl_bocb.optim import create_optimizer, param_groups, schedules, valid_names


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.norm = nn.LayerNorm(4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))

    def forward(self, x):
        return self.norm(self.fc(x)) + self.pos_embed[0, 0]


@pytest.mark.parametrize("name,lr", [("adamw", 1e-2), ("lamb", 1e-2), ("sgd", 0.1), ("lars", 0.1), ("lion", 1e-2),
                                     ("adan", 1e-2), ("nadam", 1e-2)])
def test_each_optimizer_lowers_a_simple_loss(name, lr):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1)
    opt = create_optimizer(model, name, lr, 1e-4, trust_coefficient=0.1)
    first = nn.functional.mse_loss(model(x), y).item()
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_exclude_norm_bias_groups():
    groups = param_groups(Tiny(), 0.05, "exclude_norm_bias")
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 8])]
    assert len(no_decay["params"]) == 4  # fc bias, norm weight + bias, pos_embed
    assert decay["always_adapt"] and not no_decay["always_adapt"]
    (only,) = param_groups(Tiny(), 0.05, "decay_all")
    assert len(only["params"]) == 5 and only["weight_decay"] == 0.05


def test_lars_trust_ratio_only_on_decayed_weights():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    gw, gb = torch.randn(3, 4), torch.randn(3)
    lr, wd, eta = 0.5, 0.01, 0.001
    opt = create_optimizer(model, "lars", lr, wd, momentum=0.0, trust_coefficient=eta)
    model.weight.grad, model.bias.grad = gw.clone(), gb.clone()
    opt.step()
    d = gw + wd * w0
    ratio = eta * w0.norm() / d.norm()
    assert torch.allclose(model.weight, w0 - lr * ratio * d, atol=1e-7)
    assert torch.allclose(model.bias, b0 - lr * gb, atol=1e-7)  # no decay, no trust ratio


def test_lamb_trust_ratio_excluded_for_bias():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    b0 = model.bias.detach().clone()
    opt = create_optimizer(model, "lamb", 0.1, 0.01)
    model.weight.grad, model.bias.grad = torch.randn(3, 4), torch.randn(3)
    gb = model.bias.grad.clone()
    opt.step()
    # first Adam step with bias correction: update = g / (|g| + eps) = sign(g); no trust ratio on the bias
    assert torch.allclose(model.bias, b0 - 0.1 * torch.sign(gb), atol=1e-4)


def test_unknown_optimizer_lists_valid_ones():
    with pytest.raises(UserError, match="valid: adamw, lamb, lars, sgd"):
        create_optimizer(nn.Linear(2, 2), "adamx", 0.1, 0.0)
    assert {"adamw", "lamb", "lars", "sgd", "lion", "adan"} <= set(valid_names())


def test_lr_scaling_rules():
    assert config.scaled_lr(0.3, 512, "linear") == pytest.approx(0.6)
    assert config.scaled_lr(0.3, 1024, "sqrt") == pytest.approx(0.6)
    assert config.scaled_lr(0.3, 1024, "none") == pytest.approx(0.3)


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
