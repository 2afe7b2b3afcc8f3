"""The MoCo v3 two-view augmentation computed batch-wise on tensors, from a decoded uint8 image cache.

Each sample's random parameters are drawn from a counter-based generator keyed by (run seed, epoch, index), the
same key the PIL path seeds with (``datasets.sample_seed``): views do not depend on batch composition, worker or
process count, or where a resumed run restarted. The parameters follow the PIL recipe's distributions exactly
(torchvision's RandomResizedCrop attempts and central fallback, ColorJitter's random order and factor ranges, the
probabilities of SPEC section 1); the ops are the tensor forms of torchvision's (bilinear resize with half-pixel
centres, the ITU-R 601 grayscale weights, HSV hue rotation, Gaussian blur with reflect padding), applied in float32
to the whole batch at once on the training device. torchvision's own functional ops take one parameter set per
call, so per-sample parameters would need a Python loop per image; the formulas here are checked against them on
fixed parameters in the tests.
"""
import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import sample_seed

# columns of the per-view parameter draw
_ATTEMPTS = 10            # RandomResizedCrop's tries before its central-crop fallback
_CROP = 0                 # 4 uniforms per attempt: area scale, log ratio, top, left
_FLIP = _CROP + 4 * _ATTEMPTS
_JITTER = _FLIP + 1       # apply, then brightness, contrast, saturation, hue factors, then 4 order keys
_GRAY = _JITTER + 9
_BLUR = _GRAY + 1         # apply, sigma
_SOLARIZE = _BLUR + 2
_DRAWS = _SOLARIZE + 1
_MASK64 = (1 << 64) - 1
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# On a CPU the views are made a few samples at a time, so that each op's float temporaries (about this many bytes)
# stay in the cache: at 224 px, 2.9-3.5x faster than the whole batch at once on a 2-core AMD EPYC. At 32 px a
# batch of 340 samples fits, so the small-image recipes run in one pass, as before.
CPU_CHUNK_BYTES = 8 * 2 ** 20


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic): a well-mixed 64-bit output per input counter."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, epoch: int, index: Sequence[int], streams: int, draws: int) -> np.ndarray:
    """(len(index), streams, draws) uniforms in [0, 1), a pure function of (seed, epoch, index, stream, draw)."""
    keys = np.array([sample_seed(seed, epoch, int(i)) for i in index], dtype=np.uint64)
    counter = np.arange(streams * draws, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = _mix64(_mix64(keys)[:, None] + counter[None, :])
    return ((z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53).reshape(len(keys), streams, draws)


def crop_boxes(u: np.ndarray, height: int, width: int, scale: Tuple[float, float],
               ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """RandomResizedCrop.get_params for every row of ``u`` (n, 40): (top, left, h, w) int64, the first of 10
    attempts that fits, else torchvision's central fallback."""
    n = u.shape[0]
    u = u.reshape(n, _ATTEMPTS, 4)
    area = height * width
    target = area * (scale[0] + u[..., 0] * (scale[1] - scale[0]))
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(lo + u[..., 1] * (hi - lo))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)   # round half to even, like Python's round
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.argmax(1)
    rows = np.arange(n)
    h, w, found = h[rows, first], w[rows, first], ok[rows, first]
    top = np.floor(u[rows, first, 2] * (height - h + 1)).astype(np.int64)
    left = np.floor(u[rows, first, 3] * (width - w + 1)).astype(np.int64)
    # torchvision's fallback: the largest central crop whose aspect ratio is within range
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    h, w = np.where(found, h, fh), np.where(found, w, fw)
    top = np.where(found, top, (height - fh) // 2)
    left = np.where(found, left, (width - fw) // 2)
    return np.stack([top, left, h, w], 1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Each image's box (top, left, h, w) resized to size x size (bilinear, half-pixel centres, the crop's own
    edge pixels repeated beyond it: torchvision's resize of the cropped tensor), mirrored where ``flip``."""
    n, _, height, width = x.shape
    pos = (torch.arange(size, device=x.device, dtype=torch.float32) + 0.5) / size  # output pixel centres in 0..1
    top, left, h, w = (boxes[:, k, None].to(torch.float32) for k in range(4))
    ys = (top + pos * h - 0.5).clamp_(min=top, max=top + h - 1)
    xs = (left + pos * w - 0.5).clamp_(min=left, max=left + w - 1)
    xs = torch.where(flip[:, None], xs.flip(1), xs)
    gy = (2 * ys + 1) / height - 1  # grid_sample's normalised coordinates (align_corners=False)
    gx = (2 * xs + 1) / width - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, h, w) luma with torchvision's weights (its own formula: 0.2989 r + 0.587 g + 0.114 b)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])


def brightness(x, f):
    return (x * _per_sample(f)).clamp_(0, 1)


def contrast(x, f):
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return torch.lerp(mean.expand_as(x), x, _per_sample(f)).clamp_(0, 1)


def saturation(x, f):
    return torch.lerp(grayscale(x).expand_as(x), x, _per_sample(f)).clamp_(0, 1)


def hue(x, shift):
    """Rotate the hue by ``shift`` turns, value and saturation kept. The hue (in sixths of a turn) comes from the
    channel extremes; each channel is then rebuilt as max - chroma * clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6 h) mod 6, n = 5, 3, 1 for r, g, b."""
    r, g, b = x.unbind(1)
    hi = torch.maximum(torch.maximum(r, g), b)
    chroma = hi - torch.minimum(torch.minimum(r, g), b)
    inv = chroma.clamp_min(1e-12).reciprocal_()  # a grey pixel (chroma 0) keeps its value whatever its hue
    max_r = hi == r
    max_g = (hi == g) & ~max_r
    h6 = torch.where(max_r, (g - b).mul_(inv), torch.where(max_g, (b - r).mul_(inv).add_(2), (r - g).mul_(inv).add_(4)))
    h6 = h6.add_(6 * shift.view(-1, 1, 1)).remainder_(6)
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = h6 + n
        k = k.sub_((k >= 6).to(k.dtype).mul_(6))
        t = torch.minimum(k, 4 - k).clamp_(0, 1)
        torch.addcmul(hi, chroma, t, value=-1, out=out[:, c])
    return out


JITTER_OPS = (brightness, contrast, saturation, hue)


def color_jitter(x, factors, selected):
    """ColorJitter(0.4, 0.4, 0.2, 0.1): ``selected[pos][op]`` holds the rows (a device index tensor, or None for
    none) whose ``pos``-th op in their own order is ``op``, among the rows that jitter at all."""
    x = x.clone()
    for pos in range(4):
        for op in range(4):
            sel = selected[pos][op]
            if sel is not None:
                x[sel] = JITTER_OPS[op](x[sel], factors[sel, op])
    return x


def jitter_rows(apply: np.ndarray, order: np.ndarray) -> list:
    """Host-side row numbers for :func:`color_jitter`: [pos][op] -> int64 array."""
    return [[np.flatnonzero(apply & (order[:, pos] == op)) for op in range(4)] for pos in range(4)]


def blur_kernel_size(sigma_max: float) -> int:
    return 2 * math.ceil(3 * sigma_max) + 1


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur, each image with its own sigma (one kernel size), reflect padding."""
    n, c, height, width = x.shape
    t = torch.arange(kernel_size, device=x.device, dtype=torch.float32) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, K)
    pad = kernel_size // 2
    y = x.reshape(1, n * c, height, width)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), k[:, None, None, :], groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k[:, None, :, None], groups=n * c)
    return y.view(n, c, height, width)


class BatchedTwoViews:
    """The two MoCo v3 views of a uint8 batch (n, h, w, 3), per-sample parameters keyed by (seed, epoch, index).
    View 1: blur p=1.0, no solarize; view 2: blur p=0.1, solarize p=0.2 (as ``transforms.pretrain_transform``)."""

    def __init__(self, size: int, crop_min: float, mean, std, blur: bool, solarize: bool, seed: int = 0,
                 sigma: Tuple[float, float] = (0.1, 2.0)):
        self.size, self.scale, self.seed = size, (crop_min, 1.0), seed
        self.mean, self.std = tuple(mean), tuple(std)
        self.sigma = sigma
        self.blur_p = (1.0, 0.1) if blur else (0.0, 0.0)
        self.solarize_p = (0.0, 0.2) if solarize else (0.0, 0.0)
        self.kernel = blur_kernel_size(sigma[1])
        self._consts = {}

    @classmethod
    def from_cfg(cls, data_cfg, seed: int):
        from .transforms import blur_enabled, norm_stats
        mean, std = norm_stats(data_cfg)
        return cls(data_cfg.image_size, data_cfg.crop_min, mean, std, blur_enabled(data_cfg), data_cfg.solarize,
                   seed)

    def host_params(self, index, epoch: int, height: int, width: int) -> list:
        """Per view, a dict of the batch's parameters (host numpy arrays)."""
        u = uniforms(self.seed, epoch, index, 2, _DRAWS)
        out = []
        for v in range(2):
            uv = u[:, v]
            jit = uv[:, _JITTER:_JITTER + 9]
            factors = np.stack([0.6 + 0.8 * jit[:, 1], 0.6 + 0.8 * jit[:, 2], 0.8 + 0.4 * jit[:, 3],
                                -0.1 + 0.2 * jit[:, 4]], 1)
            p = dict(boxes=crop_boxes(uv[:, _CROP:_FLIP], height, width, self.scale),
                     flip=uv[:, _FLIP] < 0.5,
                     jitter=jit[:, 0] < 0.8, factors=factors,
                     order=np.argsort(jit[:, 5:9], axis=1),  # a uniformly random permutation per sample
                     gray=uv[:, _GRAY] < 0.2,
                     blur=uv[:, _BLUR] < self.blur_p[v],
                     sigma=self.sigma[0] + uv[:, _BLUR + 1] * (self.sigma[1] - self.sigma[0]),
                     solarize=uv[:, _SOLARIZE] < self.solarize_p[v])
            out.append(p)
        return out

    def params(self, index, epoch: int, height: int, width: int, device=None) -> list:
        """Per view, a dict of the batch's parameters (tensors on ``device``)."""
        return [{k: torch.as_tensor(a, device=device, dtype=torch.float32 if a.dtype == np.float64 else None)
                 for k, a in p.items()} for p in self.host_params(index, epoch, height, width)]

    @staticmethod
    def rows(p: dict) -> dict:
        """The row numbers (host int64 arrays) each selective op applies to, from host parameters ``p``."""
        return dict(jitter=jitter_rows(p["jitter"], p["order"]), gray=np.flatnonzero(p["gray"]),
                    blur=np.flatnonzero(p["blur"]), solarize=np.flatnonzero(p["solarize"]))

    def view(self, x: torch.Tensor, p: dict, normalize: bool = True, rows: Optional[dict] = None,
             cropped: bool = False) -> torch.Tensor:
        """Views of the float (n, 3, h, w) batch in [0, 1] with parameters ``p`` (one row per output image; ``x``
        is repeated when ``p`` has a multiple of its rows: both views of a batch are computed as one). ``rows``:
        the device index tensors of :meth:`upload` (None: found from ``p``, which reads it on the host).
        ``cropped``: ``x`` holds each view's crop already resized to the output size and flipped (the crops and
        dali paths cut it with the same boxes and flips); no geometry is left."""
        if len(p["flip"]) != len(x):
            x = x.repeat(len(p["flip"]) // len(x), 1, 1, 1)
        if rows is None:
            host = {k: p[k].cpu().numpy() for k in ("jitter", "order", "gray", "blur", "solarize")}
            rows = self._to_device(self.rows(host), x.device)
        if cropped:
            y = x
        else:
            y = resized_crop(x, p["boxes"], self.size, p["flip"])
        y = color_jitter(y, p["factors"], rows["jitter"])
        sel = rows["gray"]
        if sel is not None:
            y[sel] = grayscale(y[sel]).expand(-1, 3, -1, -1)
        sel = rows["blur"]
        if sel is not None:
            y[sel] = gaussian_blur(y[sel], p["sigma"][sel], self.kernel)
        sel = rows["solarize"]
        if sel is not None:
            z = y[sel]
            y[sel] = torch.where(z >= 128 / 255, 1 - z, z)
        if normalize:
            inv, shift = self._constants(y.device)
            y = torch.addcmul(shift, y, inv)
        return y

    def _constants(self, device):
        """The normalisation's scale and shift on ``device``, made once (a per-call upload would be a host sync)."""
        key = str(device)
        if key not in self._consts:
            inv = torch.tensor([1 / s for s in self.std]).view(1, 3, 1, 1)
            shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(1, 3, 1, 1)
            self._consts[key] = (inv.to(device), shift.to(device))
        return self._consts[key]

    @staticmethod
    def _to_device(rows: dict, device) -> dict:
        """All row numbers in one host buffer, one copy to ``device`` (pinned and asynchronous on a GPU), then split
        there at offsets known on the host: no read back, and an empty selection is None."""
        flat = [rows["jitter"][pos][op] for pos in range(4) for op in range(4)] + \
            [rows[k] for k in ("gray", "blur", "solarize")]
        host = torch.from_numpy(np.concatenate(flat).astype(np.int64))
        dev = upload(host, device)
        out, at = [], 0
        for a in flat:
            out.append(dev[at:at + len(a)] if len(a) else None)
            at += len(a)
        return dict(jitter=[out[4 * pos:4 * pos + 4] for pos in range(4)], gray=out[16], blur=out[17],
                    solarize=out[18])

    def upload(self, p: dict, device) -> Tuple[dict, dict]:
        """Host parameters ``p`` -> (the device tensors :meth:`view` reads, the device row numbers): two copies."""
        packed = np.concatenate([p["boxes"].astype(np.float32), p["flip"][:, None].astype(np.float32),
                                 p["factors"].astype(np.float32), p["sigma"][:, None].astype(np.float32)], 1)
        dev = upload(torch.from_numpy(np.ascontiguousarray(packed)), device)
        params = dict(boxes=dev[:, 0:4], flip=dev[:, 4] > 0.5, factors=dev[:, 5:9], sigma=dev[:, 9])
        return params, self._to_device(self.rows(p), device)

    def crop_windows(self, index: int, epoch: int, height: int, width: int):
        """The geometry of both views of sample ``index`` in an image of that size, as :meth:`host_params` draws it:
        (2, 4) int64 (top, left, h, w) boxes and (2,) bool flips (the crops and dali paths cut with them)."""
        u = uniforms(self.seed, epoch, [index], 2, _DRAWS)[0]
        return crop_boxes(u[:, _CROP:_FLIP], height, width, self.scale), u[:, _FLIP] < 0.5

    def __call__(self, images: torch.Tensor, index, epoch: int, device: Optional[torch.device] = None,
                 normalize: bool = True):
        """(view1, view2) float32 (n, 3, size, size) on ``device`` from uint8 (n, h, w, 3) ``images``, or from uint8
        (n, 2, size, size, 3) crops (both views of each sample, cut and flipped by :meth:`crop_windows`). ``index``
        (the samples' positions) is read on the host: pass it as a host array or list, not a device tensor."""
        outs = list(self.chunks(images, index, epoch, device, normalize))
        if len(outs) == 1:
            return outs[0][1], outs[0][2]
        n = len(images)
        v1 = outs[0][1].new_empty((n,) + outs[0][1].shape[1:])
        v2 = torch.empty_like(v1)
        for s, y1, y2 in outs:
            v1[s:s + len(y1)], v2[s:s + len(y2)] = y1, y2
        return v1, v2

    def chunks(self, images: torch.Tensor, index, epoch: int, device=None, normalize: bool = True):
        """Yields (first sample, view-1 rows, view-2 rows) of :meth:`__call__`, the whole batch at once on a GPU and
        a few samples at a time on a CPU (their temporaries then stay in the cache: 2.9-3.5x faster at 224 px)."""
        device = torch.device(device or images.device)
        cropped = images.dim() == 5
        n = len(images)
        x = images.to(device, non_blocking=True)
        index = index.tolist() if torch.is_tensor(index) else list(index)
        height, width = x.shape[-3:-1]
        p1, p2 = self.host_params(index, epoch, height, width)
        per_sample = 2 * 3 * 4 * max(self.size ** 2, height * width)  # float bytes of its two views
        step = n if device.type != "cpu" else max(1, CPU_CHUNK_BYTES // per_sample)
        for s in range(0, n, step):
            e = min(n, s + step)
            params, rows = self.upload({k: np.concatenate([p1[k][s:e], p2[k][s:e]]) for k in p1}, device)
            # both views in one pass: (2(e-s), ...) rows, view 1 first; uncropped images are repeated by view()
            rows_in = x[s:e].transpose(0, 1).reshape(2 * (e - s), *x.shape[2:]) if cropped else x[s:e]
            y = self.view(rows_in.permute(0, 3, 1, 2).float().div_(255), params, rows=rows, cropped=cropped,
                          normalize=normalize)
            yield s, y[:e - s], y[e - s:]


def uint8_normalisation(mean, std) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, 3, 1, 1): ``uint8 * scale + shift`` is the normalised float image."""
    scale = torch.tensor([1 / (255 * s) for s in std]).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    return scale, shift


def upload(host: torch.Tensor, device) -> torch.Tensor:
    """``host`` on ``device`` without a host sync: through pinned memory, asynchronously, on a GPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
