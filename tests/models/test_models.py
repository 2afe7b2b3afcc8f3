import copy
import glob
import json
import os
import math

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from conftest import REPO
from ssl_bocb import config
from ssl_bocb.errors import UserError
from ssl_bocb.losses import contrastive_loss
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
        loss = (contrastive_loss(q1, model.forward_momentum(x2), 0.2)
                + contrastive_loss(q2, model.forward_momentum(x1), 0.2))
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


# --- MoCo v3 ablation flags ------------------------------------------------------------------------------------------

VIT32 = ["model.backbone=vit_tiny_patch16_224", "model.backbone_kwargs.img_size=32",
         "model.backbone_kwargs.patch_size=8", "model.backbone_kwargs.depth=2", "model.hidden_dim=64",
         "model.out_dim=32"]


def test_momentum_zero_has_no_momentum_encoder_and_keys_are_stopped_projector_outputs():
    from ssl_bocb.tasks.pretrain import moco_loss_fn

    cfg = cfg_of(*VIT32, "moco.momentum=0")
    model = build_moco(cfg.model, momentum_encoder=cfg.moco.momentum > 0)
    assert not model.has_momentum_encoder and model.momentum_parameters() == []
    assert not any(k.startswith("momentum_") for k in model.state_dict())
    model.update_momentum(0.0)  # a no-op, not an error

    class Acc:  # the two accelerator methods the loss closure uses
        autocast = staticmethod(__import__("contextlib").nullcontext)

    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    loss = moco_loss_fn(model, model, Acc(), x1, x2, 0.2)()
    loss.backward()
    # the same loss with the keys computed again from projector outputs, detached, gives the same value
    torch.manual_seed(0)
    q1, q2, z1, z2 = model(x1, x2)
    from ssl_bocb.losses import contrastive_loss
    again = contrastive_loss(q1, z2.detach(), 0.2) + contrastive_loss(q2, z1.detach(), 0.2)
    assert torch.allclose(loss, again, atol=1e-6)
    full = build_moco(cfg_of(*VIT32).model)
    assert full.has_momentum_encoder and len(full.momentum_parameters()) == len(full.base_parameters())


def test_global_average_pooling_drops_class_token_and_final_norm():
    gap = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, pool="avg")
    tok = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    assert gap.cls_token is None and gap.num_prefix_tokens == 0
    assert isinstance(gap.norm, torch.nn.Identity) and isinstance(gap.fc_norm, torch.nn.Identity)
    assert tok.cls_token is not None and isinstance(tok.norm, torch.nn.LayerNorm)
    assert gap.pos_embed.shape == (1, 16, 192) and not gap.pos_embed.requires_grad  # sin-cos, no prefix slot
    x = torch.randn(2, 3, 32, 32)
    tokens = gap.forward_features(x)
    assert torch.allclose(gap(x), tokens.mean(1), atol=1e-5)  # the output is the plain mean of patch tokens


def test_batchnorm_replaces_layernorm_only_before_the_mlp():
    from ssl_bocb.models.backbones import TokenBatchNorm
    m = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3, mlp_norm="batchnorm")
    for block in m.blocks:
        assert isinstance(block.norm2, TokenBatchNorm) and isinstance(block.norm1, torch.nn.LayerNorm)
    assert isinstance(m.norm, torch.nn.LayerNorm)
    assert not any(isinstance(x, torch.nn.BatchNorm1d) for x in m.blocks[0].attn.modules())
    bn = TokenBatchNorm(6).train()
    y = bn(torch.randn(4, 5, 6) * 3 + 2)
    assert torch.allclose(y.mean((0, 1)), torch.zeros(6), atol=1e-5)  # per channel over batch x tokens
    assert torch.allclose(y.var((0, 1), unbiased=False), torch.ones(6), atol=1e-3)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)
    assert isinstance(synced.blocks[0].norm2.bn, torch.nn.SyncBatchNorm)


