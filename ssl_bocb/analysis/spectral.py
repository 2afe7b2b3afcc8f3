"""Per-layer weight diagnostics of a backbone (BOCB paper A.3; ../shared/SPEC.md section 3), in numpy.

``alpha`` and ``matrix_entropy`` follow WeightWatcher 0.7.7's defaults on a CPU (``WeightWatcher.analyze()``:
pooled conv slices, conv2d_norm, its own untruncated power-law fit), so that values agree with it to float
round-off without importing it (it pulls pandas and prints at import):

- a Linear weight [out, in] is one matrix; a Conv2d weight [out, in, kh, kw] is NOT reshaped: each of the kh x kw
  kernel positions gives an [out, in] matrix, scaled by sqrt(1/2) (WeightWatcher's conv2d_norm), and the squared
  singular values of all of them are pooled into one spectrum;
- a layer is skipped (nan) when min(out, in) x kh x kw < 8 or > 15,000 eigenvalues, or max(out, in) > 50,000;
- alpha: eigenvalues <= 1e-5 are dropped; the continuous Clauset-Shalizi-Newman MLE
  alpha = 1 + n / sum(log(x / xmin)) is computed for xmin at every eigenvalue but the largest, and the xmin with
  the smallest Kolmogorov-Smirnov distance wins (an alpha <= 1 counts as distance 1). Under 20 eigenvalues the
  small-sample path runs instead: the bias-corrected alpha = 1 + (n - 1) / sum(log(x / xmin)) over tails of at
  least 8 eigenvalues, xmin again by the smallest KS distance (WeightWatcher's small-sample fit ranks tails by
  KS - 0.868 / sqrt(n), but its caller then takes the smallest KS distance, which is what its results show);
- matrix entropy: -sum p log p / log(rank) with p = s^2 / sum s^2 over the pooled spectrum (+1e-10 in p and in the
  rank, as WeightWatcher does), rank = #{s > max(s) x max(out, in) x float64 eps}.

The other three are the paper's and plain definitions: ``value_entropy`` (Shannon entropy, nats, of a
``bins``-bin histogram of the weight values), ``l2_norm`` of the flattened weights, and ``pca_energy`` (the share
of the k largest eigenvalues of the centred covariance of the weight's rows, flattened per output unit, with
k = ceil(pca_frac x rank))."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

EVALS_THRESH = 1e-5
MIN_EVALS, MAX_EVALS, MAX_N = 8, 15000, 50000
SMALL_N = 20
SMALL_N_MIN_TAIL = 8
EPS = 1e-10


def weight_matrices(w: np.ndarray) -> Tuple[List[np.ndarray], int, int, int]:
    """The matrices WeightWatcher analyses for one weight: ([matrices], N = larger dim, M = smaller dim, rf)."""
    if w.ndim == 2:
        return [w], max(w.shape), min(w.shape), 1
    if w.ndim == 4:
        out, inp, kh, kw = w.shape
        mats = [w[:, :, i, j] for i in range(kh) for j in range(kw)]  # [out, in] slices per kernel position
        if out + inp >= kh + kw:  # "channels last" in WeightWatcher's words
            return mats, max(out, inp), min(out, inp), kh * kw
        # a kernel larger than its channel counts: WeightWatcher detects "channels first", but PyTorch layers are
        # declared channels-last, so it flips back to the same [out, in] slices, with N = out and M = in unsorted
        return mats, out, inp, kh * kw
    raise ValueError(f"weight of shape {w.shape} is neither a matrix nor a conv kernel")


def skipped(n: int, m: int, rf: int) -> Optional[str]:
    if m * rf < MIN_EVALS:
        return f"{m * rf} eigenvalues < {MIN_EVALS}"
    if m * rf > MAX_EVALS:
        return f"{m * rf} eigenvalues > {MAX_EVALS}"
    if n > MAX_N:
        return f"dimension {n} > {MAX_N}"
    return None


def pooled_eigenvalues(w: np.ndarray) -> np.ndarray:
    """Sorted squared singular values of every matrix of ``w`` (conv slices scaled by sqrt(1/2)), float64."""
    mats, _, _, _ = weight_matrices(np.asarray(w, dtype=np.float64))
    scale = math.sqrt(0.5) if w.ndim == 4 else 1.0
    return np.sort((svdvals(np.stack(mats) * scale) ** 2).ravel())


def svdvals(x: np.ndarray) -> np.ndarray:
    """Singular values of a matrix or a stack of matrices, float64 (torch's LAPACK, batched)."""
    return torch.linalg.svdvals(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).numpy()


def powerlaw_alpha(evals: np.ndarray) -> Tuple[float, float, float]:
    """(alpha, xmin, KS distance) of the untruncated continuous power-law fit described in the module docstring."""
    x = np.sort(np.asarray(evals, dtype=np.float64))
    x = x[x > EVALS_THRESH]
    n_all = len(x)
    if n_all < 2:
        return math.nan, math.nan, math.nan
    logx = np.log(x)
    # sum of log(x_j) over the tail starting at i, for every i (suffix sums)
    suffix = np.cumsum(logx[::-1])[::-1]
    idx = np.arange(n_all - 1)
    n = (n_all - idx).astype(np.float64)
    s = suffix[:-1] - n * logx[:-1]
    if n_all >= SMALL_N:
        with np.errstate(divide="ignore"):
            alphas = 1.0 + n / s
        ds = np.ones(n_all - 1)
        for i in np.nonzero(alphas > 1)[0]:
            tail = x[i:]
            ds[i] = np.max(np.abs(1.0 - (tail / x[i]) ** (1.0 - alphas[i]) - np.arange(len(tail)) / len(tail)))
        best = int(np.argmin(ds))
        return float(alphas[best]), float(x[best]), float(ds[best])
    # small-sample path: bias-corrected alphas over tails of at least 8; as in WeightWatcher, the xmin kept is the
    # one with the smallest KS distance (its J = D - 0.868 / sqrt(n) choice is overridden by the caller there)
    alphas = np.zeros(n_all - 1)
    ds = np.ones(n_all - 1)
    valid = False
    for i in range(n_all - 1):
        if n[i] < SMALL_N_MIN_TAIL or s[i] <= 1e-12:
            continue
        a = 1.0 + (n[i] - 1.0) / s[i]
        alphas[i] = a
        if a <= 1.0:
            continue
        tail = x[i:]
        ds[i] = float(np.max(np.abs(np.arange(len(tail)) / n[i] - (1.0 - (tail / x[i]) ** (1.0 - a)))))
        valid = True
    if not valid:  # no tail qualified: the whole spectrum
        if s[0] <= 1e-12:
            return 1.0, float(x[0]), 1.0
        alphas[0] = 1.0 + (n_all - 1.0) / s[0]
        ds[0] = float(np.max(np.abs(np.arange(n_all) / n_all - (1.0 - (x / x[0]) ** (1.0 - alphas[0])))))
    best = int(np.argmin(ds))
    return float(alphas[best]), float(x[best]), float(ds[best])


def matrix_entropy(evals: np.ndarray, n: int) -> float:
    """WeightWatcher's normalised matrix entropy of a spectrum (eigenvalues = squared singular values)."""
    evals = np.asarray(evals, dtype=np.float64)
    sv = np.sqrt(evals)
    rank = np.count_nonzero(sv > np.max(sv) * n * np.finfo(np.float64).eps) + EPS
    p = evals / np.sum(evals) + EPS
    return float(-np.sum(p * np.log(p)) / np.log(rank))


def value_entropy(w: np.ndarray, bins: int = 100) -> float:
    """Shannon entropy (nats) of the histogram of the weight values over ``bins`` equal bins (paper A.3)."""
    counts, _ = np.histogram(np.asarray(w, dtype=np.float64).ravel(), bins=bins)
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def pca_energy(w: np.ndarray, frac: float = 0.1) -> Tuple[float, int]:
    """(share of the k largest eigenvalues of the centred covariance of the rows of w, k). Rows are output units
    (a conv kernel is flattened per output channel); k = ceil(frac x rank of the centred matrix), at least 1."""
    x = np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1)
    x = x - x.mean(axis=0, keepdims=True)
    g = torch.from_numpy(x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x)  # same non-zero eigenvalues
    ev = np.clip(torch.linalg.eigvalsh(g).numpy(), 0.0, None)  # proportional to the covariance eigenvalues
    total = ev.sum()
    if total <= 0:
        return math.nan, 0
    rank = int(np.count_nonzero(ev > ev.max() * max(x.shape) * np.finfo(np.float64).eps))
    k = max(1, math.ceil(frac * rank))
    return float(np.sort(ev)[::-1][:k].sum() / total), k


