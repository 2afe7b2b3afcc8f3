"""Sweep files and their plan: one YAML file -> the list of cells, each a fully resolved, named, hashed run.

A sweep file (``configs/sweeps/*.yaml``)::

    name: cpu_mini                      # default: the file's name
    output_dir: runs/sweeps/cpu_mini    # default: runs/sweeps/<name>
    recipe: [configs/quickstart.yaml]   # base recipe file(s) of every cell
    overrides: [data.subset=500]        # key=value for every cell
    axes:                               # in order; the product of their values, less `exclude`
      backbone:                         # value name -> overlay file(s) and / or key=value overrides
        resnet18: [model.backbone=resnet18]
        vit: configs/cifar10_vit_tiny.yaml
      optimizer: {key: optim.name, values: [sgd, lars]}    # shorthand: one key, the values are the names
      frozen-patch:
        "off": configs/ablations/patch_trained.yaml
        "on": {config: configs/ablations/patch_frozen.yaml, overrides: [optim.grad_clip=0]}
    exclude: [{backbone: resnet18, frozen-patch: "on"}]
    grid: {lars: {base_lr: [0.3, 1.0]}}   # optional lr / wd (any optim key) grid for cells of that optimizer
    seeds: [0, 1]
    stages:                              # evaluations after pretraining, each with its eval config
      knn: {config: configs/eval/cifar10.yaml, overrides: [test_subset=100]}
      linprobe: {overrides: [linear.epochs=30]}
    resources: {parallel: 2, threads: 1}
    results: studies/cpu_mini/results.csv  # optional: a results table kept in the repository (committed)

With ``results``, ``collect`` (and ``run``, after every finished cell) also writes the table there (a path relative
to the repository), and a cell whose row in that table has its hash and its stages' hashes counts as done
(``committed``) without its folder: a study committed from one machine is not run again on another.

Precedence inside a cell: recipe files < the axes' overlay files < ``overrides`` < the axes' key=value overrides <
the grid point < the seed. A cell's name joins its axis values (``value`` when it reads alone, ``axis=value`` when
it is a switch such as on / off or a number), its grid point and its seed: ``resnet18__lars__s0``. Its hash is the
SHA-256 of the resolved pretraining config less the keys that only say where and how fast it runs (paths, workers,
logging, checkpoint cadence) and less the values equal to the schema's defaults; the folder is ``<output_dir>/cells/<name>-<hash8>``, so editing a value that changes
the result makes a new cell, and the same file plans the same cells on every machine.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from .. import config, recipes
from ..errors import UserError
from . import select

STAGES = ("knn", "linprobe", "finetune", "val_knn", "val_linprobe")
# The validation stages: kNN / probe on the images data.holdout_per_class keeps out of the train split.
VAL_STAGES = {"val_knn": "knn", "val_linprobe": "linprobe"}
# Keys that say where or how fast a run goes, not what it computes: left out of the hashes.
PRETRAIN_MACHINE_KEYS = ("output_dir", "resume", "overwrite", "data.root", "data.cache_dir", "data.download",
                         "data.num_workers", "train.log_every", "train.save_every", "train.save_every_steps",
                         "train.keep_checkpoints", "train.stop_at_step", "train.cpu")
EVAL_MACHINE_KEYS = ("checkpoint", "output_dir", "overwrite", "data.root", "data.cache_dir", "data.download",
                     "data.num_workers", "batch_size", "cache_features", "cpu", "finetune.resume",
                     "finetune.save_every")
# Data keys an evaluation stage takes from its cell's pretraining config unless the stage sets them.
INHERITED_DATA_KEYS = ("name", "root", "cache_dir", "image_size", "mean", "std", "train_split", "test_split",
                       "fake_per_class", "fake_classes", "num_workers", "holdout_per_class")
SWITCH_VALUES = {"on", "off", "true", "false", "yes", "no", "none", "null"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
SHORT_KEYS = {"base_lr": "lr", "weight_decay": "wd"}


@dataclass
class SlurmResources:
    # SLURM partition, account, QoS and constraint (empty: the cluster's default).
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    # Memory per job in GB; 0 = the partition's default.
    mem_gb: int = 0
    # Further submitit slurm_* parameters, e.g. {exclude: node12}.
    additional: Dict[str, Any] = field(default_factory=dict)
    # Requeues after reaching the time limit, per job (submitit's max_num_timeout); preemptions requeue regardless.
    max_requeues: int = 1000
    # Grace time: SLURM signals the job this many seconds before its time limit (sbatch --signal).
    signal_delay_s: int = 120
    # How long a stopping stage may take to write its checkpoint before it is killed; 0 = the grace time less 15 s.
    # Always bounded by the grace time less 15 s, which the requeue itself needs.
    stop_wait_s: int = 0


@dataclass
class Resources:
    # Cells at once: the local pool size, and the SLURM array's parallelism.
    parallel: int = 1
    # torch / OpenMP threads per process; 0 = the machine's cores / (parallel x processes).
    threads: int = 0
    # Processes per cell (> 1: one `accelerate launch --multi_gpu --num_processes N` per stage).
    processes: int = 1
    # GPUs per cell (local: the pool hands out CUDA_VISIBLE_DEVICES; SLURM: gpus per node).
    gpus: int = 0
    # data.num_workers per process; null = the recipe's.
    workers: Optional[int] = None
    # SLURM time limit per job in minutes; a job that reaches it is requeued and continues from the checkpoint.
    time_limit_min: int = 120
    slurm: SlurmResources = field(default_factory=SlurmResources)


@dataclass
class SweepConfig:
    name: str = ""
    output_dir: str = ""
    recipe: List[str] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)
    axes: Dict[str, Any] = field(default_factory=dict)
    exclude: List[Any] = field(default_factory=list)
    grid: Dict[str, Any] = field(default_factory=dict)
    seeds: List[int] = field(default_factory=lambda: [0])
    stages: Dict[str, Any] = field(default_factory=dict)
    # Choose each pair's grid point on a validation stage, then run the test stages and the other seeds there
    # (ssl_bocb/sweep/select.py): {metric: val_knn_top1, stages: [knn], extend: 2}.
    select: Dict[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    results: str = ""


@dataclass
class Part:
    """What one axis value (or the grid, or the seed) adds to a cell."""
    files: List[str] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)


@dataclass
class Stage:
    name: str
    files: List[str]
    overrides: List[str]
    hash: str


@dataclass
class Cell:
    name: str
    hash: str
    folder: str
    labels: Dict[str, str]              # axis -> value name, then the grid keys and 'seed'
    files: List[str]
    overrides: List[str]
    stages: List[Stage]
    values: Dict[str, Any] = field(default_factory=dict)  # resolved keys worth a column (optimizer, lr, ...)
    committed: Optional[Dict[str, str]] = None  # its row in the sweep's committed results table, when it is there
    committed_any: Optional[Dict[str, str]] = None  # its row there whatever its stages (a grid point chosen later)

    @property
    def id(self) -> str:
        return os.path.basename(self.folder)

    @property
    def stage_hashes(self) -> str:
        """The stages and their config hashes, as the results table records them."""
        return " ".join(f"{s.name}:{s.hash}" for s in self.stages)


@dataclass
class Plan:
    name: str
    path: str
    output_dir: str
    axes: List[str]
    cells: List[Cell]
    resources: Resources
    extra: List[str]                   # key=value given on the command line, for every cell
    seeds: Optional[List[int]] = None  # --seeds given on the command line (None: the file's seeds)
    results: str = ""                  # the committed results table (absolute path), or ""
    # with a select block: per pair (its labels less grid and seed joined by "__"), the grid points read so far,
    # the chosen point and where it lies (select.py)
    selection: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def group(self, cell: "Cell") -> str:
        """The pair a cell belongs to: its axis labels (not its grid point or seed)."""
        return _group_name({a: cell.labels[a] for a in self.axes})

    def find(self, cell_id: str) -> Cell:
        for c in self.cells:
            if cell_id in (c.id, c.name):
                return c
        raise UserError(f"no cell '{cell_id}' in sweep {self.name}; `tools/sweep.py plan` lists them")


def _prune(data: Dict[str, Any], defaults: Dict[str, Any]) -> Dict[str, Any]:
    """``data`` less the values equal to the schema's defaults (recursively)."""
    out = {}
    for key, value in data.items():
        default = defaults.get(key, object())
        if isinstance(value, dict) and isinstance(default, dict):
            sub = _prune(value, default)
            if sub:
                out[key] = sub
        elif value != default:
            out[key] = value
    return out


