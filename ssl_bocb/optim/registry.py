"""The optimizer table: one small entry per optimizer, the single source of truth for what runs.

Each :class:`Entry` says where the optimizer comes from (torch, timm, pytorch-optimizer, or this package), which
config options it takes and under which constructor name, its default base lr / weight decay for MoCo v3
pretraining and where those come from, how its weight decay acts, and whether it applies a layer-wise trust
ratio. :func:`resolve` turns an ``optim`` config into the values that reach the constructor:

    explicit ``optim.<key>``  >  ``optim.per_optimizer.<name>.<key>`` (recipe tuning)  >  the table default

An option that has a value and that the chosen optimizer does not take is logged as a warning and recorded under
``ignored``; :func:`record` reads the constructed optimizer back for ``config.yaml``.

Default lr / wd rule (``defaults_from``): a published self-supervised setting where one exists; otherwise the
BOCB paper's supervised CIFAR-100 mode (../shared/data/bocb_cifar100_mode_defaults.csv, batch 100) with the lr
multiplied by 0.3 = MoCo v3 AdamW 1.5e-4 / BOCB AdamW mode 5e-4, as lr per 256 images, and the wd as it is.
"""
import dataclasses
import difflib
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..device import cpu_has_native_bf16
from ..errors import UserError
from .param_groups import param_groups

log = logging.getLogger(__name__)

FAMILIES = {
    "a": "fixed lr + momentum",
    "b": "adaptive lr + momentum",
    "c": "estimated lr + momentum",
    "d": "adaptive lr, current gradient",
    "new": "after the BOCB study",
}
# Options resolved per optimizer (null in the config = the table's default for the chosen optimizer).
OPTION_KEYS = ("momentum", "nesterov", "betas", "eps", "trust_coefficient", "trust_clip")
# Keys that may appear under optim.per_optimizer.<name>.
TUNABLE_KEYS = ("base_lr", "weight_decay", "lr_scaling") + OPTION_KEYS + ("kwargs",)
BOCB_LR_RATIO = 0.3  # MoCo v3 AdamW base lr 1.5e-4 / BOCB AdamW mode 5e-4


def _cls(path: str) -> Callable[[], type]:
    """Lazy import of 'module.Class' (pytorch-optimizer costs time to import; load it only when chosen)."""
    def load():
        module, _, name = path.rpartition(".")
        return getattr(importlib.import_module(module), name)
    load.path = path
    return load


@dataclass(frozen=True)
class Entry:
    name: str                      # key of optim.name
    label: str                     # the BOCB paper's name
    family: str                    # a, b, c, d (BOCB Sec. 3.2) or new
    source: str                    # 'module.Class' of the implementation
    base_lr: Optional[float]       # per 256 images
    weight_decay: Optional[float]
    options: Dict[str, Any]        # config option -> default value, for the options this optimizer takes
    weight_decay_kind: str         # decoupled | L2 (added to the gradient) | in update (before the trust ratio) ...
    defaults_from: str
    kwarg_names: Dict[str, str] = field(default_factory=dict)  # config option -> constructor keyword if different
    fixed: Dict[str, Any] = field(default_factory=dict)        # constructor keywords always passed
    lr_scaling: str = "linear"
    trust_ratio: bool = False
    hessian: bool = False          # needs backward(create_graph=True) on its Hessian-update steps
    bf16_inside: bool = False      # computes in bf16 internally, whatever the parameters' dtype
    notes: str = ""

    def kwarg(self, option: str) -> str:
        return self.kwarg_names.get(option, option)

    @property
    def cls(self) -> type:
        return _cls(self.source)()


ADAM = dict(betas=(0.9, 0.999), eps=1e-8)
BOCB = "BOCB CIFAR-100 mode, lr x 0.3"

