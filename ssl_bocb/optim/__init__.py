from .clipping import CLIP_MODES, clip_gradients
from .layerwise import LAMB, LARS
from .param_groups import DECAY_POLICIES, TRUST_POLICIES, group_summary, param_groups
from .registry import (FAMILIES, TABLE, Entry, Resolved, build_optimizer, create_optimizer, get_entry,
                       optimizer_from_cfg, record, resolve, resolve_named, table_rows, valid_names)
from .sam import frozen_bn_stats, sam_perturb, sam_restore
from .schedules import cosine, momentum, set_group_values, warmup_cosine

__all__ = ["CLIP_MODES", "clip_gradients", "LAMB", "LARS", "DECAY_POLICIES", "TRUST_POLICIES", "group_summary",
           "param_groups", "FAMILIES", "TABLE", "Entry", "Resolved", "build_optimizer", "create_optimizer",
           "get_entry", "optimizer_from_cfg", "record", "resolve", "resolve_named", "table_rows", "valid_names", "frozen_bn_stats",
           "sam_perturb", "sam_restore", "cosine", "momentum", "set_group_values", "warmup_cosine"]
