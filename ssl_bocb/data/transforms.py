"""MoCo v3 two-view augmentation (BYOL-style, asymmetric) and evaluation transforms."""
from typing import List, Sequence

import torch
from PIL import ImageFilter
from torchvision import transforms as T

# Per-dataset normalisation statistics (0-1 scale).
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def norm_stats(data_cfg):
    default = STATS.get(data_cfg.name, STATS["imagenet"])
    mean = tuple(data_cfg.mean) if data_cfg.mean else default[0]
    std = tuple(data_cfg.std) if data_cfg.std else default[1]
    return mean, std


class RandomGaussianBlur:
    """PIL Gaussian blur with radius sigma ~ U(sigma_min, sigma_max), applied with probability p (SimCLR)."""

    def __init__(self, p: float, sigma: Sequence[float] = (0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img):
        if torch.rand(()) >= self.p:
            return img
        s = float(torch.empty(()).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=s))

    def __repr__(self):
        return f"RandomGaussianBlur(p={self.p}, sigma={tuple(self.sigma)})"


class TwoViews:
    """Apply two different transforms to one image: returns [view1, view2]."""

    def __init__(self, t1, t2):
        self.t1, self.t2 = t1, t2

    def __call__(self, img) -> List[torch.Tensor]:
        return [self.t1(img), self.t2(img)]

    def __repr__(self):
        return f"TwoViews(\n view1={self.t1},\n view2={self.t2})"


def blur_enabled(data_cfg) -> bool:
    return data_cfg.blur if data_cfg.blur is not None else data_cfg.image_size >= 64


def moco_view(data_cfg, blur_p: float, solarize_p: float):
    """One MoCo v3 view: crop, colour jitter (p=0.8), grayscale (p=0.2), blur, solarize, flip, normalise."""
    mean, std = norm_stats(data_cfg)
    ops = [
        T.RandomResizedCrop(data_cfg.image_size, scale=(data_cfg.crop_min, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur_enabled(data_cfg) and blur_p > 0:
        ops.append(RandomGaussianBlur(blur_p))
    if data_cfg.solarize and solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
    ops += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def pretrain_transform(data_cfg) -> TwoViews:
    """View 1: blur p=1.0, no solarize. View 2: blur p=0.1, solarize p=0.2 (MoCo v3 / BYOL)."""
    return TwoViews(moco_view(data_cfg, blur_p=1.0, solarize_p=0.0), moco_view(data_cfg, blur_p=0.1, solarize_p=0.2))


def eval_resize(image_size: int) -> int:
    """Resize side before the center crop: size / 0.875 for ImageNet-sized inputs, none for <= 64 px data,
    whose native resolution already equals the crop."""
    return image_size if image_size <= 64 else int(round(image_size / 0.875))


def eval_transform(data_cfg):
    mean, std = norm_stats(data_cfg)
    return T.Compose([T.Resize(eval_resize(data_cfg.image_size)), T.CenterCrop(data_cfg.image_size),
                      T.ToTensor(), T.Normalize(mean, std)])


def probe_train_transform(data_cfg):
    """Linear-probe training augmentation (MoCo v3): RandomResizedCrop + flip."""
    mean, std = norm_stats(data_cfg)
    return T.Compose([T.RandomResizedCrop(data_cfg.image_size), T.RandomHorizontalFlip(),
                      T.ToTensor(), T.Normalize(mean, std)])
