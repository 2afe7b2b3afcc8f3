"""``data.pipeline=dali``: NVIDIA DALI decodes the crops, on the GPU where there is one.

The order, sharding and resume of the data stay the torch DataLoader's (prepared by Accelerate, as on every other
path). Its workers only read each file's bytes and its size from the header, and draw both views' crop boxes from
the per-sample generator (``BatchedTwoViews.crop_windows``: the boxes the batched and crops paths use for that image
and epoch). The training process hands the encoded batch to a DALI pipeline: ``fn.decoders.image`` (the "mixed"
nvJPEG decoder on a GPU, libjpeg-turbo on DALI's CPU backend) and one ``fn.resize`` per view over the box (absolute
ROI, antialiased bilinear) and ``fn.flip``, giving uint8 (n, 2, size, size, 3) on the device; colour, blur, solarize
and normalisation follow batch-wise there (``BatchedTwoViews``). A file whose header is unreadable is skipped in the
worker as on the other paths; one that DALI cannot decode stops the run with its error.

Install: ``pip install -e ".[dali]"`` (the CUDA 13 build; for CUDA 12 install ``nvidia-dali-cuda120`` instead).
"""
import io
import logging
from typing import List

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .batched import BatchedTwoViews
from .cache import keep_batch
from .datasets import SampledImages, subset_base

log = logging.getLogger(__name__)
INSTALL = 'pip install -e ".[dali]" (nvidia-dali-cuda130; nvidia-dali-cuda120 for CUDA 12)'


def require_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise UserError(f"data.pipeline=dali needs NVIDIA DALI, which is not installed: {INSTALL}, or use "
                        f"data.pipeline=crops") from None


class EncodedFiles(SampledImages):
    """Per position, the file's encoded bytes and both views' boxes. A batch fetch returns
    ``((bytes, (boxes, flips), index), labels, n_unreadable)``: a list of uint8 arrays, boxes (n, 2, 4) (top, left,
    h, w) and flips (n, 2), the positions (host arrays all: device placement leaves them)."""

    def __init__(self, base, indices: List[int], augment: BatchedTwoViews):
        super().__init__(base, indices)
        if not self.samples:
            raise UserError("data.pipeline=dali reads image files (an ImageFolder tree or an archive of one); this "
                            "dataset is held in arrays: use data.pipeline=auto")
        self.augment = augment
        self.transform = f"EncodedFiles(size={augment.size}, scale={augment.scale}, seed={augment.seed})"

    def _read(self, i: int, j: int, epoch: int):
        path = self.samples[j][0]
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:  # the header only
            width, height = img.size
            if img.format not in ("JPEG", "PNG", "BMP", "TIFF", "WEBP"):
                raise ValueError(f"{img.format} is not a format DALI decodes")
        return (np.frombuffer(data, np.uint8),) + self.augment.crop_windows(i, epoch, height, width)

    def __getitems__(self, index):
        idx = np.asarray(index, dtype=np.int64)
        epoch = self.epoch
        encoded, labels, skipped = [], [], 0
        boxes, flips = np.empty((len(idx), 2, 4), np.int64), np.empty((len(idx), 2), bool)
        for k, i in enumerate(idx.tolist()):
            (data, boxes[k], flips[k]), j, bad = self.first_readable(i, lambda j: self._read(i, j, epoch))
            encoded.append(data)
            labels.append(self.base.targets[j])
            skipped += bad
        return (encoded, (boxes, flips), idx), torch.as_tensor(labels, dtype=torch.long), torch.tensor(skipped)


class DaliCrops:
    """A DALI pipeline fed one batch at a time: encoded files and boxes in, uint8 (n, 2, size, size, 3) crops out,
    on ``device`` (the GPU it decodes on, or the CPU with DALI's CPU backend)."""

    def __init__(self, size: int, device: torch.device, threads: int):
        require_dali()
        self.size, self.device, self.threads = size, torch.device(device), max(1, threads)
        self.pipe, self.capacity = None, 0

    def _build(self, batch: int):
        from nvidia.dali import fn, pipeline_def, types
        gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if gpu else None

        @pipeline_def(batch_size=batch, num_threads=self.threads, device_id=device_id, exec_async=False,
                      exec_pipelined=False, prefetch_queue_depth=1)
        def crops():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            views = []
            for v in range(2):
                start = fn.external_source(name=f"start{v}", dtype=types.FLOAT, ndim=1)
                end = fn.external_source(name=f"end{v}", dtype=types.FLOAT, ndim=1)
                flip = fn.external_source(name=f"flip{v}", dtype=types.INT32, ndim=0)
                view = fn.resize(images, size=[self.size, self.size], roi_start=start, roi_end=end,
                                 roi_relative=False, interp_type=types.INTERP_LINEAR, antialias=True)
                views.append(fn.flip(view, horizontal=flip))
            return tuple(views)

        self.pipe, self.capacity = crops(), batch
        self.pipe.build()

    def __call__(self, encoded: list, boxes: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        n = len(encoded)
        if n > self.capacity:
            self._build(n)
        self.pipe.feed_input("encoded", encoded)
        for v in range(2):  # ROI corners in (y, x), the images' axis order
            top_left = boxes[:, v, :2].astype(np.float32)
            self.pipe.feed_input(f"start{v}", list(top_left))
            self.pipe.feed_input(f"end{v}", list(top_left + boxes[:, v, 2:].astype(np.float32)))
            self.pipe.feed_input(f"flip{v}", list(flips[:, v].astype(np.int32)))
        try:
            outputs = self.pipe.run()
        except RuntimeError as e:
            raise UserError(f"DALI could not decode an image of this batch ({str(e).splitlines()[0][:200]}); "
                            f"data.pipeline=crops skips unreadable files") from None
        out = torch.empty((n, 2, self.size, self.size, 3), dtype=torch.uint8, device=self.device)
        from nvidia.dali.plugin.pytorch import feed_ndarray
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for v, views in enumerate(outputs):
            view = torch.empty((n, self.size, self.size, 3), dtype=torch.uint8, device=self.device)
            feed_ndarray(views.as_tensor(), view, cuda_stream=stream)
            out[:, v] = view
        return out


class _DaliViews:
    def __init__(self, crops: DaliCrops, augment: BatchedTwoViews):
        self.crops, self.augment = crops, augment

    def __call__(self, batch, epoch):
        (encoded, (boxes, flips), index), _, n_bad = batch
        x1, x2 = self.augment(self.crops(encoded, boxes, flips), index, epoch)
        return x1, x2, n_bad


def dali_data(data_cfg, augment: BatchedTwoViews, device: torch.device, reason: str, workers: int):
    """TwoViewData of the DALI path: file reading in ``workers`` DataLoader workers, decoding in DALI."""
    from .pipeline import TwoViewData, worker_options
    require_dali()
    base, indices = subset_base(data_cfg, data_cfg.train_split)
    dataset = EncodedFiles(base, indices, augment)
    views = _DaliViews(DaliCrops(augment.size, device, max(1, workers)), augment)
    return TwoViewData(dataset, views, "dali", dict(collate_fn=keep_batch, **worker_options(workers)), reason)
