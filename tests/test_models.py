import json
import math

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from ssl_bocb import config
from ssl_bocb.errors import UserError
from ssl_bocb.losses import symmetric_loss
from ssl_bocb.models import build_mlp, build_moco, create_backbone, export_backbone, load_backbone, sincos_2d_pos_embed
from ssl_bocb.optim import optimizer_from_cfg

VIT = ["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs={img_size: 32, patch_size: 8}",
       "model.hidden_dim=64", "model.out_dim=32"]


def cfg_of(*overrides):
    return config.load(config.PretrainConfig, [], list(overrides))


def test_sincos_values():
    emb = sincos_2d_pos_embed(2, 3, 8, num_prefix=1)
    assert emb.shape == (1, 7, 8)
    assert torch.all(emb[0, 0] == 0)  # class-token slot
    # token (h=1, w=2) -> index 1 + 1*3 + 2; quarter dim 2, omega = [1, 1/100]
    t = emb[0, 1 + 3 + 2]
    omega = torch.tensor([1.0, 1.0 / 100.0])
    expected = torch.cat([torch.sin(2 * omega), torch.cos(2 * omega), torch.sin(1 * omega), torch.cos(1 * omega)])
    assert torch.allclose(t, expected, atol=1e-6)


def test_vit_gets_fixed_sincos_and_moco_init():
    m = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8)
    assert not m.pos_embed.requires_grad
    assert torch.allclose(m.pos_embed, sincos_2d_pos_embed(4, 4, 192, 1))
    assert m.cls_token.abs().max() < 1e-4
    qkv = m.blocks[0].attn.qkv.weight
    bound = math.sqrt(6.0 / (192 + 192))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.all(m.blocks[0].attn.qkv.bias == 0)


def test_frozen_patch_projection_unchanged_and_not_in_optimizer():
    cfg = cfg_of(*VIT, "model.frozen_patch_embed=true", "optim.name=adamw", "optim.base_lr=0.01")
    model = build_moco(cfg.model)
    opt = optimizer_from_cfg(model, cfg.optim, 0.01)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    proj = model.backbone.patch_embed.proj
    assert id(proj.weight) not in in_opt and id(proj.bias) not in in_opt
    before = proj.weight.detach().clone()
    other = model.backbone.blocks[0].mlp.fc1.weight.detach().clone()
    for _ in range(3):
        x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
        model.update_momentum(0.9)
        q1, q2, _, _ = model(x1, x2)
        loss = symmetric_loss(q1, q2, model.forward_momentum(x1), model.forward_momentum(x2), 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(proj.weight, before)
    assert not torch.equal(model.backbone.blocks[0].mlp.fc1.weight, other)


def test_head_structure_per_bn_flags():
    mlp = build_mlp(3, 10, 20, 5, last_bn=True, hidden_bn=True)
    kinds = [type(m).__name__ for m in mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not mlp[-1].affine and mlp[1].affine
    assert all(m.bias is None for m in mlp if isinstance(m, nn.Linear))
    mlp = build_mlp(2, 10, 20, 5, last_bn=False, hidden_bn=False)
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear"]


def test_head_defaults_per_family():
    r = build_moco(cfg_of("model.hidden_dim=64", "model.out_dim=32").model)
    assert sum(isinstance(m, nn.Linear) for m in r.projector) == 2
    assert isinstance(r.projector[-1], nn.BatchNorm1d) and not isinstance(r.predictor[-1], nn.BatchNorm1d)
    v = build_moco(cfg_of(*VIT).model)
    assert sum(isinstance(m, nn.Linear) for m in v.projector) == 3
    assert isinstance(v.predictor[-1], nn.BatchNorm1d)
    none = build_moco(cfg_of("model.hidden_dim=64", "model.out_dim=32", "model.pred_layers=0").model)
    assert isinstance(none.predictor, nn.Identity)


def test_momentum_update_endpoints():
    model = build_moco(cfg_of("model.hidden_dim=64", "model.out_dim=32").model)
    with torch.no_grad():
        for p in model.base_parameters():
            p.add_(1.0)
    k_before = [p.clone() for p in model.momentum_parameters()]
    model.update_momentum(1.0)
    assert all(torch.equal(a, b) for a, b in zip(model.momentum_parameters(), k_before))
    model.update_momentum(0.5)
    for k, k0, q in zip(model.momentum_parameters(), k_before, model.base_parameters()):
        assert torch.allclose(k, 0.5 * k0 + 0.5 * q)
    model.update_momentum(0.0)
    assert all(torch.equal(k, q) for k, q in zip(model.momentum_parameters(), model.base_parameters()))
    assert all(not p.requires_grad for p in model.momentum_parameters())


def test_resnet_zero_init_and_cifar_stem():
    m = create_backbone("resnet18", cifar_stem=True)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    assert torch.all(m.layer1[0].bn2.weight == 0)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_unknown_backbone_suggests_names():
    with pytest.raises(UserError, match="did you mean.*resnet18"):
        create_backbone("resnet18x")


@pytest.mark.parametrize("name,kwargs", [("resnet18", {}),
                                         ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8})])
def test_exported_backbone_loads_into_timm(tmp_path, name, kwargs):
    m = create_backbone(name, **kwargs)
    export_backbone(m, str(tmp_path))
    spec = json.load(open(tmp_path / "backbone.json"))
    fresh = timm.create_model(spec["timm_name"], num_classes=0, **spec["timm_kwargs"])
    fresh.load_state_dict(safetensors.torch.load_file(str(tmp_path / "backbone.safetensors")))  # strict
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    fresh.eval()
    assert torch.allclose(m(x), fresh(x), atol=1e-5)
    again = load_backbone(str(tmp_path)).eval()
    assert torch.allclose(m(x), again(x), atol=1e-5)