def layer_metrics(w: np.ndarray, bins: int = 100, pca_frac: float = 0.1) -> Dict:
    """Every metric of one weight tensor (a numpy array: [out, in] or [out, in, kh, kw])."""
    w = np.asarray(w, dtype=np.float64)
    _, n, m, rf = weight_matrices(w)
    row = dict(shape=list(w.shape), n=n, m=m, rf=rf, l2_norm=float(np.linalg.norm(w.ravel())),
               value_entropy=value_entropy(w, bins))
    row["pca_energy"], row["pca_k"] = pca_energy(w, pca_frac)
    why = skipped(n, m, rf)
    if why:
        row.update(alpha=math.nan, xmin=math.nan, ks_distance=math.nan, matrix_entropy=math.nan, num_evals=m * rf,
                   skipped=why)
        return row
    evals = pooled_eigenvalues(w)
    row["alpha"], row["xmin"], row["ks_distance"] = powerlaw_alpha(evals)
    row.update(matrix_entropy=matrix_entropy(evals, n), num_evals=len(evals), skipped="")
    return row


def analysable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Linear and Conv2d modules in ``model.named_modules()`` order (the layers WeightWatcher looks at)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def model_metrics(model: nn.Module, bins: int = 100, pca_frac: float = 0.1) -> List[Dict]:
    """One row per Linear / Conv2d layer: its name, kind and :func:`layer_metrics`."""
    rows = []
    for i, (name, m) in enumerate(analysable_layers(model)):
        w = m.weight.detach().float().cpu().numpy()
        rows.append(dict(index=i, name=name, kind="conv" if w.ndim == 4 else "linear",
                         **layer_metrics(w, bins, pca_frac)))
    return rows
