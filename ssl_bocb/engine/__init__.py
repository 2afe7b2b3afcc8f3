from .loop import epoch_batches
from .setup import make_accelerator

__all__ = ["epoch_batches", "make_accelerator"]