TABLE: Dict[str, Entry] = {e.name: e for e in [
    # (a) fixed lr + momentum
    Entry("sgd", "SGD-M", "a", "torch.optim.SGD", 0.03, 1e-4, dict(momentum=0.9, nesterov=False), "L2",
          f"{BOCB} (= MoCo v2's SGD lr 0.03 per 256)"),
    Entry("sgdp", "SGDP", "a", "timm.optim.SGDP", 0.03, 1e-4, dict(momentum=0.9, nesterov=False, eps=1e-8),
          "decoupled (/ (1 - momentum); x wd_ratio on scale-invariant weights)", BOCB),
    Entry("lion", "Lion", "a", "timm.optim.Lion", 1.5e-5, 0.0, dict(betas=(0.9, 0.99)), "decoupled", BOCB),
    # (b) adaptive lr + momentum
    Entry("adam", "Adam", "b", "torch.optim.Adam", 1.5e-4, 1e-8, dict(ADAM), "L2", BOCB),
    Entry("adamax", "Adamax", "b", "torch.optim.Adamax", 1.5e-4, 1e-4, dict(ADAM), "L2", BOCB),
    Entry("adamw", "AdamW", "b", "torch.optim.AdamW", 1.5e-4, 0.1, dict(ADAM), "decoupled",
          "MoCo v3 ViT recipe (Chen et al. 2021)"),
    Entry("adamp", "AdamP", "b", "timm.optim.AdamP", 3e-4, 0.05, dict(ADAM, nesterov=False),
          "decoupled (x wd_ratio on scale-invariant weights)", BOCB),
    Entry("lamb", "LAMB", "b", "ssl_bocb.optim.layerwise.LAMB", 1.5e-3, 0.05,
          dict(betas=(0.9, 0.999), eps=1e-6, trust_clip=False), "in update (before the trust ratio)", BOCB,
          trust_ratio=True),
    Entry("nadam", "NAdam", "b", "torch.optim.NAdam", 1.5e-4, 0.0, dict(ADAM), "L2", BOCB),
    Entry("radam", "RAdam", "b", "torch.optim.RAdam", 3e-4, 0.0, dict(ADAM), "L2", BOCB),
    Entry("adan", "Adan", "b", "timm.optim.Adan", 6e-4, 0.05, dict(betas=(0.98, 0.92, 0.99), eps=1e-8),
          "decoupled (proximal)", BOCB),
    # (c) estimated lr + momentum
    Entry("adabelief", "AdaBelief", "c", "timm.optim.AdaBelief", 1.5e-3, 0.01, dict(betas=(0.9, 0.999), eps=1e-16),
          "decoupled", BOCB, notes="rectified (timm default rectify=True)"),
    Entry("adabound", "AdaBound", "c", "pytorch_optimizer.AdaBound", 3e-5, 1e-4, dict(ADAM), "decoupled", BOCB,
          notes="final_lr 0.1, gamma 1e-3 (package defaults)"),
    Entry("adafactor", "AdaFactor", "c", "timm.optim.Adafactor", 1.5e-4, 0.01, dict(eps=1e-30), "decoupled", BOCB,
          notes="relative step off (explicit lr), parameter scaling on, no first moment (timm defaults)"),
    Entry("lars", "LARS", "c", "ssl_bocb.optim.layerwise.LARS", 0.3, 1e-6,
          dict(momentum=0.9, nesterov=False, trust_coefficient=0.02, trust_clip=True),
          "L2 in update (before the trust ratio)",
          "SPEC section 1: solo-learn small-batch LARS (eta 0.02, LARC), measured here; ImageNet batch 4096: "
          "lr 0.6, eta 0.001, no clip", trust_ratio=True),
    Entry("novograd", "NovoGrad", "c", "timm.optim.NvNovoGrad", 6e-4, 0.01, dict(betas=(0.95, 0.98), eps=1e-8),
          "in the normalised update (NovoGrad)", BOCB),
    Entry("sophia", "Sophia", "c", "pytorch_optimizer.SophiaH", 3e-3, 0.1, dict(betas=(0.96, 0.99), eps=1e-12),
          "decoupled", "BOCB mode lr 1e-4 x 0.3 as the largest per-element step lr x p (p = 0.01)",
          fixed=dict(p=0.01, update_period=10), hessian=True,
          notes="SophiaH: Hutchinson Hessian diagonal every 10 steps (double backward), update clipped to +-p; "
                "not the released BOCB code's Sophia, which never updates its Hessian (sign of momentum)"),
    # (d) adaptive lr, current gradient
    Entry("adagrad", "AdaGrad", "d", "torch.optim.Adagrad", 1.5e-4, 1e-4, dict(eps=1e-10), "L2", BOCB),
    Entry("adadelta", "AdaDelta", "d", "torch.optim.Adadelta", 0.6, 0.0, dict(eps=1e-6), "L2", BOCB),
    Entry("rmsprop", "RMSProp", "d", "torch.optim.RMSprop", 1.5e-4, 0.0, dict(momentum=0.0, eps=1e-8), "L2", BOCB,
          notes="alpha 0.99 (torch default), no momentum (family d)"),
    # after the BOCB study
    Entry("muon", "Muon", "new", "timm.optim.Muon", 1.5e-4, 0.1,
          dict(momentum=0.95, nesterov=False, betas=(0.9, 0.95), eps=1e-7), "decoupled",
          "AdamW's MoCo v3 lr / wd (lr matched to AdamW's update RMS, Moonlight)",
          bf16_inside=True,
          notes="Newton-Schulz orthogonalised momentum for ndim >= 2 tensors (convs flattened), in bf16 (timm); "
                "AdamW with the betas for ndim < 2 tensors"),
    Entry("adopt", "ADOPT", "new", "timm.optim.Adopt", 1.5e-4, 0.1, dict(betas=(0.9, 0.9999), eps=1e-6),
          "decoupled", "AdamW's MoCo v3 lr / wd (ADOPT paper: Adam's lr)", fixed=dict(decoupled=True)),
    Entry("mars", "MARS", "new", "timm.optim.Mars", 7.5e-4, 0.1, dict(betas=(0.9, 0.99), eps=1e-8), "decoupled",
          "AdamW's MoCo v3 lr x 5 (MARS paper's GPT-2 lr ratio to AdamW, 3e-3 / 6e-4), AdamW wd",
          notes="MARS-AdamW, gamma 0.025"),
    Entry("laprop", "LaProp", "new", "timm.optim.LaProp", 1.5e-4, 0.1, dict(betas=(0.9, 0.999), eps=1e-15),
          "decoupled", "AdamW's MoCo v3 lr / wd (LaProp paper: Adam's lr)"),
    Entry("kron", "Kron (PSGD)", "new", "timm.optim.kron.Kron", 5e-5, 0.3, dict(momentum=0.9), "decoupled",
          "AdamW's MoCo v3 lr / 3 and wd x 3 (PSGD Kron authors' advice)",
          fixed=dict(decoupled_decay=True, deterministic=True),
          notes="Kronecker-factored preconditioner, update probability annealed 1 -> 0.03 (timm schedule)"),
]}


