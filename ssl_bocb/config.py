"""Typed configuration: dataclasses -> OmegaConf structured config in struct mode.

``load(schema, files, overrides)`` merges YAML recipes (later files win) and ``key=value`` overrides onto the
schema's defaults. A misspelt key fails with the nearest valid key; a wrong type names the key and the type it
expects; out-of-range values fail in :func:`validate`. Every error is a :class:`~ssl_bocb.errors.UserError`.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from . import recipes
from .errors import UserError

DATASETS = ("cifar10", "cifar100", "stl10", "imagefolder", "imagenette", "folder", "fake")
PRECISIONS = ("auto", "no", "bf16", "fp16")
HOST_READS = ("auto", "step", "log")
BOUNDS = (("gt", ">", lambda v, b: v > b), ("ge", ">=", lambda v, b: v >= b), ("lt", "<", lambda v, b: v < b),
          ("le", "<=", lambda v, b: v <= b))


def key(default: Any = None, *, help: str, factory: Optional[Callable[[], Any]] = None,
        choices: Optional[Tuple] = None, gt: Optional[float] = None, ge: Optional[float] = None,
        lt: Optional[float] = None, le: Optional[float] = None):
    """One config key, declared once: its default (or ``factory`` for a list or mapping), its documentation, the
    values it takes (``choices``) and its bounds (each element's, for a list). Validation, the defaults,
    ``--help-config`` and the key tables of docs/config.md (tests/test_docs.py) all read this. A section used twice
    (optim and finetune.optim, stability and finetune.stability) is one declaration."""
    meta = dict(help=help, choices=tuple(choices) if choices else None, gt=gt, ge=ge, lt=lt, le=le)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = key("cifar10", choices=DATASETS,
              help="Which dataset: cifar10 | cifar100 | stl10 | imagefolder (<root>/<split>/<class>/<image>) | "
              "imagenette | folder (your own unlabelled images: every JPEG / PNG / WebP under data.root, at any "
              "depth; pretraining only) | fake (synthetic, for tests).")
    root: str = key("",
              help="Folder holding the data: native torchvision files, an unpacked ImageFolder tree "
              "(<root>/cifar10/train/..) or an archive such as cifar10-jpeg.tar.gz; with data.name=folder the "
              "folder of images itself (required). Empty: $SSL_BOCB_DATA, else ./data.")
    download: bool = key(False,
              help="Let torchvision download cifar10 / cifar100 / stl10 into `root` when they are missing (needs "
              "internet).")
    cache_dir: str = key("",
              help="Where archives are unpacked (once). Empty: $SSL_BOCB_CACHE, else ~/.cache/ssl_bocb.")
    subset: int = key(0, ge=0,
              help="Images per class, chosen deterministically (first N of each class in file order); 0 = all "
              "images.")
    image_size: int = key(32, gt=0,
              help="Side of the square crops fed to the network.")
    crop_min: float = key(0.2, gt=0, le=1,
              help="RandomResizedCrop lower scale bound: 0.08 ViT (MoCo v3 paper), 0.2 ResNet recipes.")
    blur: Optional[bool] = key(None,
              help="Gaussian blur (view 1 always, view 2 with p=0.1). null = auto: on for image_size >= 64, off for "
              "32 px data, where a blur erases most of the image (common small-image practice, e.g. solo-learn).")
    solarize: bool = key(True,
              help="Solarize on view 2 with p=0.2 (BYOL / MoCo v3 asymmetry).")
    mean: Optional[List[float]] = key(None, ge=0, le=1,
              help="Normalisation means, one per channel; null = the dataset's own statistics (ImageNet statistics "
              "for folders).")
    std: Optional[List[float]] = key(None, gt=0,
              help="Normalisation standard deviations, one per channel; null = the dataset's own statistics.")
    train_split: str = key("train",
              help="The split pretraining, the kNN bank and the probe train on (a folder name for imagefolder / "
              "stl10).")
    test_split: str = key("test",
              help="The split the evaluations read: test, or holdout (the validation images that "
              "data.holdout_per_class keeps out of train_split).")
    holdout_per_class: int = key(0, ge=0,
              help="Validation split: the last N images of each class of train_split (in file order) are held out. "
              "Pretraining, the kNN bank, the probe's training set and data.subset never see them; "
              "data.test_split=holdout evaluates on them (results go to val_<stage>_metrics.json), and the kNN "
              "monitor reads them instead of the test split, so that every choice can be made without the test "
              "split. 0 = no validation split.")
    num_workers: Optional[int] = key(None, ge=0,
              help="DataLoader worker processes per training process (the crops and PIL paths; batched needs none). "
              "null = the CPUs available to this process divided by the processes on its node.")
    pipeline: str = key("auto", choices=('auto', 'batched', 'crops', 'dali', 'pil'),
              help="Pretraining's two-view data path (ssl_bocb/data/pipeline.py). batched: decoded uint8 images "
              "held in memory, both views cut and augmented batch-wise on the training device; crops: workers "
              "decode (reduced-scale JPEG decoding) and crop, the device does colour / blur / solarize / "
              "normalisation batch-wise; dali: NVIDIA DALI reads and decodes the crops (on the GPU; pip install -e "
              "\".[dali]\"), the same device ops after it; pil: torchvision's per-image PIL transforms in workers. "
              "auto: batched when the images share one size <= image_size and fit in cache_max_gb; else dali on a "
              "CUDA device with DALI installed; else crops. The log says why.")
    cache_max_gb: float = key(8.0, gt=0,
              help="The most memory the decoded images of the batched path may take (GB).")
    fake_per_class: int = key(16, gt=0,
              help="Images per class of the synthetic `fake` dataset.")
    fake_classes: int = key(4, gt=0,
              help="Classes of the synthetic `fake` dataset.")


@dataclass
class ModelConfig:
    backbone: str = key("resnet18",
              help="Any timm model name (created with num_classes=0), e.g. resnet18, resnet50, "
              "vit_small_patch16_224.")
    backbone_kwargs: Dict[str, Any] = key(factory=dict,
              help="Extra keyword arguments for timm.create_model, e.g. {img_size: 32, patch_size: 4, "
              "drop_path_rate: 0.1}.")
    cifar_stem: bool = key(False,
              help="ResNet only: 3x3 stride-1 first conv and no max-pool, the usual CIFAR stem for 32 px inputs.")
    frozen_patch_embed: bool = key(False,
              help="ViT only: freeze the random patch projection (MoCo v3 \"stop-grad conv1\", sec. 4.2); excluded "
              "from the optimizer.")
    pos_embed: str = key("sincos", choices=('sincos', 'learned', 'none'),
              help="ViT only: position embedding: sincos (fixed 2D, MoCo v3) | learned (timm's) | none.")
    pool: str = key("token", choices=('token', 'avg'),
              help="ViT only: token (class token, final LayerNorm) | avg (global average pooling of the patch "
              "tokens, with no class token and no final LayerNorm: the MoCo v3 ablation found the norm must go with "
              "the class token).")
    mlp_norm: str = key("layernorm", choices=('layernorm', 'batchnorm'),
              help="ViT only: the norm before each block's MLP: layernorm | batchnorm (MoCo v3 ablation, about +1 "
              "point; the norm before attention stays LayerNorm).")
    patch_norm: str = key("none", choices=('none', 'batchnorm', 'weightnorm'),
              help="ViT only: a norm on the patch projection: none | batchnorm (over its output channels) | "
              "weightnorm (on its weight). MoCo v3 found neither removes the instability that freezing it removes.")
    moco_init: bool = key(True,
              help="ViT only: MoCo v3 initialisation (qkv split xavier, xavier Linear, cls token N(0, 1e-6), patch "
              "proj).")
    zero_init_residual: bool = key(True,
              help="ResNet: zero-init the last BN gamma of each residual block (MoCo v3 / Goyal et al. 2017).")
    proj_layers: Optional[int] = key(None, gt=0,
              help="Projector depth; null = 2 for CNNs, 3 for ViTs (MoCo v3).")
    pred_layers: int = key(2, ge=0,
              help="Predictor depth; 0 removes the predictor (MoCo v3 ablation: about -1 point).")
    hidden_dim: int = key(4096, gt=0,
              help="Hidden width of the projector and predictor MLPs (4096 in MoCo v3).")
    out_dim: int = key(256, gt=0,
              help="Output dimension of projector and predictor (256 in MoCo v3).")
    proj_hidden_bn: bool = key(True,
              help="BatchNorm after each hidden Linear of the projector (MoCo v3 heads have it; removing it from "
              "both heads is the BN-head ablation, about -2 points).")
    pred_hidden_bn: bool = key(True,
              help="BatchNorm after each hidden Linear of the predictor, as model.proj_hidden_bn.")
    proj_last_bn: Optional[bool] = key(None,
              help="BatchNorm1d(affine=False) after the projector's last Linear (always in MoCo v3); null = the "
              "MoCo v3 default.")
    pred_last_bn: Optional[bool] = key(None,
              help="BatchNorm1d(affine=False) after the predictor's last Linear (MoCo v3: ViT only); null = the "
              "MoCo v3 default for the backbone family.")


@dataclass
class MocoConfig:
    temperature: float = key(0.2, gt=0,
              help="Softmax temperature tau: 0.2 ViT, 1.0 ResNet-50 in the published recipes.")
    momentum: float = key(0.99, ge=0, lt=1,
              help="Momentum-encoder EMA coefficient m0 (0.99 best in the paper, 0.996 for long ResNet runs). 0 = "
              "the m = 0 ablation: no momentum encoder; keys are the base encoder's projector outputs under "
              "stop-gradient.")
    momentum_schedule: str = key("cosine", choices=('cosine', 'constant'),
              help="cosine: m goes from m0 to 1 over training (published recipes) | constant.")


@dataclass
class SamConfig:
    rho: float = key(0.0, ge=0,
              help="SAM neighbourhood radius rho (Foret et al. 2021: 0.05; ViTs 0.05-0.2, Chen et al. 2022); 0 = "
              "off. Two forward / backward passes per step around any optimizer of the table.")
    adaptive: bool = key(False,
              help="ASAM (Kwon et al. 2021): the perturbation scaled elementwise by |w|, rho then typically 10x "
              "larger.")


@dataclass
class OptimConfig:
    name: str = key("adamw",
              help="Any name of the optimizer table (`python tools/optimizers.py`: the 20 BOCB optimizers, Muon, "
              "ADOPT, MARS, LaProp, Kron), or another timm.optim name (then base_lr and weight_decay must be set).")
    base_lr: Optional[float] = key(None, gt=0,
              help="The keys below set to null take, in this order, optim.per_optimizer.<name>.<key> (a recipe's "
              "tuning for that optimizer) and then the table's default for the chosen optimizer, so that swapping "
              "optim.name swaps them all. Learning rate per 256 images; the actual lr follows lr_scaling.")
    lr_scaling: Optional[str] = key(None, choices=('linear', 'sqrt', 'none'),
              help="linear: lr = base_lr * batch / 256 (Goyal et al.) | sqrt: base_lr * sqrt(batch / 256) | none.")
    weight_decay: Optional[float] = key(None, ge=0,
              help="Weight decay; null = optim.per_optimizer.<name>.weight_decay, else the table's default for the "
              "optimizer.")
    momentum: Optional[float] = key(None, ge=0, lt=1,
              help="SGD / LARS / RMSProp / Muon / Kron momentum; null = the table's default.")
    nesterov: Optional[bool] = key(None,
              help="Nesterov momentum where the optimizer has it; null = the table's default.")
    betas: Optional[List[float]] = key(None, ge=0, lt=1,
              help="Adam-family betas (three for Adan); null = the table's default.")
    eps: Optional[float] = key(None, gt=0,
              help="Adam-family eps; null = the table's default.")
    trust_coefficient: Optional[float] = key(None, ge=0,
              help="LARS trust coefficient eta (0.001 ImageNet batch 4096; 0.02 with trust_clip for small batches, "
              "solo-learn).")
    trust_clip: Optional[bool] = key(None,
              help="LARC / LAMBC: clip the trust ratio so the local lr never exceeds the global lr.")
    per_optimizer: Dict[str, Any] = key(factory=dict,
              help="Per-optimizer settings a recipe tuned, used only when that optimizer is chosen, e.g. {lars: "
              "{base_lr: 0.3, trust_coefficient: 0.02}, adamw: {weight_decay: 0.05}}.")
    weight_decay_policy: str = key("exclude_1d_tokens", choices=('all', 'exclude_1d', 'exclude_1d_tokens'),
              help="Which tensors get weight decay: all (the reference MoCo v3 AdamW) | exclude_1d (not biases and "
              "norm scales) | exclude_1d_tokens (also not the cls token, position embedding and timm's "
              "no_weight_decay() names).")
    trust_ratio_policy: str = key("exclude_1d", choices=('exclude_1d', 'all'),
              help="Which tensors get the layer-wise trust ratio of LARS / LAMB: exclude_1d (SPEC: ndim <= 1 "
              "excluded) | all.")
    min_lr_ratio: float = key(0.0, ge=0, le=1,
              help="Final lr of the cosine schedule, as a fraction of the peak lr.")
    weight_decay_end: Optional[float] = key(None, ge=0,
              help="Weight decay at the end of training (cosine from weight_decay); null = constant.")
    grad_clip_mode: str = key("norm", choices=('norm', 'first_layer', 'agc'),
              help="Gradient clipping: norm (global L2 norm <= grad_clip) | first_layer (only the first layer's "
              "gradient norm <= grad_clip: a ViT's patch projection, a CNN's first conv) | agc (NFNets unit-wise "
              "||g|| / ||w|| <= grad_clip).")
    grad_clip: float = key(0.0, ge=0,
              help="Clipping threshold (max norm, or AGC lambda such as 0.01-0.16); 0 = off.")
    sam: SamConfig = field(default_factory=SamConfig)
    kwargs: Dict[str, Any] = key(factory=dict,
              help="Extra keyword arguments passed to the optimizer's constructor as they are.")


@dataclass
class TrainConfig:
    epochs: int = key(100, gt=0,
              help="Pretraining epochs.")
    warmup_epochs: float = key(10.0, ge=0,
              help="Linear warmup length in epochs (may be fractional); then half-cycle cosine, per iteration.")
    batch_size: int = key(256, gt=0,
              help="Global batch size over all processes; must divide by the number of processes.")
    query_chunks: int = key(1, gt=0,
              help="Exact large batches on few devices: each step computes every key of the batch first (momentum "
              "encoder, no gradient), then the queries in this many chunks, each against all keys, gradients "
              "accumulated; one optimizer step. Exact (to round-off) without BatchNorm; with BatchNorm each chunk "
              "normalises over its own samples, as that many processes without SyncBN would. Must divide the "
              "per-process batch. Not with SAM or Sophia.")
    mixed_precision: str = key("auto", choices=PRECISIONS,
              help="auto | no | bf16 | fp16, through Accelerate. auto: bf16 where the device computes it natively "
              "(GPUs with bf16, CPUs with AVX-512 BF16 / AMX), else fp32; bf16 on a CPU without them is emulated, "
              "tens of times slower.")
    channels_last: Optional[bool] = key(None,
              help="Channels-last memory format for the model and its inputs. null = auto: on for convolutional "
              "backbones (on the CPU it was measured faster, see docs/performance.md), off for ViTs.")
    compile: Optional[bool] = key(None,
              help="torch.compile the encoders, projector and predictor. null = auto: off (compiling cost 50-80 s "
              "on 2 CPU cores for no gain over channels-last; not measured on GPUs). Not with Hessian optimizers "
              "(Sophia).")
    sync_bn: bool = key(True,
              help="Convert BatchNorm to SyncBatchNorm when more than one process runs (MoCo v3 does).")
    save_every: int = key(10, ge=0,
              help="Save a checkpoint every N epochs (and always at the end).")
    save_every_steps: int = key(0, ge=0,
              help="Also save every N optimisation steps (mid-epoch resume points); 0 = off.")
    keep_checkpoints: int = key(2, ge=0,
              help="Keep only the newest N checkpoints; 0 = keep all.")
    stop_at_step: int = key(0, ge=0,
              help="Stop this invocation after this global step (a checkpoint is written); 0 = run to the end. "
              "Useful to split a long run into jobs, or to time a few steps.")
    log_every: int = key(10, gt=0,
              help="Log step scalars every N steps.")
    host_reads: str = key("auto", choices=HOST_READS,
              help="When the loss and gradient norms are read off the device. step: every step; a non-finite step "
              "is skipped before it is applied. log: only at log steps, checkpoints and epoch ends (no host sync "
              "per step); a window with a non-finite step is undone as a whole from a device copy of the state. "
              "auto: log on GPUs, step elsewhere (and with fp16, whose loss scaler decides per step).")
    cpu: bool = key(False,
              help="Force the CPU even when an accelerator is present.")


@dataclass
class MonitorConfig:
    knn_every: int = key(0, ge=0,
              help="Online kNN monitor: every N epochs a kNN top-1 on a fixed labelled subset; 0 = off.")
    knn_train_per_class: int = key(100, gt=0,
              help="Labelled images per class of the monitor's kNN bank.")
    knn_test_per_class: int = key(50, gt=0,
              help="Labelled images per class of the monitor's queries (from the holdout split when "
              "data.holdout_per_class is set).")
    knn_k: int = key(20, gt=0,
              help="Neighbours of the monitor's kNN vote.")
    knn_temperature: float = key(0.07, gt=0,
              help="Temperature T of the monitor's exp(sim / T) vote.")


@dataclass
class StabilityConfig:
    nonfinite_patience: int = key(3, gt=0,
              help="Non-finite guard: a step with a non-finite loss or gradient is skipped (no optimizer or "
              "momentum-encoder update); after this many in a row the run rolls back to its last good checkpoint.")
    rollback_lr_factor: float = key(0.5, gt=0, le=1,
              help="After a rollback the lr is multiplied by this factor for the rest of the run (compounding).")
    max_rollbacks: int = key(2, ge=0,
              help="Roll back at most this many times; the next divergence stops the run with one line.")
    spike_factor: float = key(3.0, gt=0,
              help="Gradient-norm / loss spike: a value above spike_factor x the median of the previous "
              "spike_window steps.")
    spike_window: int = key(20, gt=0,
              help="Steps before a value whose median a spike is measured against.")
    spike_min_history: int = key(5, gt=0,
              help="Fewest such steps before any spike is counted.")
    dip_drop: float = key(2.0, ge=0,
              help="kNN dip: a monitor reading more than dip_drop points below the best reading before it.")


TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class LogConfig:
    trackers: List[str] = key(factory=lambda: ["tensorboard"], choices=TRACKERS,
              help="Where the run's scalars go, through Accelerate's trackers: any of tensorboard (<run>/tb), wandb, "
              "mlflow (the wandb and mlflow extras); [] = none (steps.jsonl and log.jsonl are always written).")
    project: str = key("ssl_bocb",
              help="The wandb project and the MLflow experiment.")
    run_name: str = key("",
              help="The run's name in wandb and MLflow; empty: the run folder's name.")
    wandb_mode: str = key("", choices=("", "online", "offline", "disabled"),
              help="wandb's mode; empty: wandb's own (online, or $WANDB_MODE).")
    mlflow_tracking_uri: str = key("",
              help="Where MLflow writes; empty: $MLFLOW_TRACKING_URI, else file:./mlruns (a file store in the "
              "folder the run starts from).")


@dataclass
class PretrainConfig:
    output_dir: str = key("",
              help="Run directory. Empty: runs/<recipe name>-<timestamp>.")
    seed: int = key(0, ge=0,
              help="Seed of the initial weights, the data order and every augmentation.")
    resume: str = key("",
              help="\"\" start fresh | auto: newest checkpoint in output_dir (fresh if none) | path to a checkpoint "
              "folder.")
    overwrite: bool = key(False,
              help="Allow reusing an output_dir that holds another run; its old contents are moved to "
              "<dir>.old-<time>.")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moco: MocoConfig = field(default_factory=MocoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class KnnConfig:
    k: int = key(20, gt=0,
              help="Neighbours of the headline number (DINO: 20).")
    temperature: float = key(0.07, gt=0,
              help="Temperature T of the exp(sim / T) vote (DINO: 0.07).")
    ks: List[int] = key(factory=lambda: [10, 20, 100, 200], gt=0,
              help="Every k reported in the table (DINO reports 10, 20, 100, 200).")
    backend: str = key("auto", choices=('auto', 'faiss', 'torch'),
              help="auto (faiss when installed, on the GPU when possible) | faiss | torch (chunked matmul).")
    chunk_size: int = key(1024, gt=0,
              help="Test rows per matmul chunk of the torch backend.")


@dataclass
class LinearConfig:
    mode: str = key("cached", choices=('cached', 'full'),
              help="cached: train the head on cached features (fast, no augmentation; default for sweeps) | full: "
              "the MoCo v3 protocol with RandomResizedCrop + flip through the frozen backbone.")
    epochs: int = key(90, gt=0,
              help="Probe epochs (MoCo v3: 90, batch 1024, SGD momentum 0.9, wd 0, cosine per epoch, no warmup).")
    batch_size: int = key(1024, gt=0,
              help="Probe batch size (MoCo v3: 1024).")
    base_lr: Optional[float] = key(None, gt=0,
              help="lr per 256 images; null = 0.1 for CNNs, 3.0 for ViTs (MoCo v3), scaled by batch / 256.")
    momentum: float = key(0.9, ge=0, lt=1,
              help="SGD momentum of the probe (MoCo v3: 0.9).")
    weight_decay: float = key(0.0, ge=0,
              help="Weight decay of the probe (MoCo v3: 0).")


def _finetune_optim() -> OptimConfig:
    # DeiT fine-tuning AdamW; other optimizers take the table's pretraining defaults unless set.
    return OptimConfig(name="adamw", per_optimizer={"adamw": {"base_lr": 5e-4, "weight_decay": 0.05}})


@dataclass
class FinetuneConfig:
    epochs: int = key(100, gt=0,
              help="Fine-tuning epochs.")
    warmup_epochs: float = key(5.0, ge=0,
              help="Linear warmup of the fine-tune lr, in epochs; then cosine per step.")
    batch_size: int = key(128, gt=0,
              help="Global fine-tuning batch size over all processes.")
    # The fine-tune optimizer (any table name: it is a BOCB axis too). Default AdamW 5e-4 / wd 0.05 (DeiT).
    optim: OptimConfig = field(default_factory=_finetune_optim)
    layer_decay: float = key(0.75, gt=0, le=1,
              help="ViT layer-wise lr decay (BEiT / MAE); 1.0 = off. Ignored for CNNs.")
    train_pos_embed: bool = key(True,
              help="ViT: train the position embedding (the DeiT-style transfer recipe), also when pretraining kept "
              "it fixed (sin-cos); false keeps it as pretraining had it.")
    drop_path: float = key(0.1, ge=0, lt=1,
              help="Stochastic depth rate passed to timm (drop_path_rate).")
    label_smoothing: float = key(0.1, ge=0, lt=1,
              help="Label smoothing of the cross-entropy (DeiT: 0.1).")
    mixup: float = key(0.8, ge=0,
              help="timm Mixup alpha; 0 = off.")
    cutmix: float = key(1.0, ge=0,
              help="timm CutMix alpha; 0 = off.")
    mixup_prob: float = key(1.0, ge=0, le=1,
              help="Probability to apply Mixup or CutMix to a batch.")
    randaugment: Optional[str] = key("rand-m9-mstd0.5",
              help="timm auto-augment policy string (RandAugment m9, std 0.5 as in DeiT); empty or null = off. "
              "DeiT's \"-inc1\" variant is not the default: its posterize reaches 0 bits, which current Pillow "
              "rejects mid-epoch.")
    ema_decay: float = key(0.0, ge=0, lt=1,
              help="Keep an exponential moving average of the weights and report it too; 0 = off (e.g. 0.9999).")
    save_every: int = key(1, ge=0,
              help="Checkpoint every N epochs (and at the end); resume as in pretraining.")
    resume: str = key("",
              help="\"\" start fresh | auto: the newest checkpoint of the fine-tune folder | a checkpoint folder, as "
              "pretraining's resume.")
    log_every: int = key(10, gt=0,
              help="steps.jsonl interval (loss, lr, gradient norms per layer), as train.log_every.")
    host_reads: str = key("auto", choices=HOST_READS,
              help="When the loss and gradient norms are read off the device, as train.host_reads (auto: log on "
              "GPUs).")
    # The non-finite guard, rollback and spike / dip rules, as pretraining's stability.* (the dip rule watches
    # the validation top-1 after each epoch).
    stability: StabilityConfig = field(default_factory=StabilityConfig)


@dataclass
class EvalConfig:
    checkpoint: str = key("",
              help="Pretraining run folder, checkpoint folder or backbone.safetensors; \"\"= model.backbone at "
              "random init.")
    output_dir: str = key("",
              help="Where results go; \"\"= the checkpoint's run folder (runs/random-<backbone> without a "
              "checkpoint).")
    overwrite: bool = key(False,
              help="Replace an existing result (the old file is kept as <name>.old-<time>).")
    seed: int = key(0, ge=0,
              help="Seed of the evaluation's data order, augmentations and probe initialisation.")
    test_subset: int = key(0, ge=0,
              help="Images per class taken from the test split; 0 = all (data.subset applies to the train split).")
    init_seed: int = key(0, ge=0,
              help="Seed of the random-init backbone evaluated when no checkpoint is given (the random-init floor "
              "is read over several: tools/floors.py).")
    batch_size: int = key(256, gt=0,
              help="Batch size of feature extraction, per process.")
    cache_features: bool = key(True,
              help="Reuse features cached under data.cache_dir for the same weights, data, split and transform.")
    mixed_precision: str = key("auto", choices=PRECISIONS,
              help="auto | no | bf16 | fp16 for feature extraction and fine-tuning, as train.mixed_precision.")
    cpu: bool = key(False,
              help="Force the CPU even when an accelerator is present.")
    data: DataConfig = field(default_factory=DataConfig)
    # Used only without a checkpoint (the random-init baseline) and for fine-tuning from scratch.
    model: ModelConfig = field(default_factory=ModelConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    log: LogConfig = field(default_factory=LogConfig)


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
        fix = f"did you mean '{hint}'?" if hint else "--help-config lists the valid keys"
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
    for given in files:
        path = recipes.find(given)
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


def declarations(schema, prefix: str = "") -> Iterator[Tuple[str, dataclasses.Field, Any]]:
    """(dotted key, its dataclass field, its type) of every key of ``schema``, sections walked in order."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from declarations(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, f, tp


def _check(key: str, value, meta) -> None:
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    choices = meta.get("choices")
    for v in values if choices else ():  # a list key's choices are its elements'
        if v not in choices:
            near = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise UserError(f"{key}={v!r} is not valid; choose one of: {', '.join(map(str, choices))}{hint}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        for name, sign, ok in BOUNDS:
            if meta.get(name) is not None and not ok(v, meta[name]):
                raise UserError(f"{key} must be {sign} {meta[name]:g}, got {value}")


def validate(cfg: DictConfig, schema=None) -> None:
    """Every declared choice and bound (see :func:`key`), then the optimizer settings against the table."""
    schema = schema or OmegaConf.get_type(cfg)
    for k, f, _ in declarations(schema):
        value = _get(cfg, k)
        if value is not None and f.metadata:
            _check(k, value, f.metadata)
    for k in ("optim", "finetune.optim"):
        node = _get(cfg, k)
        if node is not None:
            from .optim.registry import check_per_optimizer, resolve
            check_per_optimizer(node.per_optimizer, k)
            resolve(node, k, warn=False)  # unknown names, missing lr / wd, betas of the wrong length


def describe(schema) -> str:
    """``--help-config``: every key with its type, default, values and bounds, and its documentation."""
    out = []
    for k, f, tp in declarations(schema):
        m = f.metadata
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        facts = [_type_name(tp), f"default {OmegaConf.to_yaml({'v': default}).strip()[3:] or 'null'}"]
        if m.get("choices"):
            facts.append("one of " + " | ".join(m["choices"]))
        facts += [f"{sign} {m[name]:g}" for name, sign, _ in BOUNDS if m.get(name) is not None]
        out.append(f"{k} ({'; '.join(facts)})\n    {m.get('help', '')}")
    return "\n".join(out)


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    """Plain, resolved dict (for checkpoints and JSON): never pickle a DictConfig."""
    return OmegaConf.to_container(cfg, resolve=True)


def save(cfg: DictConfig, path: str, derived: Optional[Dict[str, Any]] = None) -> None:
    data = to_dict(cfg)
    if derived:
        data["derived"] = derived
    from .files import write_text
    write_text(path, OmegaConf.to_yaml(OmegaConf.create(data)))
