from .param_groups import group_summary, param_groups
from .registry import OPTIMIZERS, build_optimizer, create_optimizer, optimizer_from_cfg, register, valid_names
from .schedules import cosine, momentum, set_group_values, warmup_cosine

__all__ = ["group_summary", "param_groups", "OPTIMIZERS", "build_optimizer", "create_optimizer", "optimizer_from_cfg", "register", "valid_names", "cosine", "momentum", "set_group_values", "warmup_cosine"]
