"""MoCo v3: base encoder (backbone -> projector -> predictor) and a momentum encoder (backbone -> projector)."""
import copy
from typing import Tuple

import torch
from torch import nn

from .backbones import backbone_kwargs_from_cfg, create_backbone, is_vit
from .heads import build_mlp


class MoCoV3(nn.Module):
    """Backbone, projector and predictor are separate attributes, so ``self.backbone.state_dict()`` loads into
    ``timm.create_model(name, num_classes=0)`` as it is. The momentum encoder is a frozen copy updated by an
    explicit :meth:`update_momentum` call in the training loop (no queue; negatives are the batch's keys).

    ``momentum_encoder=False`` is the paper's m = 0 ablation: there is no copy, and the keys are the base
    encoder's own projector outputs of the same forward under stop-gradient (what a copy refreshed with m = 0
    before every step would compute, at no extra cost)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module,
                 momentum_encoder: bool = True):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.momentum_backbone = copy.deepcopy(backbone) if momentum_encoder else None
        self.momentum_projector = copy.deepcopy(projector) if momentum_encoder else None
        for p in self.momentum_parameters():
            p.requires_grad_(False)

    @property
    def has_momentum_encoder(self) -> bool:
        return self.momentum_backbone is not None

    def base_parameters(self):
        """Parameters averaged into the momentum encoder (backbone + projector, same order as the copy)."""
        return list(self.backbone.parameters()) + list(self.projector.parameters())

    def momentum_parameters(self):
        if not self.has_momentum_encoder:
            return []
        return list(self.momentum_backbone.parameters()) + list(self.momentum_projector.parameters())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Both views, [N, 3, H, W] x 2 -> queries q1, q2 and projector outputs z1, z2 (each [N, out_dim]; z is
        the key without a momentum encoder). Each view is its own BN batch."""
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        return self.predictor(z1), self.predictor(z2), z1, z2

    @torch.no_grad()
    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of one view from the momentum encoder: [N, 3, H, W] -> [N, out_dim], no gradient."""
        return self.momentum_projector(self.momentum_backbone(x))

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q on parameters (buffers such as BN running statistics are
        not averaged; they run on their own in the momentum encoder's forward)."""
        if not self.has_momentum_encoder:
            return
        params_k = self.momentum_parameters()
        params_q = self.base_parameters()
        torch._foreach_mul_(params_k, m)
        torch._foreach_add_(params_k, params_q, alpha=1.0 - m)


def build_moco(model_cfg, momentum_encoder: bool = True) -> MoCoV3:
    """MoCo v3 from the ``model`` config: heads sized from the backbone, BN defaults per SPEC (projector last BN
    always; predictor last BN for ViT only; projector 3 layers for ViT, 2 for CNNs). ``momentum_encoder=False``
    is the m = 0 ablation (``moco.momentum=0``)."""
    backbone = create_backbone(model_cfg.backbone, **backbone_kwargs_from_cfg(model_cfg))
    vit = is_vit(backbone)
    proj_layers = model_cfg.proj_layers or (3 if vit else 2)
    proj_last_bn = True if model_cfg.proj_last_bn is None else model_cfg.proj_last_bn
    pred_last_bn = vit if model_cfg.pred_last_bn is None else model_cfg.pred_last_bn
    projector = build_mlp(proj_layers, backbone.num_features, model_cfg.hidden_dim, model_cfg.out_dim,
                          last_bn=proj_last_bn, hidden_bn=model_cfg.proj_hidden_bn)
    if model_cfg.pred_layers > 0:
        predictor = build_mlp(model_cfg.pred_layers, model_cfg.out_dim, model_cfg.hidden_dim, model_cfg.out_dim,
                              last_bn=pred_last_bn, hidden_bn=model_cfg.pred_hidden_bn)
    else:
        predictor = nn.Identity()
    return MoCoV3(backbone, projector, predictor, momentum_encoder=momentum_encoder)