@functools.lru_cache(maxsize=None)
def _defaults(schema) -> Dict[str, Any]:
    return config.to_dict(OmegaConf.structured(schema))


def config_hash(data: Dict[str, Any], schema, drop: Tuple[str, ...]) -> str:
    """SHA-256 of a resolved config: the machine keys ``drop`` left out, and every value equal to the schema's
    default left out too, so that a key added to the schema later (with a default that changes nothing) leaves the
    hashes, and so the finished cells, of existing sweeps as they were."""
    data = json.loads(json.dumps(data))
    for key in drop:
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    data = _prune(data, _defaults(schema))
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _find_file(path: str, base: str, where: str) -> str:
    """A recipe file of the sweep: as given, beside the sweep file, or a shipped recipe (ssl_bocb.recipes)."""
    try:
        return recipes.find(path, beside=[base])
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _part(spec: Any, base: str, where: str) -> Part:
    """An axis value: null, 'file.yaml', 'key=value', a list of those, or {config: ..., overrides: [...]}."""
    if spec is None:
        return Part()
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, dict):
        unknown = set(spec) - {"config", "overrides"}
        if unknown:
            raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; an axis value takes config and overrides")
        cfgs = spec.get("config") or []
        cfgs = [cfgs] if isinstance(cfgs, str) else list(cfgs)
        overrides = list(spec.get("overrides") or [])
        bad = [o for o in overrides if not isinstance(o, str) or "=" not in o]
        if bad:
            raise UserError(f"{where}: override {bad[0]!r} is not of the form key=value")
        return Part([_find_file(c, base, where) for c in cfgs], overrides)
    if isinstance(spec, list):
        part = Part()
        for item in spec:
            if not isinstance(item, str):
                raise UserError(f"{where}: {item!r} is neither a config file nor a key=value override")
            if "=" in item:
                part.overrides.append(item)
            elif item.endswith((".yaml", ".yml")):
                part.files.append(_find_file(item, base, where))
            else:
                raise UserError(f"{where}: {item!r} is neither a .yaml file nor a key=value override")
        return part
    raise UserError(f"{where}: {spec!r} is not a value spec (a file, key=value, a list of them, or "
                    f"{{config, overrides}})")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(v, "g")
    return str(v)


