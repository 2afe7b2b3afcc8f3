"""Datasets: CIFAR-10/100 and STL-10 (torchvision formats), ImageFolder trees, Imagenette, synthetic data.

A data root may hold a dataset's native torchvision files, its unpacked ImageFolder tree (``cifar10/train/..``)
or the archive (``cifar10-jpeg.tar.gz``), which is unpacked once into a cache. Every dataset built here returns
PIL images and exposes ``targets`` (a list of ints) and ``classes``.
"""
import logging
import os
import pickle
from typing import List, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from ..dist import local_main_first
from ..errors import UserError
from .archive import unpack_once

log = logging.getLogger(__name__)

# name -> (torchvision native folder, folder name in a tree / archive, archive file name)
LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", "cifar10", "cifar10-jpeg.tar.gz"),
    "cifar100": ("cifar-100-python", "cifar100", "cifar100-jpeg.tar.gz"),
    "stl10": ("stl10_binary", "stl10", "stl10-jpeg.tar.gz"),
    "imagenette": (None, "imagenette", "imagenette64-jpeg.tar.gz"),
}
# Errors that mean "this image file is unreadable".
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def data_root(root: str = "") -> str:
    return os.path.expanduser(root or os.environ.get("SSL_BOCB_DATA") or "data")


class FakeImages(Dataset):
    """Synthetic labelled images: each class is a fixed random colour pattern, each image that pattern plus
    noise and a random shift. Deterministic in the index; separable, so kNN and probes can learn it."""

    def __init__(self, num_classes: int = 4, per_class: int = 16, image_size: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.rand(num_classes, 3, 8, 8, generator=g)
        self.image_size, self.seed = image_size, seed
        self.targets = [i % num_classes for i in range(num_classes * per_class)]
        self.classes = [f"class{c}" for c in range(num_classes)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 100003 + i + 1)
        y = self.targets[i]
        base = torch.nn.functional.interpolate(self.patterns[y][None], size=self.image_size, mode="nearest")[0]
        x = (0.7 * base + 0.3 * torch.rand(base.shape, generator=g)).clamp(0, 1)
        x = torch.roll(x, shifts=int(torch.randint(-2, 3, (1,), generator=g)), dims=2)
        arr = (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        return Image.fromarray(arr), y


class _FilesPresent:
    """torchvision checks the MD5 of every native file, so only byte-identical copies of the original archives
    load. Here the files must be present and readable; the MD5 is still checked on download."""

    def _check_integrity(self) -> bool:
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name))
                   for name, _ in self.train_list + self.test_list)


