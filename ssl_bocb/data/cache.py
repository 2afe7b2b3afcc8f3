"""Decoded uint8 images held in memory (or memory-mapped from a cache file) for the batched two-view path.

A dataset whose images all share one size no larger than the training crop and that fits in ``data.cache_max_gb``
is decoded once: CIFAR's native arrays are used as they are, image files (the JPEG archives, ImageFolder trees)
are decoded into ``<cache>/decoded/<key>.npy`` and memory-mapped by every later run, the key being a hash of the
files' paths, sizes and modification times and of the subset. Unreadable files are found while decoding: they are
counted and logged once, and their positions are served by the next readable image, as on the PIL path.
"""
import hashlib
import json
import logging
import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..dist import local_main_first
from ..errors import UserError
from ..files import atomic_write
from .archive import default_cache_dir
from .datasets import IMAGE_ERRORS, CIFAR10Files, subset_base

log = logging.getLogger(__name__)


def keep_batch(batch):
    """collate_fn for :class:`DecodedImages`, whose ``__getitems__`` already returns the collated batch."""
    return batch


def next_readable(bad: np.ndarray) -> np.ndarray:
    """For each position, the first readable position at or after it (wrapping round): the PIL path's rule."""
    n = len(bad)
    good = np.flatnonzero(~bad)
    if len(good) == 0:
        raise UserError("no readable image in the dataset; check the data files")
    after = np.searchsorted(good, np.arange(n))
    return good[after % len(good)]


class DecodedImages(Dataset):
    """uint8 (n, h, w, 3) images with labels. A batch fetch returns ``((images, index), labels, n_unreadable)``:
    the images of the positions asked for (an unreadable one replaced by the next readable image) and the
    positions themselves, from which the augmentation draws each sample's parameters."""

    def __init__(self, images: np.ndarray, targets: List[int], classes: List[str], bad: Optional[np.ndarray] = None):
        self.images, self.targets, self.classes = images, list(targets), list(classes)
        self.bad = np.zeros(len(images), bool) if bad is None else np.asarray(bad, bool)
        self.source = next_readable(self.bad)
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.images)

    @property
    def image_shape(self) -> Tuple[int, int]:
        return tuple(self.images.shape[1:3])

    def __getitems__(self, index):
        idx = np.asarray(index, dtype=np.int64)
        src = self.source[idx]
        images = torch.from_numpy(np.ascontiguousarray(self.images[src]))
        labels = torch.as_tensor([self.targets[i] for i in src], dtype=torch.long)
        # the positions stay a host array (the DataLoader's device placement leaves it): the augmentation reads them
        return (images, idx), labels, torch.tensor(int(self.bad[idx].sum()))

    def __getitem__(self, i):
        (images, index), labels, bad = self.__getitems__([i])
        return (images[0], index[0]), labels[0], bad


def _file_key(name: str, split: str, files: List[str], subset: int) -> str:
    h = hashlib.sha256(f"{name}\n{split}\n{subset}\n".encode())
    for f in files:
        try:
            st = os.stat(f)
        except FileNotFoundError:
            raise UserError(f"{f} disappeared after the data folder was listed; is something changing it? run again "
                            f"once it is stable") from None
        h.update(f"{os.path.abspath(f)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _headers_too_large(files: List[str], size_limit: int, probes: int = 8) -> Optional[str]:
    """The reason the files cannot be held decoded, read from the headers of a few of them spread over the list
    (an ImageNet-size folder is recognised without listing the size of every file), else None."""
    for f in [files[k] for k in np.unique(np.linspace(0, len(files) - 1, probes).astype(int))]:
        try:
            with Image.open(f) as img:
                width, height = img.size
        except FileNotFoundError:
            raise UserError(f"{f} disappeared after the data folder was listed; is something changing it? run again "
                            f"once it is stable") from None
        except IMAGE_ERRORS:
            continue  # unreadable: found and counted while decoding
        if max(width, height) > size_limit:
            return f"its images ({width}x{height}) are larger than data.image_size={size_limit}"
    return None


def _decode_all(base, indices: List[int], size_limit: int, max_bytes: float, what: str):
    """Decode ``base[j]`` for ``j`` in ``indices`` into one uint8 array; None and the reason when the images do
    not share one size, are larger than ``size_limit`` or do not fit in ``max_bytes``."""
    images, bad, shape = None, np.zeros(len(indices), bool), None
    samples = getattr(base, "samples", None)
    bar = tqdm(indices, desc=f"decoding {what}", unit="img", mininterval=2, delay=1, leave=False)
    for k, j in enumerate(bar):
        try:
            img, _ = base[j]
            arr = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img, dtype=np.uint8)
        except FileNotFoundError as e:  # listed, then gone: the data changed under the run, not a bad image
            raise UserError(f"{e.filename or samples[j][0]} disappeared while decoding {what}; is something "
                            f"changing the data folder? run again once it is stable") from None
        except IMAGE_ERRORS as e:
            bad[k] = True
            log.warning("skipping unreadable image %s (%s)", samples[j][0] if samples else f"item {j}", e)
            continue
        if shape is None:
            shape = arr.shape
            if arr.ndim != 3 or max(shape[:2]) > size_limit:
                return None, None, f"its images ({shape[1]}x{shape[0]}) are larger than data.image_size={size_limit}"
            need = len(indices) * arr.nbytes
            if need > max_bytes:
                return None, None, f"decoded it needs {need / 2 ** 30:.1f} GB, more than data.cache_max_gb"
            images = np.zeros((len(indices),) + shape, np.uint8)
        elif arr.shape != shape:
            return None, None, f"its images differ in size ({shape[1]}x{shape[0]} and {arr.shape[1]}x{arr.shape[0]})"
        images[k] = arr
    if images is None:
        raise UserError("no readable image in the dataset; check the data files")
    return images, bad, None


