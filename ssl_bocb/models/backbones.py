"""Backbones from timm (``num_classes=0``) with the MoCo v3 ViT changes, its ViT ablations and a CIFAR stem for
ResNets."""
import difflib
import logging
import math
from typing import Any, Dict, List

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

log = logging.getLogger(__name__)

# ViT-only options and their MoCo v3 defaults: a CNN backbone with another value gets a warning, not a silent no-op.
VIT_DEFAULTS = {"frozen_patch_embed": False, "pool": "token", "mlp_norm": "layernorm", "patch_norm": "none"}


class TokenBatchNorm(nn.Module):
    """BatchNorm for token sequences: [B, N, C] normalised per channel over the B * N tokens. The BatchNorm1d is a
    child module, so ``SyncBatchNorm.convert_sync_batchnorm`` replaces it like any other BN."""

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x.transpose(1, 2)).transpose(1, 2)


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
                    pool: str = "token", mlp_norm: str = "layernorm", patch_norm: str = "none",
                    **timm_kwargs: Any) -> nn.Module:
    """A timm model by name with ``num_classes=0`` (its forward returns pooled features [N, num_features]).

    ViT options (a CNN warns when one differs from its default): ``pos_embed`` sincos | learned | none,
    ``moco_init``, ``frozen_patch_embed``, ``pool`` token | avg (global average pooling, with no class token and no
    final LayerNorm), ``mlp_norm`` layernorm | batchnorm (the norm before each block's MLP; attention keeps its
    LayerNorm), ``patch_norm`` none | batchnorm | weightnorm (on the patch projection). ResNet options:
    ``cifar_stem``, ``zero_init_residual``.
    """
    if not timm.is_model(name):
        close = suggest_models(name)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for valid names"
        raise UserError(f"unknown backbone '{name}' (model.backbone); {hint}")
    kwargs = dict(timm_kwargs)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as e:
        raise UserError(f"model.backbone_kwargs {kwargs} do not fit {name}: {e}") from None
    vit = is_vit(model)
    if vit:
        extra = {}
        if pos_embed == "none":
            extra["pos_embed"] = "none"  # timm drops the parameter entirely
        if pool == "avg":  # MoCo v3: without the class token the final LayerNorm must go too
            extra.update(class_token=False, global_pool="avg", final_norm=False, fc_norm=False)
        if extra:
            kwargs.update(extra)
            model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    else:
        asked = dict(frozen_patch_embed=frozen_patch_embed, pool=pool, mlp_norm=mlp_norm, patch_norm=patch_norm)
        for key, value in asked.items():
            if value != VIT_DEFAULTS[key]:
                log.warning("model.%s=%s applies to ViTs only; %s is a CNN, so it has no effect", key, value, name)
    if pretrained:
        model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    if vit:
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
        if mlp_norm == "batchnorm":
            for block in model.blocks:
                block.norm2 = TokenBatchNorm(model.embed_dim)
        if patch_norm == "batchnorm":  # BN over the projection's output channels, i.e. over the tokens
            model.patch_embed.norm = TokenBatchNorm(model.embed_dim)
        elif patch_norm == "weightnorm":  # after the init, which sets the projection's plain weight
            nn.utils.parametrizations.weight_norm(model.patch_embed.proj, name="weight", dim=0)
        if frozen_patch_embed:
            model.patch_embed.proj.requires_grad_(False)
    else:
        if cifar_stem:
            apply_cifar_stem(model)
        if zero_init_residual and not pretrained:
            for m in model.modules():
                if m is not model and callable(getattr(m, "zero_init_last", None)):
                    m.zero_init_last()
        use_centre_taps(model)
    model.ssl_bocb_spec = backbone_spec(name, cifar_stem, frozen_patch_embed, pos_embed, kwargs, model,
                                        mlp_norm=mlp_norm, patch_norm=patch_norm)
    return model


