"""MLP heads of MoCo v3: one builder for projector and predictor; ResNet/ViT differ only in configuration."""
from torch import nn


def build_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True,
              hidden_bn: bool = True) -> nn.Sequential:
    """MoCo v3 MLP: (Linear -> BN -> ReLU) x (num_layers - 1) -> Linear [-> BN(affine=False)].

    "The projection head is a 3-layer MLP ... the prediction head is a 2-layer MLP ... the hidden layers are
    4096-d with ReLU; the output layers are 256-d, without ReLU. All fc layers are followed by BN except the
    last of the prediction head for ResNet" (Chen, Xie, He 2021, sec. 3 and appendix).
    Every Linear has bias=False, as in the reference implementation, also where the BN ablation removes a BN.

    Shapes: [N, in_dim] -> [N, out_dim].
    """
    if num_layers < 1:
        raise ValueError("build_mlp needs num_layers >= 1")
    layers = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        last = i == num_layers - 1
        d_out = out_dim if last else hidden_dim
        bn = last_bn if last else hidden_bn
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if not last:
            if bn:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        elif bn:
            # the output BN of MoCo v3 heads has no affine parameters
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)
