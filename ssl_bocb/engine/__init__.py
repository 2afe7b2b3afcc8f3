from .pretrain import make_accelerator, pretrain

__all__ = ["make_accelerator", "pretrain"]