def test_patch_projection_norms_and_their_export(tmp_path):
    from ssl_bocb.models.backbones import TokenBatchNorm
    bn = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, patch_norm="batchnorm")
    assert isinstance(bn.patch_embed.norm, TokenBatchNorm)
    wn = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, patch_norm="weightnorm",
                         mlp_norm="batchnorm", pool="avg")
    names = [n for n, _ in wn.named_parameters() if n.startswith("patch_embed")]
    assert "patch_embed.proj.parametrizations.weight.original0" in names  # g (the norm), v (the direction)
    export_backbone(wn, str(tmp_path))
    back = load_backbone(str(tmp_path)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(back(x), wn.eval()(x), atol=1e-5)


def _grads(model, x):
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,first", [("vit_tiny_patch16_224", "patch_embed.proj."), ("resnet18", "conv1.")])
def test_first_layer_clipping_touches_only_the_first_layer(name, first):
    from accelerate import Accelerator
    from ssl_bocb.models.backbones import first_layer_parameters
    from ssl_bocb.optim import clip_gradients
    kw = dict(img_size=32, patch_size=8, depth=2) if name.startswith("vit") else {}
    m = create_backbone(name, pos_embed="learned", **kw)
    x = torch.randn(2, 3, 32, 32)
    before = _grads(m, x)
    params = [p for p in m.parameters() if p.requires_grad]
    firsts = first_layer_parameters(m)
    assert firsts and all(any(p is q for q in params) for p in firsts)
    first_norm = torch.nn.utils.get_total_norm([p.grad for p in firsts])
    threshold = float(first_norm) / 10
    total = clip_gradients(Accelerator(cpu=True), torch.optim.SGD(params, lr=0.1), params, "first_layer", threshold,
                           firsts)
    assert torch.allclose(total, torch.nn.utils.get_total_norm(list(before.values())), rtol=1e-5)
    after = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    for n, g in after.items():
        if n.startswith(first):
            assert torch.allclose(g, before[n] / 10, rtol=1e-3, atol=1e-8), n
        else:
            assert torch.equal(g, before[n]), n


def test_first_layer_clipping_of_a_frozen_projection_is_refused():
    from ssl_bocb.engine.step import StepSettings
    from ssl_bocb.optim import get_entry
    cfg = cfg_of(*VIT32, "model.frozen_patch_embed=true", "optim.grad_clip_mode=first_layer", "optim.grad_clip=0.1")
    model = build_moco(cfg.model)
    with pytest.raises(UserError, match="frozen"):
        StepSettings.from_cfg(cfg.optim, get_entry("adamw"), "no", backbone=model.backbone)


def test_vit_only_flags_on_a_cnn_warn(caplog):
    with caplog.at_level("WARNING"):
        m = create_backbone("resnet18", pool="avg", mlp_norm="batchnorm")
    assert "model.pool=avg applies to ViTs only" in caplog.text and "model.mlp_norm" in caplog.text
    assert m.ssl_bocb_spec["mlp_norm"] is None


ABLATIONS = sorted(glob.glob(os.path.join(REPO, "configs", "ablations", "*.yaml")))
RECIPES = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


@pytest.mark.slow
def test_every_ablation_overlay_loads_on_every_recipe_and_changes_something():
    assert len(ABLATIONS) >= 15
    bases = {r: config.to_dict(config.load(config.PretrainConfig, [r])) for r in RECIPES}
    for overlay in ABLATIONS:
        changed = False
        for recipe in RECIPES:
            over = config.to_dict(config.load(config.PretrainConfig, [recipe, overlay]))
            changed = changed or over != bases[recipe]
        assert changed, f"{os.path.basename(overlay)} changes no recipe"


def test_centre_tap_convolutions_equal_plain_ones_on_every_map_size():
    from ssl_bocb.models.backbones import CentreTapConv2d, use_centre_taps
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.Conv2d(16, 4, 3, 2, padding=1),
                                torch.nn.Conv2d(4, 4, 1))
    fast = copy.deepcopy(plain)
    assert use_centre_taps(fast) == 2 and type(fast[2]) is torch.nn.Conv2d
    assert list(dict(fast.named_parameters())) == list(dict(plain.named_parameters()))
    for size in (1, 2, 5):
        x = torch.randn(3, 8, size, size)
        for m in (plain, fast):
            m.zero_grad()
            m(x).square().sum().backward()
        assert torch.allclose(fast(x), plain(x), atol=1e-6)
        for p, q in zip(fast.parameters(), plain.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-5)
    assert sum(type(m) is CentreTapConv2d for m in create_backbone("resnet18").modules()) == 16
