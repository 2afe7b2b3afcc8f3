from .pretrain import epoch_batches, make_accelerator, pretrain

__all__ = ["epoch_batches", "make_accelerator", "pretrain"]