class _ArraysOnly(pickle.Unpickler):
    """An unpickler for the CIFAR batch files: dicts, lists, strings, numbers and numpy arrays, nothing else. A
    plain ``pickle.load`` runs whatever code a tampered file names; this one refuses every other global."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not an array; the file is not a CIFAR batch")


def read_arrays_pickle(path: str):
    """The object in ``path``, unpickled with :class:`_ArraysOnly` (latin1 strings, as the CIFAR files need)."""
    with open(path, "rb") as f:
        return _ArraysOnly(f, encoding="latin1").load()


class CIFAR10Files(_FilesPresent, tvd.CIFAR10):
    """torchvision's CIFAR-10 with its files read by the arrays-only unpickler instead of ``pickle.load``."""

    def __init__(self, root, train: bool = True, transform=None, target_transform=None, download: bool = False):
        tvd.VisionDataset.__init__(self, root, transform=transform, target_transform=target_transform)
        self.train = train
        if download:
            self.download()
        if not self._check_integrity():
            raise RuntimeError("dataset files not found")
        data, self.targets = [], []
        for file_name, _ in (self.train_list if train else self.test_list):
            entry = read_arrays_pickle(os.path.join(self.root, self.base_folder, file_name))
            data.append(entry["data"])
            self.targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # HWC
        self._load_meta()

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if not os.path.isfile(path):
            raise RuntimeError(f"{path} is missing")
        self.classes = read_arrays_pickle(path)[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR100Files(CIFAR10Files, tvd.CIFAR100):
    pass


class STL10Files(_FilesPresent, tvd.STL10):
    pass


class STL10Images(Dataset):
    """torchvision STL10 with ``targets`` (unlabelled images get -1)."""

    def __init__(self, root, split, download):
        self.ds = STL10Files(root, split=split, download=download)
        self.targets = [int(t) for t in self.ds.labels]
        self.classes = self.ds.classes

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class UnlabelledFolder(Dataset):
    """Every image file under a folder, at any depth (JPEG, PNG, WebP; hidden files and folders left out), in sorted
    order, with no labels (each target -1). Files are opened when read, never written: an unreadable or truncated
    one is skipped where it is read, and counted (``skipped_images`` in the run's logs)."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise UserError(f"data.name=folder: data.root='{root}' is not a folder; set data.root=<the folder of "
                            f"your images>")
        paths = []
        for folder, dirs, files in os.walk(root, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [os.path.join(folder, f) for f in files
                      if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
        if not paths:
            raise UserError(f"data.name=folder: no image files under '{root}' (looked for "
                            f"{', '.join(IMAGE_SUFFIXES)} at any depth)")
        self.root = root
        self.samples = [(p, -1) for p in sorted(paths)]
        self.targets = [-1] * len(paths)
        self.classes = []
        log.info("data.name=folder: %d image files under %s (no labels)", len(paths), root)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        with open(self.samples[i][0], "rb") as f:  # read-only; load() decodes here, so a bad file raises here
            img = Image.open(f)
            img.load()
        return img, -1


def _image_folder(path: str):
    try:
        return tvd.ImageFolder(path)
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"no images under '{path}' ({str(e).splitlines()[0]}); it must hold one folder per "
                        f"class with image files inside") from None


def _split_dir(tree: str, split: str) -> Optional[str]:
    """``tree/split``; 'test' falls back to 'val' and back (Imagenette and ImageNet call their test split val)."""
    aliases = {"test": ["test", "val"], "val": ["val", "test"]}.get(split, [split])
    for s in aliases:
        if os.path.isdir(os.path.join(tree, s)):
            return os.path.join(tree, s)
    return None


def build_base(data_cfg, split: str, image_size: Optional[int] = None):
    """The raw dataset (PIL images, int labels) of ``data_cfg.name`` for ``split`` (train / test / ...)."""
    name = data_cfg.name
    root = data_root(data_cfg.root)
    if name == "fake":
        # train and test draw different noise (different seeds) around the same class patterns
        ds = FakeImages(data_cfg.fake_classes, data_cfg.fake_per_class, image_size or data_cfg.image_size,
                        seed=0 if split == "train" else 1)
        ds.patterns = FakeImages(data_cfg.fake_classes, 1, 8, seed=0).patterns
        return ds
    if name == "folder":
        if split != data_cfg.train_split:
            raise UserError(f"data.name=folder holds unlabelled images for pretraining only, it has no '{split}' "
                            f"split; set monitor.knn_every=0 and data.holdout_per_class=0, and evaluate with a "
                            f"labelled data.name=imagefolder (kNN, probe)")
        if not data_cfg.root:
            raise UserError("data.name=folder reads the images under data.root: set data.root=<the folder of your "
                            "images>")
        return UnlabelledFolder(os.path.expanduser(data_cfg.root))
    if name == "imagefolder":
        path = _split_dir(root, split)
        if path is None:
            raise UserError(f"imagefolder: no '{split}' folder under data.root='{root}'; the root must hold "
                            f"{split}/<class>/<image> (set data.train_split / data.test_split for other names)")
        return _image_folder(path)
    native, tree_name, archive = LAYOUTS[name]
    looked = []
    if native:
        looked.append(os.path.join(root, native) + "/")
        if os.path.isdir(os.path.join(root, native)):
            return _native(name, root, split, download=False)
    # the unpacked tree: <root>/<tree_name>/<split>/, or <root>/<split>/ when root is that tree itself
    trees = [os.path.join(root, tree_name)] + ([root] if os.path.basename(os.path.normpath(root)) == tree_name else [])
    for tree in trees:
        looked.append(os.path.join(tree, split) + "/")
        path = _split_dir(tree, split)
        if path is not None:
            return _image_folder(path)
    arch = os.path.join(root, archive)
    looked.append(arch)
    if os.path.isfile(arch):
        unpacked = unpack_once(arch, data_cfg.cache_dir)
        path = _split_dir(os.path.join(unpacked, tree_name), split)
        if path is None:
            raise UserError(f"archive '{arch}' holds no {tree_name}/{split}/ folder; is it the right archive?")
        return _image_folder(path)
    if data_cfg.download and native:
        try:
            return _native(name, root, split, download=True)
        except Exception as e:  # network errors of all kinds
            raise UserError(f"download of {name} into '{root}' failed ({str(e).splitlines()[0]}); without "
                            f"internet, put the dataset files under data.root") from None
    hint = " or pass data.download=true (needs internet)" if native else ""
    raise UserError(f"{name} {split} data not found under '{root}' (looked for {', '.join(looked)}); set "
                    f"data.root=<folder> or SSL_BOCB_DATA{hint}")


def _native(name, root, split, download):
    try:
        if name == "cifar10":
            return CIFAR10Files(root, train=split == "train", download=download)
        if name == "cifar100":
            return CIFAR100Files(root, train=split == "train", download=download)
        return STL10Images(root, split, download)
    except (RuntimeError, ValueError, OSError, KeyError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"{name} files under '{root}' are unreadable ({str(e).splitlines()[0]}); remove them "
                        f"and copy or download them again") from None


def per_class_subset(targets: List[int], n: int, pool: Optional[List[int]] = None) -> List[int]:
    """Indices of the first ``n`` images of each class, in dataset order (deterministic), among ``pool`` (default:
    every index); n=0 keeps all."""
    pool = list(range(len(targets))) if pool is None else list(pool)
    if n <= 0:
        return pool
    seen, keep = {}, []
    for i in pool:
        t = targets[i]
        if seen.get(t, 0) < n:
            seen[t] = seen.get(t, 0) + 1
            keep.append(i)
    return keep


# The split name of the validation images that data.holdout_per_class keeps out of the train split.
HOLDOUT = "holdout"


def holdout_indices(targets: List[int], n: int) -> List[int]:
    """Indices of the last ``n`` images of each class (in dataset order): the validation split."""
    counts: dict = {}
    for t in targets:
        counts[t] = counts.get(t, 0) + 1
    short = sorted(c for c, k in counts.items() if k <= n)
    if short:
        raise UserError(f"data.holdout_per_class={n} leaves no training image of class {short[0]} "
                        f"({counts[short[0]]} images); lower data.holdout_per_class")
    seen: dict = {}
    keep = []
    for i, t in enumerate(targets):
        seen[t] = seen.get(t, 0) + 1
        if seen[t] > counts[t] - n:
            keep.append(i)
    return keep


def split_pool(data_cfg, split: str, targets: List[int]) -> Optional[List[int]]:
    """The indices of the base dataset that ``split`` may draw from: the held-out images for ``holdout``, the train
    split less them for ``train_split``, None (all) otherwise."""
    n = getattr(data_cfg, "holdout_per_class", 0) or 0
    if split == HOLDOUT:
        if n <= 0:
            raise UserError(f"split '{HOLDOUT}' needs data.holdout_per_class > 0 (the validation images per class "
                            f"held out of data.train_split)")
        return holdout_indices(targets, n)
    if n > 0 and split == data_cfg.train_split:
        held = set(holdout_indices(targets, n))
        return [i for i in range(len(targets)) if i not in held]
    return None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation: a function of (run seed, epoch, index) alone, so augmentations do
    not depend on worker count, process count or where a resumed run restarted."""
    return (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + index * 0xC2B2AE3D) % (2 ** 63 - 1)


def order_seed(seed: int) -> int:
    """Seed of the data order. Accelerate's seedable sampler orders epoch e with (data_seed + e), so passing the
    run seed itself would give seed s + 1 the order of seed s one epoch later; a multiplicative hash keeps the
    orders of different seeds apart for any number of epochs (independent seeds for confidence intervals)."""
    return (seed * 0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D) % (2 ** 62)


class SampledImages(Dataset):
    """A per-class subset (``indices``) of a base dataset whose items are made per epoch in DataLoader workers: the
    epoch lives in shared memory (persistent workers, forked once, read what the main process sets), and an
    unreadable image gives its position to the next readable one (:meth:`first_readable`)."""

    def __init__(self, base, indices: Optional[List[int]] = None):
        self.base = base
        self.indices = list(range(len(base))) if indices is None else list(indices)
        base_targets = list(base.targets)
        self.targets = [base_targets[i] for i in self.indices]
        self.classes = list(getattr(base, "classes", []))
        self.samples = getattr(base, "samples", None)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int):
        self._epoch[0] = epoch

    def __len__(self):
        return len(self.indices)

    def _path(self, j):
        return self.samples[j][0] if self.samples else f"item {j}"

    def first_readable(self, i: int, read):
        """``(read(j), j, skipped)`` for the first base item ``j`` at or after position ``i`` (wrapping round) that
        ``read`` gets without an image error; each unreadable one is logged and counted."""
        for attempt in range(len(self)):
            j = self.indices[(i + attempt) % len(self)]
            try:
                return read(j), j, attempt
            except IMAGE_ERRORS as e:
                log.warning("skipping unreadable image %s (%s)", self._path(j), e)
        raise UserError("no readable image in the dataset; check the data files")


