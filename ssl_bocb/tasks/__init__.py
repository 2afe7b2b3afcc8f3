"""The training tasks plugged into the one loop (``engine.loop``): MoCo v3 pretraining and fine-tuning."""
from .finetune import run_finetune
from .pretrain import pretrain

__all__ = ["pretrain", "run_finetune"]
