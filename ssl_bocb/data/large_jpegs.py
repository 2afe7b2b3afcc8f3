"""ImageNet-size JPEGs made from a small-image dataset, for benchmarks and tests of the large-image data paths.

Each image is upscaled (bicubic) to a random size of 320-640 px per side (aspect 3:4 to 4:3, ImageNet's usual
range), given photo-like grain (Gaussian noise, sigma 6 grey levels) so that it decodes at a photo's cost rather
than a flat upscale's, and saved as a baseline JPEG at quality 90 with 4:2:0 chroma (ImageNet's typical encoding).
The tree is ``<out>/train/<class>/<n>.JPEG``: load it with ``data.name=imagefolder data.root=<out>``.
"""
import os
from typing import Optional

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..files import write_text
from .datasets import build_base, per_class_subset


def make_large_jpegs(data_cfg, out: str, per_class: int, seed: int = 0, split: Optional[str] = None,
                     sides=(320, 640)) -> int:
    """Write ``per_class`` upscaled JPEGs per class of ``data_cfg``'s ``split`` (train) under ``out/train``;
    returns the number written. A complete earlier tree (its ``.complete`` marker matching) is kept as it is."""
    split = split or data_cfg.train_split
    marker = os.path.join(out, ".complete")
    spec = f"{data_cfg.name} {split} {per_class} {seed} {sides}\n"
    if os.path.isfile(marker) and open(marker).read() == spec:
        return sum(len(files) for _, _, files in os.walk(os.path.join(out, "train")))
    base = build_base(data_cfg, split)
    keep = per_class_subset(list(base.targets), per_class)
    rng = np.random.default_rng(seed)
    names = list(getattr(base, "classes", [])) or [str(c) for c in sorted(set(base.targets))]
    for k, j in enumerate(tqdm(keep, desc="writing large JPEGs", unit="img", mininterval=2, delay=1)):
        img, label = base[j]
        img = img.convert("RGB")
        long_side = int(rng.integers(sides[0], sides[1] + 1))
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        w, h = (long_side, int(round(long_side / aspect))) if aspect >= 1 else (int(round(long_side * aspect)),
                                                                                long_side)
        w, h = max(sides[0], min(w, sides[1])), max(sides[0], min(h, sides[1]))
        big = np.asarray(img.resize((w, h), Image.BICUBIC), np.float32)
        big = np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8)
        folder = os.path.join(out, "train", names[label])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(big).save(os.path.join(folder, f"{k:06d}.JPEG"), "JPEG", quality=90, subsampling=2)
    write_text(marker, spec)
    return len(keep)