class CentreTapConv2d(nn.Conv2d):
    """A 3x3 convolution with padding 1 that, on a 1x1 feature map, computes what it computes anyway: the product
    with its centre tap (every other tap meets only padding). The deepest ResNet stage reaches 1x1 maps on 32 px
    images, where oneDNN's CPU convolution backward ran 270 ms per call at batch 256 against a few ms for the
    product; same parameters, same gradients (zero outside the centre, as before), other maps unchanged."""

    def forward(self, x):
        if x.shape[-2:] == (1, 1):
            y = F.linear(x.flatten(1), self.weight[:, :, 1, 1], self.bias)
            return y.view(*y.shape, 1, 1)  # with 1x1 maps this is both contiguous and channels-last
        return super().forward(x)


def use_centre_taps(model: nn.Module) -> int:
    """Make every plain 3x3, padding-1, stride-any, ungrouped, undilated nn.Conv2d a :class:`CentreTapConv2d`
    (the class only: the parameters and their names stay); returns how many."""
    n = 0
    for m in model.modules():
        if (type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.padding == (1, 1) and m.dilation == (1, 1)
                and m.groups == 1 and m.padding_mode == "zeros"):
            m.__class__ = CentreTapConv2d
            n += 1
    return n


def first_layer_parameters(backbone: nn.Module) -> List[nn.Parameter]:
    """The trainable parameters of the first layer: a ViT's patch projection, else the first convolution."""
    if is_vit(backbone):
        module = backbone.patch_embed.proj
    else:
        module = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
        if module is None:
            raise UserError(f"{type(backbone).__name__} has no convolution to call its first layer; use "
                            f"optim.grad_clip_mode=norm or agc")
    return [p for p in module.parameters() if p.requires_grad]


def backbone_spec(name, cifar_stem, frozen_patch_embed, pos_embed, kwargs, model, mlp_norm="layernorm",
                  patch_norm="none") -> Dict[str, Any]:
    """What ``backbone.json`` records: enough to rebuild the module before loading its weights (pooling travels in
    ``timm_kwargs``; ``mlp_norm`` / ``patch_norm`` change modules that plain timm does not have)."""
    vit = is_vit(model)
    return {
        "timm_name": name,
        "timm_kwargs": dict(kwargs),
        "num_features": int(model.num_features),
        "family": "vit" if is_vit(model) else "cnn",
        "cifar_stem": bool(cifar_stem and not is_vit(model)),
        "frozen_patch_embed": bool(frozen_patch_embed and is_vit(model)),
        "pos_embed": pos_embed if is_vit(model) else None,
        "mlp_norm": mlp_norm if vit else None,
        "patch_norm": patch_norm if vit else None,
    }


def create_from_spec(spec: Dict[str, Any], **timm_overrides: Any) -> nn.Module:
    """Rebuild an exported backbone's modules (no init of its own: the weights are loaded next)."""
    kwargs = {**spec["timm_kwargs"], **timm_overrides}
    return create_backbone(spec["timm_name"], cifar_stem=spec.get("cifar_stem", False),
                           frozen_patch_embed=spec.get("frozen_patch_embed", False),
                           pos_embed=spec.get("pos_embed") or "learned", moco_init=False, zero_init_residual=False,
                           mlp_norm=spec.get("mlp_norm") or "layernorm", patch_norm=spec.get("patch_norm") or "none",
                           **kwargs)


def backbone_kwargs_from_cfg(model_cfg) -> Dict[str, Any]:
    return dict(cifar_stem=model_cfg.cifar_stem, frozen_patch_embed=model_cfg.frozen_patch_embed,
                pos_embed=model_cfg.pos_embed, moco_init=model_cfg.moco_init,
                zero_init_residual=model_cfg.zero_init_residual, pool=model_cfg.get("pool", "token"),
                mlp_norm=model_cfg.get("mlp_norm", "layernorm"), patch_norm=model_cfg.get("patch_norm", "none"),
                **dict(model_cfg.backbone_kwargs))