def _axis_values(axis: str, spec: Any, base: str) -> List[Tuple[str, Part]]:
    where = f"axis '{axis}'"
    if not NAME_RE.match(axis):
        raise UserError(f"{where}: an axis name takes letters, digits and . _ + - only")
    if isinstance(spec, dict) and set(spec) == {"key", "values"}:
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise UserError(f"{where}: values must be a non-empty list")
        return [(_fmt(v), Part([], [f"{spec['key']}={_fmt(v)}"])) for v in spec["values"]]
    if not isinstance(spec, dict) or not spec:
        raise UserError(f"{where} must map value names to specs (or be {{key: K, values: [...]}})")
    out = []
    for value, vspec in spec.items():
        value = _fmt(value)
        if not NAME_RE.match(value):
            raise UserError(f"{where}: value name '{value}' takes letters, digits and . _ + - only")
        out.append((value, _part(vspec, base, f"{where}, value '{value}'")))
    return out


def _label(axis: str, value: str) -> str:
    """The value alone when it reads alone; axis=value for switches and numbers."""
    alone = value.lower() not in SWITCH_VALUES and not re.fullmatch(r"[-+0-9.e]+", value)
    return value if alone else f"{axis}={value}"


def _group_name(labels: Dict[str, str]) -> str:
    """A pair's name: its axis labels joined, as cell names join them (without grid point or seed)."""
    return "__".join(_label(a, v) for a, v in labels.items())


