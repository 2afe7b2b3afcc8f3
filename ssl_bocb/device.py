"""What the device runs well: native bf16, and the precision ``auto`` resolves to.

bf16 pays only where the hardware multiplies in it: GPUs with bf16 units, CPUs with AVX-512 BF16 or AMX. On a CPU
without them PyTorch emulates bf16 matrix products, and a ResNet-18 MoCo v3 step at batch 64 took 33 s in bf16
against 0.88 s in fp32 on a 2-core AVX2 EPYC (37 times slower), so ``auto`` picks fp32 there and an explicit bf16
warns once.
"""
from __future__ import annotations

import logging
import os
from typing import Tuple

import torch

log = logging.getLogger(__name__)
_warned = set()


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


# the flags that decide CPU speed here (fp32 vector width, native bf16), named beside every CPU figure
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine_name(device) -> str:
    """What ran: the GPU's name on CUDA, else the CPU model with its speed flags and the cores this process may use,
    e.g. "AMD EPYC (avx2 avx512f avx512_bf16; 2 cores)". Recorded with every run, so results name their machine."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    flags = cpu_flags()
    have = " ".join(f for f in SPEED_FLAGS if f in flags) or "no avx2"
    return f"{cpu_model() or 'unknown CPU'} ({have}; {cores} cores)"


def cpu_has_native_bf16() -> bool:
    """True when the CPU runs bf16 matrix products natively (AVX-512 BF16 or AMX); False where unknown.
    ``SSL_BOCB_CPU_BF16=1`` / ``0`` overrides the answer (the tests pin it, so that they run the same everywhere)."""
    forced = os.environ.get("SSL_BOCB_CPU_BF16", "")
    if forced in ("0", "1"):
        return forced == "1"
    if {"avx512_bf16", "amx_bf16"} & cpu_flags():
        return True
    try:  # other systems: PyTorch's own CPU capability query (private, so guarded)
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:
        return False


def native_bf16(device: torch.device) -> Tuple[bool, str]:
    """(whether ``device`` computes bf16 natively, the reason in words)."""
    kind = torch.device(device).type
    if kind == "cpu":
        if cpu_has_native_bf16():
            return True, "the CPU has AVX-512 BF16 / AMX"
        return False, "the CPU has no avx512_bf16 / amx_bf16, so bf16 is emulated (tens of times slower than fp32)"
    if kind == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name(device)} has bf16 units"
        return False, f"{torch.cuda.get_device_name(device)} has no bf16 units"
    if kind == "xpu" and hasattr(torch, "xpu"):
        return bool(torch.xpu.is_bf16_supported()), "the XPU's bf16 support"
    return False, f"bf16 speed on {kind} devices is not known to ssl_bocb"


def resolve_precision(requested: str, device, where: str = "train.mixed_precision") -> str:
    """The Accelerate mixed-precision value for ``requested`` (auto | no | bf16 | fp16) on ``device``: auto is bf16
    where the device runs it natively, else no (fp32). An explicit bf16 without native support warns once."""
    if requested == "auto":
        ok, _ = native_bf16(device)
        return "bf16" if ok else "no"
    if requested == "bf16":
        ok, why = native_bf16(device)
        if not ok and (where, str(device)) not in _warned:
            _warned.add((where, str(device)))
            log.warning("%s=bf16 on %s: %s; %s=auto (or no) runs fp32 here", where, torch.device(device).type, why,
                        where)
    return requested


def is_convolutional(model: torch.nn.Module) -> bool:
    """More than one 2-d convolution (a ViT's patch projection alone does not count)."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) > 1


def use_channels_last(requested, model: torch.nn.Module, device: torch.device) -> bool:
    """``train.channels_last`` (null = auto): channels-last for convolutional backbones on CPU and CUDA. Measured on
    a 2-core AVX2 EPYC, a ResNet-18 MoCo v3 step at 32 px ran 71-72 img/s channels-last against 58.5 contiguous at
    batch 256 (58 / 50 at batch 64); on CUDA it is PyTorch's advice for convolutions (not measured here). ViTs keep
    the default layout."""
    if requested is not None:
        return bool(requested)
    return device.type in ("cpu", "cuda") and is_convolutional(model)


def use_compile(requested, device: torch.device) -> bool:
    """``train.compile`` (null = auto): off. On the 2-core EPYC, torch.compile of a ResNet-18 MoCo v3 step took 50-80 s
    to compile and then ran no faster than eager channels-last (69.8 against 71-72 img/s); on GPUs it has not been
    measured here, so it stays an explicit choice."""
    return bool(requested)
