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
    explicit :meth:`update_momentum` call in the training loop (no queue; negatives are the batch's keys)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(projector)
        for p in self.momentum_parameters():
            p.requires_grad_(False)

    def base_parameters(self):
        """Parameters averaged into the momentum encoder (backbone + projector, same order as the copy)."""
        return list(self.backbone.parameters()) + list(self.projector.parameters())

    def momentum_parameters(self):
        return list(self.momentum_backbone.parameters()) + list(self.momentum_projector.parameters())

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Queries of both views, [N, 3, H, W] x 2 -> [N, out_dim] x 2. Each view is its own BN batch."""
        return self.predictor(self.projector(self.backbone(x1))), self.predictor(self.projector(self.backbone(x2)))

    @torch.no_grad()
    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of one view: [N, 3, H, W] -> [N, out_dim], no gradient."""
        return self.momentum_projector(self.momentum_backbone(x))

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q on parameters (buffers such as BN running statistics are
        not averaged; they run on their own in the momentum encoder's forward)."""
        params_k = self.momentum_parameters()
        params_q = self.base_parameters()
        torch._foreach_mul_(params_k, m)
        torch._foreach_add_(params_k, params_q, alpha=1.0 - m)


def build_moco(model_cfg) -> MoCoV3:
    """MoCo v3 from the ``model`` config: heads sized from the backbone, BN defaults per SPEC (projector last BN
    always; predictor last BN for ViT only; projector 3 layers for ViT, 2 for CNNs)."""
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
    return MoCoV3(backbone, projector, predictor)