def _excluded(labels: Dict[str, str], rules: List[Dict[str, Any]]) -> bool:
    for rule in rules:
        if all(labels.get(a) in ([_fmt(x) for x in v] if isinstance(v, list) else [_fmt(v)]) for a, v in rule.items()):
            return True
    return False


def load_sweep(path: str, extra: List[str] = ()) -> Tuple[SweepConfig, str]:
    path = recipes.find(path, what="sweep file")  # a path, or a shipped sweep's name (sweeps/cpu_mini)
    cfg = config.load(SweepConfig, [path], [], open_keys=("axes", "grid", "stages", "select", "resources.slurm.additional"))
    sweep = OmegaConf.to_object(cfg)
    if not sweep.name:
        sweep.name = os.path.splitext(os.path.basename(path))[0]
    if not sweep.output_dir:
        sweep.output_dir = os.path.join("runs", "sweeps", sweep.name)
    r = sweep.resources
    for key in ("parallel", "processes", "time_limit_min"):
        if getattr(r, key) < 1:
            raise UserError(f"resources.{key} must be >= 1, got {getattr(r, key)}")
    for key in ("threads", "gpus"):
        if getattr(r, key) < 0:
            raise UserError(f"resources.{key} must be >= 0, got {getattr(r, key)}")
    for key in ("max_requeues", "stop_wait_s"):
        if getattr(r.slurm, key) < 0:
            raise UserError(f"resources.slurm.{key} must be >= 0, got {getattr(r.slurm, key)}")
    if not 1 <= r.slurm.signal_delay_s < r.time_limit_min * 60:
        raise UserError(f"resources.slurm.signal_delay_s must be >= 1 and below the time limit "
                        f"({r.time_limit_min * 60} s), got {r.slurm.signal_delay_s}")
    if not sweep.seeds:
        raise UserError("seeds must list at least one seed")
    bad = [o for o in list(sweep.overrides) + list(extra) if "=" not in o]
    if bad:
        raise UserError(f"override '{bad[0]}' is not of the form key=value")
    return sweep, os.path.dirname(os.path.abspath(path))


def _stage_config(stage: str, spec: Any, base: str, pre_cfg) -> Tuple[List[str], List[str]]:
    if stage not in STAGES:
        raise UserError(f"unknown stage '{stage}' in stages; choose from {', '.join(STAGES)} (pretraining always "
                        f"runs first)")
    part = _part(spec, base, f"stage '{stage}'")
    inherited = []
    for key in INHERITED_DATA_KEYS:
        value = pre_cfg.data[key]
        inherited.append(f"data.{key}={json.dumps(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)}")
    if stage in VAL_STAGES:
        if not pre_cfg.data.holdout_per_class:
            raise UserError(f"stage '{stage}' evaluates on the validation split, but the cells hold none out; set "
                            f"data.holdout_per_class (e.g. 500) in the sweep's overrides")
        return part.files, inherited + part.overrides + ["data.test_split=holdout"]
    return part.files, inherited + part.overrides


