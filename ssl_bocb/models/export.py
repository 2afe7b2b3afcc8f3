"""Export / load a pretrained backbone as ``backbone.safetensors`` + ``backbone.json``.

The weights are the backbone's own state dict (no prefixes), so for every backbone without ``cifar_stem``::

    spec = json.load(open("backbone.json"))
    m = timm.create_model(spec["timm_name"], num_classes=0, **spec["timm_kwargs"])
    m.load_state_dict(safetensors.torch.load_file("backbone.safetensors"))

loads with no key surgery. A ``cifar_stem`` ResNet has a 3x3 conv1 (same key, other shape): call
``ssl_bocb.models.apply_cifar_stem(m)`` before loading, or use :func:`load_backbone`; so does a ViT with the
BatchNorm ablations (``mlp_norm`` / ``patch_norm`` in backbone.json). Global average pooling is plain timm
(``class_token=False, global_pool='avg'`` in ``timm_kwargs``).
"""
import json
import os
from typing import Tuple

import safetensors.torch
from torch import nn

from ..errors import UserError
from ..files import atomic_path, read_json, write_text
from .backbones import create_from_spec


def export_backbone(backbone: nn.Module, out_dir: str, extra: dict = None) -> Tuple[str, str]:
    spec = dict(backbone.ssl_bocb_spec)
    if extra:
        spec.update(extra)
    weights = os.path.join(out_dir, "backbone.safetensors")
    meta = os.path.join(out_dir, "backbone.json")
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    with atomic_path(weights) as tmp:
        safetensors.torch.save_file(state, tmp, metadata={"timm_name": spec["timm_name"]})
    write_text(meta, json.dumps(spec, indent=2))
    return weights, meta


def read_spec(weights_path: str) -> dict:
    meta = os.path.join(os.path.dirname(weights_path), "backbone.json")
    if not os.path.isfile(meta):
        raise UserError(f"'{meta}' is missing beside '{weights_path}'; it records the timm model to rebuild")
    return read_json(meta, "backbone description", fix="export the backbone again")


def load_backbone(path: str) -> nn.Module:
    """Rebuild the backbone from ``backbone.json`` and load ``backbone.safetensors`` (a run dir or the file)."""
    weights = os.path.join(path, "backbone.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(weights):
        raise UserError(f"no backbone.safetensors at '{path}'; pass a finished pretraining run directory or the "
                        f"exported file")
    spec = read_spec(weights)
    model = create_from_spec(spec)
    try:
        state = safetensors.torch.load_file(weights)
    except Exception as e:
        raise UserError(f"'{weights}' is not a readable safetensors file ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"'{weights}' does not fit {spec['timm_name']} ({str(e).splitlines()[0]}); is "
                        f"backbone.json from the same export?") from None
    return model
