"""A pretrained backbone as a folder that timm loads as it is, and its upload to the Hugging Face Hub.

The folder holds ``model.safetensors`` (the backbone's state dict), ``config.json`` (timm's hub format:
``architecture``, ``model_args``, ``pretrained_cfg``) and ``README.md`` (a model card). Either of::

    timm.create_model("local-dir:<folder>", pretrained=True)               # the folder, or hf-hub:<repo> once pushed
    timm.create_model(name, pretrained=True, num_classes=0, **model_args,
                      pretrained_cfg_overlay=dict(file="<folder>/model.safetensors"))

gives the backbone (no classifier: ``num_classes=0``). Backbones whose modules plain timm does not build (a ResNet
with ``cifar_stem``, a ViT with ``mlp_norm`` / ``patch_norm`` BatchNorm) are refused with the reason.
"""
import json
import os
import shutil
import tempfile
from typing import Dict, Optional

import safetensors.torch

from ..errors import UserError
from ..files import write_text
from .export import load_backbone, read_spec

NOT_TIMM = {"cifar_stem": "the CIFAR stem (a 3x3 stride-1 conv1, no max-pool)",
            "mlp_norm": "BatchNorm before each block's MLP", "patch_norm": "a norm on the patch projection"}


def timm_blockers(spec: Dict) -> list:
    out = []
    if spec.get("cifar_stem"):
        out.append(NOT_TIMM["cifar_stem"])
    if (spec.get("mlp_norm") or "layernorm") != "layernorm":
        out.append(NOT_TIMM["mlp_norm"])
    if (spec.get("patch_norm") or "none") != "none":
        out.append(NOT_TIMM["patch_norm"])
    return out


def model_card(spec: Dict, source: str, args: Dict) -> str:
    name = spec["timm_name"]
    kw = "".join(f", {k}={v!r}" for k, v in args.items())
    return f"""---
library_name: timm
tags: [image-feature-extraction, self-supervised, moco-v3, ssl_bocb]
---
# {name}, MoCo v3 pretrained with ssl_bocb

A `{name}` backbone (no classifier; {spec['num_features']} features) pretrained with MoCo v3 by the
ssl_bocb toolkit. Exported from `{os.path.basename(os.path.normpath(source))}`.

```python
import timm
model = timm.create_model("local-dir:<this folder>", pretrained=True)      # or "hf-hub:<repo id>"
# the same, by name:
model = timm.create_model("{name}", pretrained=True, num_classes=0{kw},
                          pretrained_cfg_overlay=dict(file="<this folder>/model.safetensors"))
```

Backbone description as the toolkit records it:

```json
{json.dumps(spec, indent=2, sort_keys=True)}
```
"""


def export_timm(source: str, out_dir: str) -> str:
    """Write the timm folder of ``source`` (a finished pretraining run, or its backbone.safetensors) into
    ``out_dir`` (created; an existing non-empty folder is refused); returns ``out_dir``."""
    weights = os.path.join(source, "backbone.safetensors") if os.path.isdir(source) else source
    spec = read_spec(weights) if os.path.isfile(weights) else None
    if spec is None:
        raise UserError(f"no backbone.safetensors at '{source}'; pass a finished pretraining run folder or the "
                        f"exported file")
    blockers = timm_blockers(spec)
    if blockers:
        raise UserError(f"'{source}' has {' and '.join(blockers)}, which plain timm does not build, so a timm folder "
                        f"would not load; load it with ssl_bocb.models.load_backbone instead")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"export folder '{out_dir}' exists and is not empty; choose a new one (nothing was written)")
    backbone = load_backbone(weights)
    args = dict(spec["timm_kwargs"])
    config = dict(architecture=spec["timm_name"], num_classes=0, num_features=spec["num_features"],
                  model_args=args, pretrained_cfg=dict(num_classes=0, tag="ssl_bocb-mocov3"))
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)  # the whole folder appears at once, or not at all
    try:
        state = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
        safetensors.torch.save_file(state, os.path.join(tmp, "model.safetensors"))
        write_text(os.path.join(tmp, "config.json"), json.dumps(config, indent=2) + "\n")
        write_text(os.path.join(tmp, "README.md"), model_card(spec, source, args))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def push_to_hub(folder: str, repo_id: str, private: bool = True, token: Optional[str] = None) -> str:
    """Upload the folder to the Hugging Face Hub (``huggingface_hub``, the ``hub`` extra); returns the repo URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("pushing to the Hub needs huggingface_hub: pip install 'ssl_bocb[hub]'") from None
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="ssl_bocb export")
    return str(url)
