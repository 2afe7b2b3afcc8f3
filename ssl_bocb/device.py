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