def decoded_dataset(data_cfg, split: str, subset: Optional[int] = None):
    """(DecodedImages, None) for ``split`` when it can be held decoded, else (None, the reason).

    In a multi-process run the main process of each node decodes and writes the cache file first; the others wait
    and memory-map it (one decoded copy per node, shared through the page cache)."""
    with local_main_first():
        return _decoded_dataset(data_cfg, split, subset)


def _decoded_dataset(data_cfg, split: str, subset: Optional[int]):
    n = data_cfg.subset if subset is None else subset
    base, indices = subset_base(data_cfg, split, n)
    targets = [base.targets[i] for i in indices]
    classes = list(getattr(base, "classes", []))
    max_bytes = data_cfg.cache_max_gb * 2 ** 30
    if isinstance(base, CIFAR10Files):  # already decoded by the format itself
        if base.data.shape[1] > data_cfg.image_size:
            return None, f"its images are larger than data.image_size={data_cfg.image_size}"
        return DecodedImages(base.data[indices], targets, classes), None
    samples = getattr(base, "samples", None)
    what = f"{data_cfg.name} {split}"
    if not samples:  # in-memory formats (synthetic data, STL-10 arrays): decoded per run
        images, bad, why = _decode_all(base, indices, data_cfg.image_size, max_bytes, what)
        return (None, why) if images is None else (DecodedImages(images, targets, classes, bad), None)
    files = [samples[i][0] for i in indices]
    why = _headers_too_large(files, data_cfg.image_size)
    if why:  # decided from a few headers, before the cache key stats every file
        return None, why
    folder = os.path.join(default_cache_dir(data_cfg.cache_dir), "decoded")
    stem = os.path.join(folder, f"{data_cfg.name}-{split}-{_file_key(data_cfg.name, split, files, n)}")
    found = _read_cache(stem, len(indices))
    if found is not None:
        return DecodedImages(found[0], targets, classes, found[1]), None
    images, bad, why = _decode_all(base, indices, data_cfg.image_size, max_bytes, what)
    if images is None:
        return None, why
    if _write_cache(stem, images, bad):
        log.info("decoded %d images into %s (%d unreadable)", len(files), stem + ".npy", int(bad.sum()))
        found = _read_cache(stem, len(indices))  # memory-mapped: the decoded copy in memory is released
        if found is not None:
            images = found[0]
    return DecodedImages(images, targets, classes, bad), None


def _read_cache(stem: str, n: int):
    """(memory-mapped images, unreadable mask) from a complete cache file (its .json written last), else None."""
    if not os.path.isfile(stem + ".json"):
        return None
    try:
        with open(stem + ".json") as f:
            meta = json.load(f)
        images = np.load(stem + ".npy", mmap_mode="r")
        if images.shape[0] == n and images.dtype == np.uint8:
            log.info("decoded images: %s (memory-mapped)", stem + ".npy")
            return images, np.asarray(meta["bad"], bool)
    except (OSError, ValueError, KeyError) as e:
        log.warning("decoded cache %s unreadable (%s); decoding again", stem, e)
    return None


def _write_cache(stem: str, images: np.ndarray, bad: np.ndarray) -> bool:
    """The .npy first, then the .json that marks it complete, each written under a unique temporary name (processes
    on several nodes may share the folder) and renamed into place. False (and nothing left behind) on failure."""
    try:
        for ext, write in ((".npy", lambda f: np.save(f, images)),
                           (".json", lambda f: f.write(json.dumps(dict(shape=list(images.shape), bad=bad.tolist()))
                                                       .encode()))):
            with atomic_write(stem + ext, "wb") as f:
                write(f)
        return True
    except OSError as e:
        log.warning("could not write the decoded cache %s (%s); it is kept in memory for this run", stem, e)
        return False