class TransformedDataset(SampledImages):
    """Applies ``transform`` to a base dataset's images with a per-sample seeded RNG, and survives unreadable
    images: a corrupt file is skipped (the next readable image takes its place), counted, and reported.

    ``__getitem__`` returns ``(x, label, n_skipped)``; summing ``n_skipped`` over batches counts the skips.
    """

    def __init__(self, base, transform, seed: int = 0, indices: Optional[List[int]] = None):
        super().__init__(base, indices)
        self.transform, self.seed = transform, seed

    def _load(self, j):
        img, label = self.base[j]
        return (img.convert("RGB") if hasattr(img, "convert") else img), label

    def __getitem__(self, i):
        (img, label), _, skipped = self.first_readable(i, self._load)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, i))
            x = self.transform(img)
        return x, label, skipped


def subset_base(data_cfg, split: str, subset: Optional[int] = None):
    """(base dataset, indices of its per-class subset: ``data.subset`` unless given) for ``split``; one line when
    the subset is empty. ``holdout`` reads the validation images of the train split (``data.holdout_per_class``),
    and the train split then leaves them out. In a multi-process run the main process of each node builds it first
    (unpacking or downloading), then the others."""
    with local_main_first():
        base = build_base(data_cfg, data_cfg.train_split if split == HOLDOUT else split)
    targets = list(base.targets)
    indices = per_class_subset(targets, data_cfg.subset if subset is None else subset,
                               split_pool(data_cfg, split, targets))
    if not indices:
        raise UserError(f"{data_cfg.name} {split} split is empty; check data.root and data.subset")
    return base, indices


def build_dataset(data_cfg, split: str, transform, seed: int = 0, subset: Optional[int] = None):
    """Base dataset for ``split`` -> per-class subset (``data.subset`` unless given) -> transform wrapper."""
    base, indices = subset_base(data_cfg, split, subset)
    return TransformedDataset(base, transform, seed, indices)