def valid_names() -> List[str]:
    from timm.optim import list_optimizers
    return sorted(set(TABLE) | set(list_optimizers()))


def _timm_entry(name: str) -> Entry:
    """An entry for a timm optimizer outside the table: options from timm's OptimInfo, no default lr / wd."""
    from timm.optim import get_optimizer_info
    info = get_optimizer_info(name)
    opts = {}
    if info.has_momentum:
        opts["momentum"] = 0.9
    if info.has_betas:
        opts["betas"] = (0.9, 0.999) if info.num_betas == 2 else (0.98, 0.92, 0.99)
    if info.has_eps:
        opts["eps"] = 1e-8
    cls = info.opt_class if isinstance(info.opt_class, str) else f"{info.opt_class.__module__}.{info.opt_class.__name__}"
    return Entry(name, name, "other", cls, None, None, opts, "see timm", "none: set optim.base_lr and "
                 "optim.weight_decay", fixed=dict(info.defaults or {}))


def get_entry(name: str) -> Entry:
    name = name.lower()
    if name in TABLE:
        return TABLE[name]
    from timm.optim import list_optimizers
    if name in list_optimizers():
        return _timm_entry(name)
    close = difflib.get_close_matches(name, valid_names(), n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"unknown optimizer '{name}' (optim.name){hint}; the table has {', '.join(TABLE)}; any other "
                    f"timm.optim name also runs (see `python tools/optimizers.py`)")


