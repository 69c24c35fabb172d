"""Throughput and true MFU.

MFU = model FLOPs actually performed per second / the device's peak. The FLOPs come from the
registry's per-family function (matmuls, the Σlen² attention term, the LM head only where there is
a loss). The peak is exact for known GPUs (dense, no sparsity) and *measured* on CPU: a matmul
benchmark at start-up, so MFU on CPU means "fraction of what this CPU's matmul reaches".

Two bugs this avoids, both seen in Open-dLLM's counter: returning 0 for families it doesn't know
(here an unknown family raises at model build time) and matching GPU names by substring ("H20" is a
substring of "H200"). Names are matched with word boundaries, most specific first, and an unknown
GPU gives mfu=None with a warning instead of a made-up number.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Optional

import torch

logger = logging.getLogger(__name__)

# Dense peak TFLOP/s (no sparsity) by (name pattern, dtype). First match wins: keep specific first.
_GPU_PEAKS = [
    (r"\bH200\b", {"bf16": 989.4, "fp32": 66.9}),
    (r"\bH20\b", {"bf16": 148.0, "fp32": 44.0}),
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756.0, "fp32": 51.0}),
    (r"\bH100\b.*\bNVL\b", {"bf16": 835.0, "fp32": 60.0}),
    (r"\bH100\b", {"bf16": 989.4, "fp32": 66.9}),
    (r"\bH800\b", {"bf16": 989.4, "fp32": 66.9}),
    (r"\bB200\b", {"bf16": 2250.0, "fp32": 80.0}),
    (r"\bA100\b", {"bf16": 312.0, "fp32": 19.5}),
    (r"\bA800\b", {"bf16": 312.0, "fp32": 19.5}),
    (r"\bL40S\b", {"bf16": 362.0, "fp32": 91.6}),
    (r"\bA10G?\b", {"bf16": 125.0, "fp32": 31.2}),
    (r"\bRTX 4090\b", {"bf16": 165.2, "fp32": 82.6}),
]


def gpu_peak_flops(name: str, dtype: str) -> Optional[float]:
    """Peak FLOP/s for a CUDA device name (torch.cuda.get_device_name()), or None if unknown."""
    key = "bf16" if dtype in ("bf16", "bfloat16", "fp16", "float16") else "fp32"
    for pattern, peaks in _GPU_PEAKS:
        if re.search(pattern, name):
            return peaks[key] * 1e12
    return None


def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = 1024, repeats: int = 5,
                        device: str = "cpu") -> float:
    """Best-of-N FLOP/s of a square matmul on this device (CPU: what MFU is measured against)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.matmul(a, b)  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def matmul_dtype(mixed_precision: str, param_dtype: torch.dtype) -> str:
    """The dtype the model's matmuls actually run in: 'bf16', 'fp16' or 'fp32'.

    Weights loaded in bf16 run bf16 matmuls even with train.mixed_precision=fp32; taking the peak
    from the mixed-precision setting alone picked the fp32 peak there and read ~15x too high on an H100.
    """
    if param_dtype == torch.float16:
        return "fp16"
    if mixed_precision == "bf16" or param_dtype == torch.bfloat16:
        return "bf16"
    return "fp32"


def device_peak_flops(device: torch.device, compute_dtype: str, override: Optional[float] = None) -> Optional[float]:
    """Peak FLOP/s of `device` for matmuls in `compute_dtype` (see `matmul_dtype`)."""
    if compute_dtype not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"compute_dtype must be 'bf16', 'fp16' or 'fp32', got {compute_dtype!r}")
    if override:
        return float(override)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, compute_dtype)
        if peak is None:
            logger.warning("Unknown GPU %r: MFU will be reported as null. Set train.peak_flops to "
                           "its dense peak FLOP/s to get MFU.", name)
        return peak
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[compute_dtype]
    return measure_matmul_peak(dtype)


class Throughput:
    """Tokens/s and MFU over the last logging window, plus an ETA."""

    def __init__(self, peak_flops: Optional[float], world_size: int = 1):
        self.peak = peak_flops
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.flops = 0.0

    def add(self, tokens: int, flops: float) -> None:
        self.tokens += tokens
        self.flops += flops

    def read(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tok_s = self.tokens / dt
        # tokens/flops are this rank's; the peak is per device, so the ratio is per-device MFU.
        mfu = None if not self.peak else self.flops / dt / self.peak
        return {"tokens_per_s": tok_s * self.world_size, "tokens_per_s_per_device": tok_s, "mfu": mfu,
                "window_s": dt}


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mem_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
                "mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    try:  # resident set of this process (CPU): the honest number on a CPU run
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return {"mem_rss_gib": int(line.split()[1]) / 2**20}
    except OSError:
        pass
    return {}


def passes(objective, mb: dict, corr) -> int:
    """How many times the model computes each data token of a micro-batch: bd3lm's [x_t ; x_0]
    streams, times the complementary copies on the batch axis (bd3lm, d3llm)."""
    return getattr(objective, "streams", 1) * (corr.masked.shape[0] // mb["input_ids"].shape[0])


def step_flops(config, objective, micro, corrs, trainable) -> float:
    """Model FLOPs of one optimizer step over its micro-batches (the family's flops_fn, per document
    length, LM head at the loss positions only; `trainable` as the family's flops_fn takes it)."""
    from veomni.models.registry import get_spec

    fn = get_spec(config.model_type).flops_fn
    total = 0.0
    for mb, corr in zip(micro, corrs):
        # EditFlow runs the model on x_t, not on the data rows: its corr carries the rows it computed.
        seg = getattr(corr, "segment_ids", mb["segment_ids"]).cpu()  # one sync, then host-side counting
        lens = [int(n) for row in seg for n in torch.bincount(row[row > 0]) if n > 0]
        lens = lens * passes(objective, mb, corr)
        total += fn(config, lens, head_tokens=int(corr.targets.numel()), attn_mode=objective.attn_mode,
                    block_size=objective.block_size, trainable=trainable)
    return total
