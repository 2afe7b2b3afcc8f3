from .backbones import apply_cifar_stem, create_backbone, is_vit, sincos_2d_pos_embed
from .export import export_backbone, load_backbone
from .heads import build_mlp
from .mocov3 import MoCoV3, build_moco

__all__ = ["apply_cifar_stem", "create_backbone", "is_vit", "sincos_2d_pos_embed", "export_backbone", "load_backbone", "build_mlp", "MoCoV3", "build_moco"]