@dataclass
class Resolved:
    """What reaches the optimizer: values and, per key, where each came from (explicit / per_optimizer / table)."""
    entry: Entry
    base_lr: float
    weight_decay: float
    lr_scaling: str
    options: Dict[str, Any]
    kwargs: Dict[str, Any]
    ignored: Dict[str, Any]
    sources: Dict[str, str]


def _plain(v):
    if hasattr(v, "items"):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig":
        return [_plain(x) for x in v]
    return v


def check_per_optimizer(per_optimizer, where: str = "optim") -> None:
    for name, block in (per_optimizer or {}).items():
        get_entry(str(name))
        if not hasattr(block, "items"):
            raise UserError(f"{where}.per_optimizer.{name} must be a mapping of optimizer settings, got {block!r}")
        for key in block:
            if key not in TUNABLE_KEYS:
                close = difflib.get_close_matches(str(key), TUNABLE_KEYS, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise UserError(f"unknown key '{where}.per_optimizer.{name}.{key}'; {hint}valid: "
                                f"{', '.join(TUNABLE_KEYS)}")


def resolve(optim_cfg, where: str = "optim", warn: bool = True) -> Resolved:
    """Values for ``optim_cfg.name``: explicit key > per_optimizer block > table default. Raises UserError for a
    missing lr / wd or a betas length the optimizer does not take; warns about given options it does not take."""
    entry = get_entry(optim_cfg.name)
    per = _plain((getattr(optim_cfg, "per_optimizer", None) or {}).get(entry.name) or {})
    sources, values = {}, {}

    def pick(key, table_value):
        explicit = getattr(optim_cfg, key, None)
        if explicit is not None:
            sources[key] = "explicit"
            return _plain(explicit)
        if key in per:
            sources[key] = "per_optimizer"
            return per[key]
        sources[key] = "table"
        return table_value

    for key, table_value in (("base_lr", entry.base_lr), ("weight_decay", entry.weight_decay),
                             ("lr_scaling", entry.lr_scaling)):
        values[key] = pick(key, table_value)
        if values[key] is None:
            raise UserError(f"{entry.name} has no default {key} in the optimizer table; set {where}.{key}")
    options, ignored = {}, {}
    for key in OPTION_KEYS:
        if key in entry.options:
            options[key] = pick(key, entry.options[key])
        else:
            given = getattr(optim_cfg, key, None)
            given = per.get(key) if given is None else given
            if given is not None:
                ignored[key] = _plain(given)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
        want = len(entry.options["betas"])
        if len(options["betas"]) != want:
            raise UserError(f"{where}.betas={list(options['betas'])}: {entry.name} takes {want} betas")
    if not values["base_lr"] > 0 or values["weight_decay"] < 0:
        raise UserError(f"{entry.name}: base_lr must be > 0 and weight_decay >= 0, got {values['base_lr']} and "
                        f"{values['weight_decay']} (from {sources['base_lr']} / {sources['weight_decay']})")
    if values["lr_scaling"] not in ("linear", "sqrt", "none"):
        raise UserError(f"{where}.lr_scaling={values['lr_scaling']!r} is not valid; choose linear, sqrt or none")
    for key, value in (ignored.items() if warn else ()):
        log.warning("%s.%s=%s is not an option of %s (%s); ignored", where, key, value, entry.name, entry.source)
    kwargs = dict(per.get("kwargs") or {}, **_plain(optim_cfg.kwargs or {}))
    return Resolved(entry, float(values["base_lr"]), float(values["weight_decay"]), values["lr_scaling"], options,
                    kwargs, ignored, sources)


def build_optimizer(groups: List[Dict], resolved: Resolved, lr: float) -> torch.optim.Optimizer:
    """The optimizer of ``resolved`` over prepared parameter groups (their weight_decay already set)."""
    e = resolved.entry
    ctor = dict(e.fixed)
    ctor.update({e.kwarg(k): v for k, v in resolved.options.items()})
    ctor.update(resolved.kwargs)
    try:
        cls = e.cls
    except ImportError as err:
        raise UserError(f"optimizer {e.name} needs {e.source.split('.')[0]} ({err}); pip install "
                        f"pytorch-optimizer") from None
    if e.bf16_inside and any(p.device.type == "cpu" for g in groups for p in g["params"]) \
            and not cpu_has_native_bf16():
        log.warning("%s computes in bf16 (%s), which this CPU emulates (no avx512_bf16 / amx_bf16): each step is "
                    "tens of times slower than in fp32 here; run it on a GPU or a CPU with native bf16", e.name,
                    e.source)
    try:
        optimizer = cls(groups, lr=lr, weight_decay=resolved.weight_decay, **ctor)
    except TypeError as err:
        raise UserError(f"optimizer settings {ctor} do not fit {e.name} ({e.source}): {err}; check optim.kwargs") \
            from None
    if e.hessian:
        from .hessian import average_hessian_across_processes
        average_hessian_across_processes(optimizer)
    return optimizer


def resolve_named(name: str, base_lr: Optional[float] = None, weight_decay: Optional[float] = None,
                  kwargs: Optional[Dict[str, Any]] = None, **options) -> Resolved:
    """:func:`resolve` without a config: the table's values for ``name``, less those given here."""
    from types import SimpleNamespace
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise TypeError(f"unknown options {unknown}; valid: {', '.join(OPTION_KEYS)}, kwargs")
    return resolve(SimpleNamespace(name=name, base_lr=base_lr, weight_decay=weight_decay, lr_scaling=None,
                                   per_optimizer={}, kwargs=kwargs or {}, **{k: options.get(k) for k in OPTION_KEYS}))


def create_optimizer(model: nn.Module, name: str, lr: float, weight_decay: Optional[float] = None,
                     decay_policy: str = "exclude_1d_tokens", trust_policy: str = "exclude_1d",
                     **options) -> torch.optim.Optimizer:
    """Public API: ``create_optimizer(model, "lars", lr=0.3, weight_decay=1e-6, trust_coefficient=0.02)``.
    Options left out take the table's defaults; ``kwargs={...}`` goes to the constructor as it is."""
    resolved = resolve_named(name, lr, weight_decay, **options)
    return build_optimizer(param_groups(model, resolved.weight_decay, decay_policy, trust_policy), resolved, lr)


def optimizer_from_cfg(model: nn.Module, optim_cfg, lr: float, resolved: Optional[Resolved] = None):
    resolved = resolved or resolve(optim_cfg)
    groups = param_groups(model, resolved.weight_decay, optim_cfg.weight_decay_policy, optim_cfg.trust_ratio_policy)
    return build_optimizer(groups, resolved, lr)


def record(optimizer: torch.optim.Optimizer, resolved: Resolved, lr: float) -> Dict[str, Any]:
    """What config.yaml records under derived.optimizer: the values read back from the constructed optimizer."""
    e = resolved.entry
    defaults = optimizer.defaults
    reached = {}
    for key in list(resolved.options) + list(e.fixed) + list(resolved.kwargs):
        kw = e.kwarg(key) if key in resolved.options else key
        if kw in defaults:
            v = defaults[kw]
            reached[kw] = list(v) if isinstance(v, tuple) else v
    return dict(name=e.name, label=e.label, family=e.family, source=e.source,
                base_lr=resolved.base_lr, lr=lr, lr_scaling=resolved.lr_scaling, weight_decay=resolved.weight_decay,
                weight_decay_kind=e.weight_decay_kind, trust_ratio=e.trust_ratio, options=reached,
                ignored=resolved.ignored, sources=resolved.sources, defaults_from=e.defaults_from)


def table_rows() -> List[Dict[str, Any]]:
    """The table as plain rows (ssl-bocb optimizers, docs/optimizers.md)."""
    rows = []
    for e in TABLE.values():
        row = dataclasses.asdict(e)
        row["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in e.options.items()}
        row["family_name"] = FAMILIES[e.family]
        rows.append(row)
    return rows