def plan(path: str, extra: List[str] = (), seeds: Optional[List[int]] = None) -> Plan:
    """Expand a sweep file into its cells (validating every cell's configs); ``extra`` key=value apply to all;
    ``seeds`` replaces the file's seeds (a cell's name and hash do not depend on the other seeds, so adding seeds
    later reuses the cells already run)."""
    sweep, base = load_sweep(path, extra)
    if seeds is not None:
        if not seeds or len(set(seeds)) != len(seeds):
            raise UserError(f"--seeds must list distinct seeds, got {seeds}")
        sweep.seeds = list(seeds)
    recipe = [_find_file(r, base, "recipe") for r in sweep.recipe]
    axes = [(a, _axis_values(a, spec, base)) for a, spec in sweep.axes.items()]
    names = [a for a, _ in axes]
    known = {a: [v for v, _ in vals] for a, vals in axes}
    for rule in sweep.exclude:
        if not isinstance(rule, dict) or not set(rule) <= set(names):
            raise UserError(f"exclude rule {rule!r} must map axis names ({', '.join(names)}) to values")
        for a, v in rule.items():
            missing = [x for x in (v if isinstance(v, list) else [v]) if _fmt(x) not in known[a]]
            if missing:
                raise UserError(f"exclude rule {rule!r}: axis '{a}' has no value {_fmt(missing[0])!r} (it has "
                                f"{', '.join(known[a])})")
    for opt, keys in sweep.grid.items():
        if not isinstance(keys, dict) or not all(isinstance(v, list) and v for v in keys.values()):
            raise UserError(f"grid.{opt} must map optim keys to non-empty lists, e.g. {{base_lr: [0.1, 0.3]}}")
    sel = select.parse(sweep.select, list(sweep.stages), sweep.grid)
    results = os.path.abspath(sweep.results) if sweep.results else ""  # relative to the folder it runs from
    committed = read_committed(results) if results else {}
    cells, seen, used, selection = [], {}, set(), {}
    combos = itertools.product(*[vals for _, vals in axes]) if axes else [()]
    for combo in combos:
        labels = {a: v for a, (v, _) in zip(names, combo)}
        if _excluded(labels, sweep.exclude):
            continue
        files = recipe + [f for _, part in combo for f in part.files]
        overrides = list(sweep.overrides) + [o for _, part in combo for o in part.overrides] + list(extra)
        where = "cell " + _group_name(labels)
        try:
            probe = config.load(config.PretrainConfig, files, overrides)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        key, grid = _grid_for(sweep.grid, labels, probe.optim.name)
        if grid:
            used.add(key)

        def make(point, seed, stage_names=None, labels=labels, overrides=overrides, files=files, where=where):
            cell_labels, cell_overrides = dict(labels), list(overrides)
            for k, v in point.items():
                cell_labels[SHORT_KEYS.get(k, k)] = _fmt(v)
                cell_overrides.append(f"optim.{k}={_fmt(v)}")
            cell_labels["seed"] = str(seed)
            cell_overrides.append(f"seed={seed}")
            c = _cell(sweep, base, files, cell_overrides, cell_labels, where, seen, stage_names)
            c.committed_any = committed.get(f"{c.name}-{c.hash}")
            return c

        if sel is not None and grid:
            cells.extend(_selected_cells(sel, sweep, key, grid, make, selection, _group_name(labels), seen))
            continue
        points = [dict(zip(grid, p)) for p in itertools.product(*grid.values())] if grid else [{}]
        for point in points:
            for seed in sweep.seeds:
                cells.append(make(point, seed))
    if not cells:
        raise UserError(f"sweep {sweep.name} has no cells (every combination is excluded)")
    unused = [o for o in sweep.grid if o not in used]
    if unused:
        raise UserError(f"grid.{unused[0]} matches no cell's optimizer (grid keys are an optimizer name, or "
                        f"<backbone value>:<optimizer>; the cells use {', '.join(sorted({c.values['optimizer'] for c in cells}))})")
    for c in cells:
        row = committed.get(f"{c.name}-{c.hash}")
        if row is not None and row.get("stage_hashes", "") == c.stage_hashes and row.get("state") == "done":
            c.committed = row
    return Plan(sweep.name, os.path.abspath(path), sweep.output_dir, names, cells, sweep.resources, list(extra),
                None if seeds is None else list(seeds), results, selection)


def _grid_for(grid: Dict[str, Any], labels: Dict[str, str], optimizer: str) -> Tuple[str, Dict[str, Any]]:
    """The grid of a combination: ``<backbone value>:<optimizer>`` when the file has it, else ``<optimizer>``."""
    specific = f"{labels.get('backbone')}:{optimizer}"
    if specific in grid:
        return specific, grid[specific]
    return optimizer, grid.get(optimizer, {})


