"""FLOPs a model costs, counted by torch (``torch.utils.flop_counter``) on the meta device, and the peak
FLOPs per second of the device it trains on, for model FLOPs utilisation (MFU) in training logs.

Counting runs the model's forward (and backward) on meta tensors in place of its weights: nothing is
computed or allocated, no random number generator advances, and the model's weights and gradients are
not touched (its forward hooks do see a pass on the meta device), so a run's exact resume is unaffected. The count is the matrix products and convolutions torch's counter
knows (attention included); normalisations and activations are not counted, as is usual for MFU.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from stvq.errors import StvqError

#: Dense tensor-core peaks in TFLOP/s by GPU name (spec sheets: bf16 and TF32 without sparsity, plain fp32).
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},  # SXM
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "tf32": 183.0, "fp32": 91.6},
    "L4": {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3},
}
PEAK_ENV = "STVQ_PEAK_TFLOPS"  # overrides the table and the CPU estimate


def count_flops(model: torch.nn.Module, *inputs: torch.Tensor, backward: bool = True, **options: Any) -> int:
    """FLOPs of ``model(*inputs, **options)`` and, with ``backward``, of the backward pass to the
    parameters that require grad, on the meta device. ``inputs`` are shapes to stand in for (their values
    are not read). The output may be a tensor, a dataclass or a tuple: every floating tensor in it is
    summed for the backward pass."""
    meta_inputs = tuple(torch.empty_like(x, device="meta") for x in inputs)
    with FlopCounterMode(display=False) as counter:
        out = functional_call(model, _meta_state(model), meta_inputs, options)
        if backward:
            total = sum(t.float().sum() for t in _tensors(out) if t.is_floating_point() and t.requires_grad)
            if isinstance(total, torch.Tensor):
                total.backward()
    return int(counter.get_total_flops())


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    if hasattr(out, "__dataclass_fields__"):
        return [t for name in out.__dataclass_fields__ for t in _tensors(getattr(out, name))]
    return []


def device_peak(device: torch.device, bf16: bool) -> tuple[float, str]:
    """(peak FLOP/s of one process's device, where the figure comes from). ``STVQ_PEAK_TFLOPS`` overrides
    it; CUDA reads :data:`GPU_PEAK_TFLOPS` by the device's name (bf16, else TF32 where matmuls may use it,
    else fp32); a CPU's is an estimate from its cores, clock and vector flags (:func:`cpu_peak`)."""
    override = os.environ.get(PEAK_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            raise StvqError(f"{PEAK_ENV}={override!r} is not a number of TFLOP/s, e.g. {PEAK_ENV}=989") from None
        if not (math.isfinite(value) and value > 0):
            raise StvqError(f"{PEAK_ENV}={override!r} must be a finite positive number of TFLOP/s")
        return value * 1e12, f"{PEAK_ENV}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        precision = "bf16" if bf16 else "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
        for key, peaks in GPU_PEAK_TFLOPS.items():  # "H100 PCIe" before "H100"
            if key in name:
                return peaks[precision] * 1e12, f"{name}, {precision} (stvq.flops.GPU_PEAK_TFLOPS)"
        return 0.0, f"{name} is not in stvq.flops.GPU_PEAK_TFLOPS; set {PEAK_ENV}"
    return cpu_peak(torch.get_num_threads(), bf16)


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.is_file() else ""


def _cpu_flags(cpuinfo: str) -> set[str]:
    listed = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    return set(listed.group(1).split()) if listed else set()


def emulates_bf16(device: torch.device, cpuinfo: str | None = None) -> bool:
    """Whether bfloat16 matrix products on ``device`` are emulated: a CPU without AVX512_BF16 or AMX
    (x86 /proc/cpuinfo flags), where torch runs them about 20x slower than float32 (docs/experiments/throughput.md)."""
    if device.type != "cpu":
        return False
    flags = _cpu_flags(_cpuinfo() if cpuinfo is None else cpuinfo)
    return bool(flags) and not flags & {"avx512_bf16", "amx_bf16"}


def cpu_peak(threads: int, bf16: bool = False, cpuinfo: str | None = None) -> tuple[float, str]:
    """An estimate of a CPU's peak FLOP/s over ``threads`` cores: cores x clock x FLOPs per cycle, the
    last from the vector flags (AVX-512: taken as 2 FMA units x 16 fp32 lanes x 2 = 64; AVX2 with FMA: 32; else
    8; bf16 doubles it with AVX512_BF16 and takes AMX's 1024 where the CPU has AMX). ``cpuinfo`` is the
    text of /proc/cpuinfo (read when not given; without it the clock is taken as 2 GHz)."""
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = _cpu_flags(cpuinfo)
    clock = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    ghz = float(clock.group(1)) / 1000 if clock else 2.0
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    if bf16:
        per_cycle = 1024 if "amx_bf16" in flags else 2 * per_cycle if "avx512_bf16" in flags else per_cycle
    what = f"estimate: {threads} cores x {ghz:.2f} GHz x {per_cycle} FLOPs per cycle"
    return threads * ghz * 1e9 * per_cycle, what


def mfu(flops_per_item: int | None, items_per_s: float, peak: float, world: int = 1) -> float | None:
    """Model FLOPs utilisation: the FLOPs the run does per second over ``world`` devices' peak."""
    if not flops_per_item or not peak:
        return None
    return flops_per_item * items_per_s / (peak * world)


def meta_output(module: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """``module(*inputs)`` on the meta device: the output's shape, nothing computed."""
    with torch.no_grad():
        return functional_call(module, _meta_state(module), tuple(torch.empty_like(x, device="meta") for x in inputs))


def _meta_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = {name: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad) for name, p in module.named_parameters()}
    return {**params, **{name: torch.empty_like(b, device="meta") for name, b in module.named_buffers()}}


def mfu_text(summary: dict[str, Any], item: str = "image") -> str:
    """A training summary's FLOPs and MFU in words, for the panel ``stvq train`` prints."""
    flops = summary.get("flops_per_item")
    if not flops:
        return "FLOPs not counted"
    text = f"{flops / 1e9:,.3f} GFLOPs/{item} fwd+bwd"
    if summary.get("mfu") is None:
        return f"{text}; no peak known for MFU ({summary.get('peak_source')})"
    return f"{text}, MFU {summary['mfu']:.1%} of {summary['peak_flops'] / 1e12:,.2f} TFLOP/s ({summary['peak_source']})"


def tokenizer_flops(model: Any, image_size: int) -> dict[str, int]:
    """Per image: ``forward`` (encoder and decoder), ``train`` (stage 1: forward and backward of both),
    ``decoder`` (the decoder's forward alone, what decoding ids costs)."""
    images = torch.empty(1, 3, image_size, image_size)
    return {
        "forward": count_flops(model, images, backward=False),
        "train": count_flops(model, images),
        "decoder": count_flops(model.decoder, meta_output(model.encoder, images), backward=False),
    }


def warn_if_bf16_is_emulated(device: torch.device, bf16: bool) -> None:
    """One warning when ``bf16`` autocast would run emulated on this CPU (:func:`stvq.flops.emulates_bf16`)."""
    if bf16 and emulates_bf16(device):
        warnings.warn(
            "bf16 on this CPU is emulated (it has neither AVX512_BF16 nor AMX): its matrix products run about 20x slower than float32's; leave bf16 off (--bf16, or --train bf16=true in the oracle)",
            stacklevel=2,
        )
