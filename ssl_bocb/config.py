"""Typed configuration: dataclasses -> OmegaConf structured config in struct mode.

``load(schema, files, overrides)`` merges YAML recipes (later files win) and ``key=value`` overrides onto the
schema's defaults. A misspelt key fails with the nearest valid key; a wrong type names the key and the type it
expects; out-of-range values fail in :func:`validate`. Every error is a :class:`~ssl_bocb.errors.UserError`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import UserError

DATASETS = ("cifar10", "cifar100", "stl10", "imagefolder", "imagenette", "fake")


@dataclass
class DataConfig:
    # Which dataset: cifar10 | cifar100 | stl10 | imagefolder | imagenette | fake (synthetic, for tests).
    name: str = "cifar10"
    # Folder holding the data: native torchvision files, an unpacked ImageFolder tree (<root>/cifar10/train/..)
    # or an archive such as cifar10-jpeg.tar.gz. Empty: $SSL_BOCB_DATA, else ./data.
    root: str = ""
    # Let torchvision download cifar10 / cifar100 / stl10 into `root` when they are missing (needs internet).
    download: bool = False
    # Where archives are unpacked (once). Empty: $SSL_BOCB_CACHE, else ~/.cache/ssl_bocb.
    cache_dir: str = ""
    # Images per class, chosen deterministically (first N of each class in file order); 0 = all images.
    subset: int = 0
    # Side of the square crops fed to the network.
    image_size: int = 32
    # RandomResizedCrop lower scale bound: 0.08 ViT (MoCo v3 paper), 0.2 ResNet recipes.
    crop_min: float = 0.2
    # Gaussian blur (view 1 always, view 2 with p=0.1). null = auto: on for image_size >= 64, off for
    # 32 px data, where a blur erases most of the image (common small-image practice, e.g. solo-learn).
    blur: Optional[bool] = None
    # Solarize on view 2 with p=0.2 (BYOL / MoCo v3 asymmetry).
    solarize: bool = True
    # Normalisation; null = the dataset's own statistics (ImageNet statistics for folders).
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    # Split names for imagefolder / stl10 (pretraining uses train_split). test_split=holdout evaluates on the
    # validation images that holdout_per_class keeps out of train_split.
    train_split: str = "train"
    test_split: str = "test"
    # Validation split: the last N images of each class of train_split (in file order) are held out. Pretraining,
    # the kNN bank, the probe's training set and data.subset never see them; data.test_split=holdout evaluates on
    # them (results go to val_<stage>_metrics.json), and the kNN monitor reads them instead of the test split, so
    # that every choice can be made without the test split. 0 = no validation split.
    holdout_per_class: int = 0
    # DataLoader worker processes per training process (the crops and PIL paths; batched needs none). null = the
    # CPUs available to this process divided by the processes on its node.
    num_workers: Optional[int] = None
    # Pretraining's two-view data path (ssl_bocb/data/pipeline.py). batched: decoded uint8 images held in memory,
    # both views cut and augmented batch-wise on the training device; crops: workers decode (reduced-scale JPEG
    # decoding) and crop, the device does colour / blur / solarize / normalisation batch-wise; dali: NVIDIA DALI
    # reads and decodes the crops (on the GPU; pip install -e ".[dali]"), the same device ops after it; pil:
    # torchvision's per-image PIL transforms in workers. auto: batched when the images share one size <= image_size
    # and fit in cache_max_gb; else dali on a CUDA device with DALI installed; else crops. The log says why.
    pipeline: str = "auto"
    # The most memory the decoded images of the batched path may take (GB).
    cache_max_gb: float = 8.0
    # Images per class for the synthetic `fake` dataset, and its number of classes.
    fake_per_class: int = 16
    fake_classes: int = 4


@dataclass
class ModelConfig:
    # Any timm model name (created with num_classes=0), e.g. resnet18, resnet50, vit_small_patch16_224.
    backbone: str = "resnet18"
    # Extra keyword arguments for timm.create_model, e.g. {img_size: 32, patch_size: 4, drop_path_rate: 0.1}.
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    # ResNet only: 3x3 stride-1 first conv and no max-pool, the usual CIFAR stem for 32 px inputs.
    cifar_stem: bool = False
    # ViT only: freeze the random patch projection (MoCo v3 "stop-grad conv1", sec. 4.2); excluded from the
    # optimizer.
    frozen_patch_embed: bool = False
    # ViT only: position embedding: sincos (fixed 2D, MoCo v3) | learned (timm's) | none.
    pos_embed: str = "sincos"
    # ViT only: token (class token, final LayerNorm) | avg (global average pooling of the patch tokens, with no
    # class token and no final LayerNorm: the MoCo v3 ablation found the norm must go with the class token).
    pool: str = "token"
    # ViT only: the norm before each block's MLP: layernorm | batchnorm (MoCo v3 ablation, about +1 point; the
    # norm before attention stays LayerNorm).
    mlp_norm: str = "layernorm"
    # ViT only: a norm on the patch projection: none | batchnorm (over its output channels) | weightnorm (on its
    # weight). MoCo v3 found neither removes the instability that freezing it removes.
    patch_norm: str = "none"
    # ViT only: MoCo v3 initialisation (qkv split xavier, xavier Linear, cls token N(0, 1e-6), patch proj).
    moco_init: bool = True
    # ResNet: zero-init the last BN gamma of each residual block (MoCo v3 / Goyal et al. 2017).
    zero_init_residual: bool = True
    # Projector depth; null = 2 for CNNs, 3 for ViTs (MoCo v3).
    proj_layers: Optional[int] = None
    # Predictor depth; 0 removes the predictor (MoCo v3 ablation: about -1 point).
    pred_layers: int = 2
    # Hidden width of the projector and predictor MLPs (4096 in MoCo v3).
    hidden_dim: int = 4096
    # Output dimension of projector and predictor (256 in MoCo v3).
    out_dim: int = 256
    # BatchNorm after each hidden Linear of the projector / predictor (MoCo v3 heads have it; removing it is
    # the BN-head ablation, about -2 points).
    proj_hidden_bn: bool = True
    pred_hidden_bn: bool = True
    # BatchNorm1d(affine=False) after the last Linear: projector always in MoCo v3; predictor only for ViT.
    # null = the MoCo v3 default for the backbone family.
    proj_last_bn: Optional[bool] = None
    pred_last_bn: Optional[bool] = None


@dataclass
class MocoConfig:
    # Softmax temperature tau: 0.2 ViT, 1.0 ResNet-50 in the published recipes.
    temperature: float = 0.2
    # Momentum-encoder EMA coefficient m0 (0.99 best in the paper, 0.996 for long ResNet runs). 0 = the m = 0
    # ablation: no momentum encoder; keys are the base encoder's projector outputs under stop-gradient.
    momentum: float = 0.99
    # cosine: m goes from m0 to 1 over training (published recipes) | constant.
    momentum_schedule: str = "cosine"


@dataclass
class SamConfig:
    # SAM neighbourhood radius rho (Foret et al. 2021: 0.05; ViTs 0.05-0.2, Chen et al. 2022); 0 = off. Two
    # forward / backward passes per step around any optimizer of the table.
    rho: float = 0.0
    # ASAM (Kwon et al. 2021): the perturbation scaled elementwise by |w|, rho then typically 10x larger.
    adaptive: bool = False


@dataclass
class OptimConfig:
    # Any name of the optimizer table (`python tools/optimizers.py`: the 20 BOCB optimizers, Muon, ADOPT, MARS,
    # LaProp, Kron), or another timm.optim name (then base_lr and weight_decay must be set).
    name: str = "adamw"
    # The keys below set to null take, in this order, optim.per_optimizer.<name>.<key> (a recipe's tuning for that
    # optimizer) and then the table's default for the chosen optimizer, so that swapping optim.name swaps them all.
    # Learning rate per 256 images; the actual lr follows lr_scaling.
    base_lr: Optional[float] = None
    # linear: lr = base_lr * batch / 256 (Goyal et al.) | sqrt: base_lr * sqrt(batch / 256) | none.
    lr_scaling: Optional[str] = None
    weight_decay: Optional[float] = None
    # SGD / LARS / RMSProp / Muon / Kron momentum, and Nesterov where the optimizer has it.
    momentum: Optional[float] = None
    nesterov: Optional[bool] = None
    # Adam-family betas (three for Adan) and eps.
    betas: Optional[List[float]] = None
    eps: Optional[float] = None
    # LARS trust coefficient eta (0.001 ImageNet batch 4096; 0.02 with trust_clip for small batches, solo-learn).
    trust_coefficient: Optional[float] = None
    # LARC / LAMBC: clip the trust ratio so the local lr never exceeds the global lr.
    trust_clip: Optional[bool] = None
    # Per-optimizer settings a recipe tuned, used only when that optimizer is chosen, e.g.
    # {lars: {base_lr: 0.3, trust_coefficient: 0.02}, adamw: {weight_decay: 0.05}}.
    per_optimizer: Dict[str, Any] = field(default_factory=dict)
    # Which tensors get weight decay: all (the reference MoCo v3 AdamW) | exclude_1d (not biases and norm scales)
    # | exclude_1d_tokens (also not the cls token, position embedding and timm's no_weight_decay() names).
    weight_decay_policy: str = "exclude_1d_tokens"
    # Which tensors get the layer-wise trust ratio of LARS / LAMB: exclude_1d (SPEC: ndim <= 1 excluded) | all.
    trust_ratio_policy: str = "exclude_1d"
    # Final lr of the cosine schedule, as a fraction of the peak lr.
    min_lr_ratio: float = 0.0
    # Weight decay at the end of training (cosine from weight_decay); null = constant.
    weight_decay_end: Optional[float] = None
    # Gradient clipping: norm (global L2 norm <= grad_clip) | first_layer (only the first layer's gradient norm
    # <= grad_clip: a ViT's patch projection, a CNN's first conv) | agc (NFNets unit-wise ||g|| / ||w|| <= grad_clip).
    grad_clip_mode: str = "norm"
    # Clipping threshold (max norm, or AGC lambda such as 0.01-0.16); 0 = off.
    grad_clip: float = 0.0
    sam: SamConfig = field(default_factory=SamConfig)
    # Extra keyword arguments passed to the optimizer's constructor as they are.
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 100
    # Linear warmup length in epochs (may be fractional); then half-cycle cosine, per iteration.
    warmup_epochs: float = 10.0
    # Global batch size over all processes; must divide by the number of processes.
    batch_size: int = 256
    # Exact large batches on few devices: each step computes every key of the batch first (momentum encoder, no
    # gradient), then the queries in this many chunks, each against all keys, gradients accumulated; one optimizer
    # step. Exact (to round-off) without BatchNorm; with BatchNorm each chunk normalises over its own samples, as
    # that many processes without SyncBN would. Must divide the per-process batch. Not with SAM or Sophia.
    query_chunks: int = 1
    # auto | no | bf16 | fp16, through Accelerate. auto: bf16 where the device computes it natively (GPUs with bf16,
    # CPUs with AVX-512 BF16 / AMX), else fp32; bf16 on a CPU without them is emulated, tens of times slower.
    mixed_precision: str = "auto"
    # Channels-last memory format for the model and its inputs. null = auto: on for convolutional backbones (on the
    # CPU it was measured faster, see README "Performance"), off for ViTs.
    channels_last: Optional[bool] = None
    # torch.compile the encoders, projector and predictor. null = auto: off (compiling cost 50-80 s on 2 CPU cores
    # for no gain over channels-last; not measured on GPUs). Not with Hessian optimizers (Sophia).
    compile: Optional[bool] = None
    # Convert BatchNorm to SyncBatchNorm when more than one process runs (MoCo v3 does).
    sync_bn: bool = True
    # Save a checkpoint every N epochs (and always at the end).
    save_every: int = 10
    # Also save every N optimisation steps (mid-epoch resume points); 0 = off.
    save_every_steps: int = 0
    # Keep only the newest N checkpoints; 0 = keep all.
    keep_checkpoints: int = 2
    # Stop this invocation after this global step (a checkpoint is written); 0 = run to the end. Useful to
    # split a long run into jobs, or to time a few steps.
    stop_at_step: int = 0
    # Log step scalars every N steps.
    log_every: int = 10
    # When the loss and gradient norms are read off the device. step: every step; a non-finite step is skipped
    # before it is applied. log: only at log steps, checkpoints and epoch ends (no host sync per step); a window
    # with a non-finite step is undone as a whole from a device copy of the state. auto: log on GPUs, step elsewhere
    # (and with fp16, whose loss scaler decides per step).
    host_reads: str = "auto"
    # Force the CPU even when an accelerator is present.
    cpu: bool = False


@dataclass
class MonitorConfig:
    # Online kNN monitor: every N epochs a kNN top-1 on a fixed labelled subset; 0 = off.
    knn_every: int = 0
    # Labelled images per class for the monitor's train bank and for its queries.
    knn_train_per_class: int = 100
    knn_test_per_class: int = 50
    knn_k: int = 20
    knn_temperature: float = 0.07


@dataclass
class StabilityConfig:
    # Non-finite guard: a step with a non-finite loss or gradient is skipped (no optimizer or momentum-encoder
    # update); after this many in a row the run rolls back to its last good checkpoint.
    nonfinite_patience: int = 3
    # After a rollback the lr is multiplied by this factor for the rest of the run (compounding).
    rollback_lr_factor: float = 0.5
    # Roll back at most this many times; the next divergence stops the run with one line.
    max_rollbacks: int = 2
    # Gradient-norm / loss spike: above spike_factor x the median of the previous spike_window steps (at least
    # spike_min_history of them).
    spike_factor: float = 3.0
    spike_window: int = 20
    spike_min_history: int = 5
    # kNN dip: a monitor reading more than dip_drop points below the best reading before it.
    dip_drop: float = 2.0


@dataclass
class PretrainConfig:
    # Run directory. Empty: runs/<recipe name>-<timestamp>.
    output_dir: str = ""
    seed: int = 0
    # "" start fresh | auto: newest checkpoint in output_dir (fresh if none) | path to a checkpoint folder.
    resume: str = ""
    # Allow reusing an output_dir that holds another run; its old contents are moved to <dir>.old-<time>.
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)


@dataclass
class KnnConfig:
    # Neighbours for the headline number and temperature of the exp(sim / T) vote (DINO: k=20, T=0.07).
    k: int = 20
    temperature: float = 0.07
    # Every k reported in the table (DINO reports 10, 20, 100, 200).
    ks: List[int] = field(default_factory=lambda: [10, 20, 100, 200])
    # auto (faiss when installed, on the GPU when possible) | faiss | torch (chunked matmul).
    backend: str = "auto"
    # Test rows per matmul chunk of the torch backend.
    chunk_size: int = 1024


@dataclass
class LinearConfig:
    # cached: train the head on cached features (fast, no augmentation; default for sweeps) | full: the MoCo v3
    # protocol with RandomResizedCrop + flip through the frozen backbone.
    mode: str = "cached"
    # MoCo v3: 90 epochs, batch 1024, SGD momentum 0.9, wd 0, cosine per epoch, no warmup.
    epochs: int = 90
    batch_size: int = 1024
    # lr per 256 images; null = 0.1 for CNNs, 3.0 for ViTs (MoCo v3), scaled by batch / 256.
    base_lr: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 0.0


def _finetune_optim() -> OptimConfig:
    # DeiT fine-tuning AdamW; other optimizers take the table's pretraining defaults unless set.
    return OptimConfig(name="adamw", per_optimizer={"adamw": {"base_lr": 5e-4, "weight_decay": 0.05}})


@dataclass
class FinetuneConfig:
    epochs: int = 100
    warmup_epochs: float = 5.0
    batch_size: int = 128
    # The fine-tune optimizer (any table name: it is a BOCB axis too). Default AdamW 5e-4 / wd 0.05 (DeiT).
    optim: OptimConfig = field(default_factory=_finetune_optim)
    # ViT layer-wise lr decay (BEiT / MAE); 1.0 = off. Ignored for CNNs.
    layer_decay: float = 0.75
    # ViT: train the position embedding (the DeiT-style transfer recipe), also when pretraining kept it fixed
    # (sin-cos); false keeps it as pretraining had it.
    train_pos_embed: bool = True
    # Stochastic depth rate passed to timm (drop_path_rate).
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    # timm Mixup / CutMix alphas and the probability to apply one of them per batch; 0 = off.
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    # timm auto-augment policy string (RandAugment m9, std 0.5 as in DeiT); empty or null = off. DeiT's "-inc1"
    # variant is not the default: its posterize reaches 0 bits, which current Pillow rejects mid-epoch.
    randaugment: Optional[str] = "rand-m9-mstd0.5"
    # Keep an exponential moving average of the weights and report it too; 0 = off (e.g. 0.9999).
    ema_decay: float = 0.0
    # Checkpoint every N epochs (and at the end); resume as in pretraining.
    save_every: int = 1
    resume: str = ""
    # steps.jsonl interval (loss, lr, gradient norms per layer), as train.log_every.
    log_every: int = 10
    # When the loss and gradient norms are read off the device, as train.host_reads (auto: log on GPUs).
    host_reads: str = "auto"
    # The non-finite guard, rollback and spike / dip rules, as pretraining's stability.* (the dip rule watches
    # the validation top-1 after each epoch).
    stability: StabilityConfig = field(default_factory=StabilityConfig)


@dataclass
class EvalConfig:
    # Pretraining run folder, checkpoint folder or backbone.safetensors; "" = model.backbone at random init.
    checkpoint: str = ""
    # Where results go; "" = the checkpoint's run folder (runs/random-<backbone> without a checkpoint).
    output_dir: str = ""
    # Replace an existing result (the old file is kept as <name>.old-<time>).
    overwrite: bool = False
    seed: int = 0
    # Images per class taken from the test split; 0 = all (data.subset applies to the train split).
    test_subset: int = 0
    # Seed of the random-init backbone evaluated when no checkpoint is given (the random-init floor is read over
    # several: tools/floors.py).
    init_seed: int = 0
    # Batch size of feature extraction, per process.
    batch_size: int = 256
    # Reuse features cached under data.cache_dir for the same weights, data, split and transform.
    cache_features: bool = True
    # auto | no | bf16 | fp16 for feature extraction and fine-tuning, as train.mixed_precision.
    mixed_precision: str = "auto"
    cpu: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    # Used only without a checkpoint (the random-init baseline) and for fine-tuning from scratch.
    model: ModelConfig = field(default_factory=ModelConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


# Allowed values of string keys, checked by validate().
CHOICES = {
    "data.name": DATASETS,
    "data.pipeline": ("auto", "batched", "crops", "dali", "pil"),
    "model.pos_embed": ("sincos", "learned", "none"),
    "model.pool": ("token", "avg"),
    "model.mlp_norm": ("layernorm", "batchnorm"),
    "model.patch_norm": ("none", "batchnorm", "weightnorm"),
    "moco.momentum_schedule": ("cosine", "constant"),
    "optim.lr_scaling": ("linear", "sqrt", "none"),
    "optim.weight_decay_policy": ("all", "exclude_1d", "exclude_1d_tokens"),
    "optim.trust_ratio_policy": ("exclude_1d", "all"),
    "optim.grad_clip_mode": ("norm", "first_layer", "agc"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "train.host_reads": ("auto", "step", "log"),
    "finetune.host_reads": ("auto", "step", "log"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "knn.backend": ("auto", "faiss", "torch"),
    "linear.mode": ("cached", "full"),
    "finetune.optim.lr_scaling": ("linear", "sqrt", "none"),
    "finetune.optim.weight_decay_policy": ("all", "exclude_1d", "exclude_1d_tokens"),
    "finetune.optim.trust_ratio_policy": ("exclude_1d", "all"),
    "finetune.optim.grad_clip_mode": ("norm", "first_layer", "agc"),
}
# Keys that must be > 0 and >= 0.
POSITIVE = ("data.cache_max_gb", "train.epochs", "train.batch_size", "optim.base_lr", "moco.temperature",
            "data.image_size",
            "model.hidden_dim", "model.out_dim", "batch_size", "knn.k", "knn.temperature", "linear.epochs",
            "linear.batch_size", "linear.base_lr", "finetune.epochs", "finetune.batch_size", "finetune.optim.base_lr",
            "finetune.layer_decay", "optim.eps", "finetune.optim.eps", "stability.nonfinite_patience",
            "stability.rollback_lr_factor", "stability.spike_factor", "stability.spike_window",
            "stability.spike_min_history", "train.log_every", "finetune.log_every", "train.query_chunks",
            "finetune.stability.nonfinite_patience", "finetune.stability.rollback_lr_factor",
            "finetune.stability.spike_factor", "finetune.stability.spike_window", "finetune.stability.spike_min_history")
NON_NEGATIVE = ("optim.weight_decay", "train.warmup_epochs", "data.subset", "data.num_workers", "data.holdout_per_class",
                "train.save_every", "train.save_every_steps", "optim.grad_clip", "train.stop_at_step",
                "monitor.knn_every", "test_subset", "init_seed", "linear.weight_decay", "finetune.warmup_epochs",
                "finetune.optim.weight_decay", "finetune.drop_path", "finetune.label_smoothing", "finetune.mixup",
                "finetune.cutmix", "finetune.mixup_prob", "finetune.ema_decay", "optim.sam.rho", "finetune.optim.sam.rho",
                "optim.momentum", "finetune.optim.momentum", "moco.momentum", "optim.trust_coefficient",
                "finetune.optim.weight_decay_end", "optim.weight_decay_end", "finetune.optim.grad_clip",
                "stability.max_rollbacks", "stability.dip_drop", "finetune.stability.max_rollbacks",
                "finetune.stability.dip_drop")

# Free-form mappings inside the schema (any key allowed).
OPEN_KEYS = ("model.backbone_kwargs", "optim.kwargs", "finetune.optim.kwargs", "optim.per_optimizer",
             "finetune.optim.per_optimizer")

# Top-level keys written beside the config in saved run files; ignored when a saved config is loaded again.
SAVED_EXTRAS = ("derived",)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def schema_keys(schema, prefix: str = "") -> Dict[str, str]:
    """Map every dotted key of a dataclass schema to a readable type name."""
    out = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        key = prefix + f.name
        if dataclasses.is_dataclass(tp):
            out.update(schema_keys(tp, key + "."))
        else:
            out[key] = _type_name(tp)
    return out


def nearest_key(key: str, schema) -> Optional[str]:
    keys = list(schema_keys(schema))
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not match:  # compare the last component alone (e.g. 'epoch' for 'train.epochs')
        last = {k.rsplit(".", 1)[-1]: k for k in keys}
        m = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(last), n=1, cutoff=0.6)
        match = [last[m[0]]] if m else []
    return match[0] if match else None


def _merge(base: DictConfig, other: DictConfig, source: str, schema) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = str(e.full_key or e.key)
        hint = nearest_key(key, schema)
        fix = f"did you mean '{hint}'?" if hint else "see README.md for the valid keys"
        raise UserError(f"unknown config key '{key}' in {source}; {fix}") from None
    except ValidationError as e:
        key = str(e.full_key or e.key)
        expected = schema_keys(schema).get(key, "another type")
        raise UserError(f"config key '{key}' in {source} expects {expected}, got {e.value!r}") from None
    except OmegaConfBaseException as e:
        raise UserError(f"bad config in {source}: {str(e).splitlines()[0]}") from None


def _open(cfg: DictConfig, open_keys=OPEN_KEYS) -> DictConfig:
    for key in open_keys:
        node = _get(cfg, key)
        if node is not None:
            OmegaConf.set_struct(node, False)
    return cfg


def load(schema, files: List[str] = (), overrides: List[str] = (), open_keys=OPEN_KEYS) -> DictConfig:
    """Build the config: schema defaults <- each YAML file in order <- ``key=value`` overrides. ``open_keys`` are
    the free-form mappings of the schema."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    _open(cfg, open_keys)
    for path in files:
        if not os.path.isfile(path):
            raise UserError(f"config file '{path}' does not exist; check the path passed to --config")
        try:
            part = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and friends
            raise UserError(f"config file '{path}' is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(part, DictConfig):
            raise UserError(f"config file '{path}' must hold a mapping of keys, not a {type(part).__name__}")
        for extra in SAVED_EXTRAS:
            part.pop(extra, None)
        cfg = _open(_merge(cfg, part, f"'{path}'", schema), open_keys)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise UserError(f"override '{bad[0]}' is not of the form key=value (e.g. train.epochs=10)")
    try:
        dot = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise UserError(f"cannot parse overrides {list(overrides)}: {str(e).splitlines()[0]}") from None
    cfg = _open(_merge(cfg, dot, "the command line", schema), open_keys)
    _normalise(cfg)
    validate(cfg)
    return cfg


# YAML reads a bare `no` as false, so `train.mixed_precision=no` arrives as the string 'False'.
_PRECISION_ALIASES = {"False": "no", "false": "no", "none": "no", "fp32": "no"}


def _normalise(cfg: DictConfig) -> None:
    for key in ("train.mixed_precision", "mixed_precision"):
        value = _get(cfg, key)
        if value in _PRECISION_ALIASES:
            node, leaf = (cfg.train, "mixed_precision") if key.startswith("train.") else (cfg, "mixed_precision")
            node[leaf] = _PRECISION_ALIASES[value]


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        if part not in node:
            return None
        node = node[part]
    return node


def validate(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value is not None and value not in allowed:
            raise UserError(f"{key}={value!r} is not valid; choose one of: {', '.join(allowed)}")
    for key in POSITIVE:
        value = _get(cfg, key)
        if value is not None and not value > 0:
            raise UserError(f"{key} must be > 0, got {value}")
    for key in NON_NEGATIVE:
        value = _get(cfg, key)
        if value is not None and value < 0:
            raise UserError(f"{key} must be >= 0, got {value}")
    for key in ("optim", "finetune.optim"):
        node = _get(cfg, key)
        if node is not None:
            from .optim.registry import check_per_optimizer, resolve
            check_per_optimizer(node.per_optimizer, key)
            resolve(node, key, warn=False)  # unknown names, missing lr / wd, betas of the wrong length


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    """Plain, resolved dict (for checkpoints and JSON): never pickle a DictConfig."""
    return OmegaConf.to_container(cfg, resolve=True)


def save(cfg: DictConfig, path: str, derived: Optional[Dict[str, Any]] = None) -> None:
    data = to_dict(cfg)
    if derived:
        data["derived"] = derived
    from .files import write_text
    write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))
