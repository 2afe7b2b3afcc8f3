"""The crops path: DataLoader workers decode and crop, the training device does the rest.

For images larger than the training crop (ImageNet-size JPEGs), a worker opens the file, reads its size from the
header, draws both views' RandomResizedCrop boxes from the per-sample generator (``BatchedTwoViews.crop_windows``,
keyed by seed, epoch and position: the boxes the batched path would draw for that image), asks libjpeg for the
image at 1/2, 1/4 or 1/8 scale where both crops stay at least the output size there (DCT scaling, PIL's draft
mode), and resizes each box to the output size (antialiased bilinear on uint8, torchvision's RandomResizedCrop of a
tensor), and flips it where drawn. It returns the two crops as uint8: 2 x 224 x 224 x 3 bytes per image (294 KiB)
where the PIL path ships two float32 views (1.15 MiB). Colour jitter, grayscale, blur, solarize and normalisation
then run batch-wise on the training device (``BatchedTwoViews.view`` with ``cropped=True``), with the parameters
the same generator gives; when the training device is the CPU itself, the workers apply the colour ops in PIL with
those parameters (``finish``) and the training process only normalises. Unreadable files are skipped as on the PIL
path: the next readable image takes the position.
"""
import logging
import math
import warnings
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from .batched import CPU_CHUNK_BYTES, BatchedTwoViews, uint8_normalisation
from .datasets import SampledImages

log = logging.getLogger(__name__)
MAX_DRAFT = 8  # libjpeg's DCT scaling goes down to 1/8


def draft_scale(boxes: np.ndarray, size: int) -> int:
    """The largest power of two up to 8 by which the image can shrink with every box still >= ``size`` pixels on
    each side (1 where no reduction keeps the crops at full detail)."""
    room = int(boxes[:, 2:].min()) // size
    scale = 1
    while scale * 2 <= min(room, MAX_DRAFT):
        scale *= 2
    return scale


def crop_pair(img: Image.Image, boxes: np.ndarray, flips: np.ndarray, size: int, out: np.ndarray,
              finish: Optional[Callable] = None) -> int:
    """Both views of ``img`` (lazily opened; decoded here) into ``out`` (2, size, size, 3): each box cut and
    resized to size x size (torch's antialiased bilinear on uint8, torchvision's resized_crop of a tensor), mirrored
    where ``flips``, then ``finish(view, v)`` (a PIL image) if given. A JPEG is decoded at reduced scale where the
    boxes allow. Returns the scale used."""
    width, height = img.size
    scale = draft_scale(boxes, size)
    if scale > 1 and img.format == "JPEG":
        img.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
    else:
        scale = 1
    img = img.convert("RGB")
    fx, fy = img.width / width, img.height / height
    with warnings.catch_warnings():  # PIL's pixels are a read-only buffer; they are only read
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None]  # (1, 3, h, w) view, no copy
    for v, (top, left, h, w) in enumerate(boxes.tolist()):
        t0, l0 = round(top * fy), round(left * fx)
        t1, l1 = max(t0 + 1, round((top + h) * fy)), max(l0 + 1, round((left + w) * fx))
        view = F.interpolate(pixels[:, :, t0:t1, l0:l1], size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)[0]
        view = (view.flip(2) if flips[v] else view).permute(1, 2, 0).numpy()
        out[v] = np.asarray(finish(Image.fromarray(view), v)) if finish else view
    return scale


_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def pil_colour(view: Image.Image, p: dict) -> Image.Image:
    """One view's colour ops in PIL (uint8, torchvision's functional ops), with one sample's parameters ``p`` (a
    row of ``BatchedTwoViews.host_params``): the jitter in the sample's order, grayscale, blur, solarize."""
    if p["jitter"]:
        for op in p["order"]:
            view = _JITTER[op](view, float(p["factors"][op]))
    if p["gray"]:
        view = TF.rgb_to_grayscale(view, num_output_channels=3)
    if p["blur"]:
        view = view.filter(ImageFilter.GaussianBlur(radius=float(p["sigma"])))
    if p["solarize"]:
        view = TF.solarize(view, 128)
    return view


class NormaliseViews:
    """The device side of finished views: uint8 (n, 2, s, s, 3) -> two normalised float32 (n, 3, s, s)."""

    def __init__(self, mean, std):
        self.scale, self.shift = uint8_normalisation(mean, std)
        self._on = {}

    def __call__(self, batch, epoch):
        (views, _), _, n_bad = batch
        key = str(views.device)
        if key not in self._on:  # made once per device: a per-call upload would be a host sync
            self._on[key] = (self.scale.to(views.device), self.shift.to(views.device))
        scale, shift = self._on[key]
        n, _, size = views.shape[:3]
        out = torch.empty((2, n, 3, size, size), device=views.device)
        step = n if views.device.type != "cpu" else max(1, CPU_CHUNK_BYTES // (2 * 3 * 4 * size * size))
        for s in range(0, n, step):  # on a CPU a few samples at a time (cache-sized), written in place
            for v in range(2):
                torch.addcmul(shift, views[s:s + step, v].permute(0, 3, 1, 2), scale, out=out[v, s:s + step])
        return out[0], out[1], n_bad


class CroppedViews(SampledImages):
    """Both views' crops of each image as uint8. A batch fetch (``__getitems__``, in a DataLoader worker) returns
    ``((crops, index), labels, n_unreadable)``: crops (n, 2, size, size, 3) in shared memory, the positions as a
    host array (the augmentation draws each sample's parameters from them)."""

    def __init__(self, base, indices: List[int], augment: BatchedTwoViews, finish: bool = False):
        super().__init__(base, indices)
        self.augment, self.size = augment, augment.size
        self.finish = finish  # the workers also colour, in PIL (the device is the CPU): finished uint8 views
        self.transform = f"CroppedViews(size={self.size}, scale={augment.scale}, seed={augment.seed})"

    def _crop(self, i: int, j: int, epoch: int, out: np.ndarray) -> None:
        finish = None
        if self.finish:  # both views' colour parameters: the draws the device path would make for position i
            views = [{k: a[0] for k, a in p.items()} for p in self.augment.host_params([i], epoch, 1, 1)]

            def colour(view, v):
                return pil_colour(view, views[v])
            finish = colour
        if self.samples is not None:  # a file: opened lazily, its size read from the header before decoding
            with Image.open(self.samples[j][0]) as img:
                crop_pair(img, *self.augment.crop_windows(i, epoch, img.height, img.width), self.size, out, finish)
            return
        img, _ = self.base[j]
        img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, np.uint8))
        crop_pair(img, *self.augment.crop_windows(i, epoch, img.height, img.width), self.size, out, finish)

    def __getitems__(self, index):
        idx = np.asarray(index, dtype=np.int64)
        epoch = self.epoch
        crops = torch.empty((len(idx), 2, self.size, self.size, 3), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            crops.share_memory_()  # sent to the main process without another copy
        out = crops.numpy()
        labels, skipped = [], 0
        for k, i in enumerate(idx.tolist()):
            _, j, bad = self.first_readable(i, lambda j: self._crop(i, j, epoch, out[k]))
            labels.append(self.base.targets[j])
            skipped += bad
        return (crops, idx), torch.as_tensor(labels, dtype=torch.long), torch.tensor(skipped)

    def __getitem__(self, i):
        (crops, index), labels, bad = self.__getitems__([i])
        return (crops[0], index[0]), labels[0], bad

    @staticmethod
    def bytes_per_image(size: int) -> int:
        """What crosses from a worker to the training process per image: two uint8 crops."""
        return 2 * size * size * 3
