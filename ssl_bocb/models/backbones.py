"""Backbones from timm (``num_classes=0``) with the MoCo v3 ViT changes and a CIFAR stem for ResNets."""
import difflib
import math
from typing import Any, Dict

import timm
import torch
from torch import nn

from ..errors import UserError


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


def sincos_2d_pos_embed(grid_h: int, grid_w: int, dim: int, num_prefix: int = 1,
                        temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding of MoCo v3 -> [1, num_prefix + h*w, dim].

    The embedding dim is split in four quarters: sin(w * omega), cos(w * omega), sin(h * omega), cos(h * omega)
    with omega_d = 1 / temperature^(d / (dim/4)); prefix (class-token) slots are zeros.
    """
    if dim % 4 != 0:
        raise UserError(f"sin-cos position embedding needs an embed dim divisible by 4, got {dim}; "
                        f"use model.pos_embed=learned")
    gh, gw = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32),
                            indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out_w = gw.flatten()[:, None] * omega[None]          # [h*w, dim/4]
    out_h = gh.flatten()[:, None] * omega[None]
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(num_prefix, dim), emb], dim=0)[None]


def moco_vit_init(model: nn.Module) -> None:
    """MoCo v3 ViT init: qkv as three separate xavier-uniform matrices, other Linear xavier-uniform, biases zero,
    cls token N(0, 1e-6), patch projection U(+-sqrt(6 / (3*p*p + D)))."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            if "qkv" in name:
                bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    if getattr(model, "cls_token", None) is not None:
        nn.init.normal_(model.cls_token, std=1e-6)
    proj = model.patch_embed.proj
    bound = math.sqrt(6.0 / float(3 * proj.kernel_size[0] * proj.kernel_size[1] + proj.out_channels))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """ResNet stem for 32 px images: 3x3 stride-1 conv1, no max-pool. Parameter names stay the same."""
    if not (hasattr(model, "conv1") and isinstance(model.conv1, nn.Conv2d) and hasattr(model, "maxpool")):
        raise UserError(f"model.cifar_stem=true needs a timm ResNet with a single conv1 stem, not "
                        f"{type(model).__name__}; set model.cifar_stem=false")
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=old.bias is not None)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def suggest_models(name: str, n: int = 5):
    return difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.5)


def create_backbone(name: str, cifar_stem: bool = False, frozen_patch_embed: bool = False, pos_embed: str = "sincos",
                    moco_init: bool = True, zero_init_residual: bool = True, pretrained: bool = False,
                    **timm_kwargs: Any) -> nn.Module:
    """A timm model by name with ``num_classes=0`` (its forward returns pooled features [N, num_features]).

    ViT options (ignored for other models): ``pos_embed`` sincos | learned | none, ``moco_init``,
    ``frozen_patch_embed``. ResNet options: ``cifar_stem``, ``zero_init_residual``.
    """
    if not timm.is_model(name):
        close = suggest_models(name)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for valid names"
        raise UserError(f"unknown backbone '{name}' (model.backbone); {hint}")
    kwargs = dict(timm_kwargs)
    try:
        probe = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise UserError(f"model.backbone_kwargs {kwargs} do not fit {name}: {e}") from None
    if is_vit(probe) and pos_embed == "none":
        kwargs["pos_embed"] = "none"  # timm drops the parameter entirely
        probe = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    model = probe
    if pretrained:
        model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    if is_vit(model):
        if moco_init and not pretrained:
            moco_vit_init(model)
        if pos_embed == "sincos" and getattr(model, "pos_embed", None) is not None:
            grid = model.patch_embed.grid_size
            prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
            emb = sincos_2d_pos_embed(grid[0], grid[1], model.embed_dim, prefix)
            if emb.shape != model.pos_embed.shape:
                raise UserError(f"sin-cos position embedding shape {tuple(emb.shape)} does not match "
                                f"{tuple(model.pos_embed.shape)} of {name}; use model.pos_embed=learned")
            with torch.no_grad():
                model.pos_embed.copy_(emb)
            model.pos_embed.requires_grad_(False)
        if frozen_patch_embed:
            model.patch_embed.proj.requires_grad_(False)
    else:
        if cifar_stem:
            apply_cifar_stem(model)
        if zero_init_residual and not pretrained:
            for m in model.modules():
                if m is not model and callable(getattr(m, "zero_init_last", None)):
                    m.zero_init_last()
    model.ssl_bocb_spec = backbone_spec(name, cifar_stem, frozen_patch_embed, pos_embed, kwargs, model)
    return model


def backbone_spec(name, cifar_stem, frozen_patch_embed, pos_embed, kwargs, model) -> Dict[str, Any]:
    """What ``backbone.json`` records: enough to rebuild the module before loading its weights."""
    return {
        "timm_name": name,
        "timm_kwargs": dict(kwargs),
        "num_features": int(model.num_features),
        "family": "vit" if is_vit(model) else "cnn",
        "cifar_stem": bool(cifar_stem and not is_vit(model)),
        "frozen_patch_embed": bool(frozen_patch_embed and is_vit(model)),
        "pos_embed": pos_embed if is_vit(model) else None,
    }


def backbone_kwargs_from_cfg(model_cfg) -> Dict[str, Any]:
    return dict(cifar_stem=model_cfg.cifar_stem, frozen_patch_embed=model_cfg.frozen_patch_embed,
                pos_embed=model_cfg.pos_embed, moco_init=model_cfg.moco_init,
                zero_init_residual=model_cfg.zero_init_residual, **dict(model_cfg.backbone_kwargs))