def _selected_cells(sel, sweep, key: str, grid: Dict[str, Any], make, selection: Dict, group: str,
                    seen: Dict[str, str]) -> List["Cell"]:
    """The cells of one pair under ``select``: its grid points at the first seed (the validation stages), points
    added past an end while the best lies there, then the chosen point's test stages and other seeds."""
    if len(grid) != 1:
        raise UserError(f"grid.{key}: select chooses along one key (e.g. base_lr), got {', '.join(grid)}")
    name = next(iter(grid))
    values = [float(v) for v in grid[name]]
    if len(values) < 3:
        raise UserError(f"grid.{key}.{name}: select needs at least 3 points to bracket a choice, got {len(values)}")
    val_stages = [s for s in sweep.stages if s not in sel.stages]
    seed0 = sweep.seeds[0]
    points = {v: make({name: v}, seed0, val_stages) for v in values}
    added = {select.LOW_END: 0, select.HIGH_END: 0}
    while True:
        scores = {v: select.cell_score(c, sel.metric) for v, c in points.items()}
        if any(x is None for x in scores.values()):
            best, where = None, select.PENDING
            break
        best, where = select.choose(scores)
        if where == select.BRACKETED or added[where] >= sel.extend:
            break
        v = select.next_point(list(points), where)
        points[v] = make({name: v}, seed0, val_stages)
        added[where] += 1
    out = [points[v] for v in sorted(points)]
    selection[group] = dict(key=name, grid=key, points={_fmt(v): scores[v] for v in sorted(points)},
                            chosen=None if best is None else _fmt(best), where=where,
                            added=sorted(_fmt(v) for v in points if v not in values))
    if where == select.BRACKETED:
        seen.pop(points[best].hash)  # the chosen grid cell again, now with every stage
        out[sorted(points).index(best)] = make({name: best}, seed0)
        out.extend(make({name: best}, s) for s in sweep.seeds[1:])
    return out


def read_committed(path: str) -> Dict[str, Dict[str, str]]:
    """The rows of a committed results table by cell id (``<name>-<hash8>``); {} when there is none."""
    import csv
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, newline="") as f:
            return {f"{r['cell']}-{r['hash']}": r for r in csv.DictReader(f) if r.get("cell") and r.get("hash")}
    except (OSError, csv.Error, KeyError) as e:
        raise UserError(f"cannot read the committed results table '{path}' ({e}); restore it from git") from None


def _cell(sweep, base, files, overrides, labels, where, seen, stage_names=None) -> Cell:
    try:
        cfg = config.load(config.PretrainConfig, files, overrides)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    digest = config_hash(config.to_dict(cfg), config.PretrainConfig, PRETRAIN_MACHINE_KEYS)[:8]
    parts = [_label(a, v) for a, v in labels.items() if a != "seed"] + [f"s{labels['seed']}"]
    name = "__".join(parts)
    if digest in seen:
        raise UserError(f"cells {seen[digest]} and {name} resolve to the same pretraining config; drop one value or "
                        f"add an exclude rule")
    seen[digest] = name
    folder = os.path.join(sweep.output_dir, "cells", f"{name}-{digest}")
    stages = []
    for stage, spec in sweep.stages.items():
        if stage_names is not None and stage not in stage_names:
            continue
        sfiles, soverrides = _stage_config(stage, spec, base, cfg)
        soverrides = soverrides + [f"seed={labels['seed']}"]
        try:
            ecfg = config.load(config.EvalConfig, sfiles, soverrides)
        except UserError as e:
            raise UserError(f"{where}, stage {stage}: {e}") from None
        stages.append(Stage(stage, sfiles, soverrides, config_hash(config.to_dict(ecfg), config.EvalConfig, EVAL_MACHINE_KEYS)[:8]))
    values = dict(backbone=cfg.model.backbone, optimizer=cfg.optim.name, seed=cfg.seed, epochs=cfg.train.epochs,
                  batch_size=cfg.train.batch_size)
    return Cell(name, digest, folder, labels, files, overrides, stages, values)


def describe(p: Plan) -> Dict[str, Any]:
    """A JSON-able description of the plan (``tools/sweep.py plan --json``)."""
    return dict(name=p.name, output_dir=p.output_dir, axes=p.axes, resources=dataclasses.asdict(p.resources),
                cells=[dict(name=c.name, hash=c.hash, folder=c.folder, labels=c.labels,
                            stages=["pretrain"] + [s.name for s in c.stages]) for c in p.cells])
