"""The machine a run uses: its device, the precision it computes in, its peak FLOP/s for MFU, and how its
C allocator treats the memory a training step frees.

The precision rule: training computes in bf16 where the hardware runs bf16 natively (`precision: auto`,
its default), inference always in fp32 unless you ask for bf16. Inference is the evaluate stage (its
perplexity, answers and scores), the served MLflow model, `llm.generate` and `llm.chat`; asking is
`evaluate.precision: bf16` in params.yaml or `--precision bf16`, and `auto` there means bf16 where it is fast.

Why inference does not default to auto: bf16 keeps 8 bits of mantissa, enough to swap the two likeliest
tokens now and then, and greedy text then parts from fp32's for good (a GPT-2 converted from transformers
did so after 9 tokens on a CPU with AVX512-BF16). With an auto default, the evaluate stage's answers and
scores would change with the machine that ran `dvc repro`. In fp32 they are the same on every CPU and on
CUDA to fp32 rounding (PyTorch leaves TF32 matmuls off by default, and nothing here turns them on): only
a near-tie of two logits could still part. Training's auto stays: its weights depend on the host's
arithmetic anyway, and each training run records the dtype it used (`precision_used`).

MFU (model FLOPs utilisation) is the share of the hardware's peak that the model's useful FLOPs reach.
On CUDA the peak comes from the card's datasheet (dense bf16); on a CPU, which has no datasheet figure
we can trust, it is measured: the rate of a large matmul in the training dtype, once per process.

The allocator: a training step frees and allocates the same large buffers at every step (the gradients,
set to None after each step; the embedding's dense gradient, zero-filled; autocast's bf16 copies of the
weights). glibc's malloc serves each one above its mmap threshold (32 MB at most) with a fresh mmap and
unmaps it when freed, so the first write to each of its pages faults again at every step, a cost that
grows with the vocabulary, not with the batch. `keep_freed_memory` turns that off for the process (the
trainer does so on a CPU): freed buffers stay in the heap and the next step reuses them as they are. The
price: a process keeps its peak of memory until it exits. `python -m benchmarks.allocator` measures the
gain, with the trainer under each setting.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
import time
from contextlib import AbstractContextManager, nullcontext

import torch

from llm.config import INFERENCE_PRECISION, PRECISIONS, Precision

_log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks from NVIDIA's datasheets, by the part of the device name that names the
# model (torch.cuda.get_device_name: "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA L40S").
_CUDA_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "A100": 312e12,
                   "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "RTX 4090": 165e12,
                   "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def datasheet_bf16_peak(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device from its name, None for one not listed. The longest listed
    name in it wins: an H100 PCIe is not the SXM part's "H100", nor an L40S an "L4"."""
    matches = [model for model in _CUDA_BF16_PEAK if model in device_name]
    return _CUDA_BF16_PEAK[max(matches, key=len)] if matches else None


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameters, from glibc's malloc.h
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # the most mallopt takes (an int): free memory at the heap's top kept


def has_glibc() -> bool:
    """Whether this process runs on glibc, whose malloc `keep_freed_memory` sets."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large buffers from its heap and keep what is freed, for the whole process
    (see the module's docstring); False, and nothing changed, where the C library is not glibc."""
    if not has_glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success; the heap's top is kept first, so that no step sees mmap off alone.
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES) and libc.mallopt(_M_MMAP_MAX, 0))


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA GPU; set device: auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' asked for, but this machine has no MPS; set device: auto or cpu")
    return torch.device(name)


# CPU features that compute in bf16 natively: x86's AVX512-BF16 and AMX, ARM's BF16 (and SVE's).
_CPU_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def bf16_is_fast(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Not oneDNN's own bf16 check: it also says yes on plain AVX-512, where bf16 is converted in
        # software; there a bf16 matmul ran at 60 GFLOP/s against fp32's 319 (2 cores, no AVX512-BF16).
        capabilities = torch.cpu.get_capabilities()
        native = any(capabilities.get(feature, False) for feature in _CPU_BF16_FEATURES)
        return native and torch.backends.mkldnn.is_available()
    return False


def train_dtype(device: torch.device, precision: Precision = "auto") -> torch.dtype:
    """The autocast dtype: bf16 where asked for or (auto) where fast, else fp32 (no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and bf16_is_fast(device)):
        return torch.bfloat16
    return torch.float32


def inference_dtype(device: torch.device, precision: Precision = INFERENCE_PRECISION) -> torch.dtype:
    """The dtype to generate in: each choice means what it means for training, but the default is fp32 (the
    module's docstring says why). bf16 weights halve the bytes a decoding step reads, but on a CPU that is
    not what bounds it: PyTorch's bf16 products of a few rows run well below memory speed, and at the
    `cpu-small` width bf16 decodes one prompt slower than fp32, 8 prompts a little faster
    (benchmarks/kvcache.py prints both ratios). Where the products have many rows, as in training and the
    evaluate stage's perplexity, bf16 is the faster."""
    return train_dtype(device, precision)


def precision_name(dtype: torch.dtype) -> Precision:
    """How params.yaml names a dtype that train_dtype or inference_dtype chose: what a run records."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Mixed precision for the forward pass; the weights and the optimizer stay fp32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@functools.cache
def measured_matmul_flops(
    dtype: torch.dtype = torch.float32, max_size: int = 2048, min_run_s: float = 0.05
) -> float:
    """FLOP/s of a square matmul on the CPU: the fastest of 8 runs, so that a moment when the machine is
    busy with something else does not lower the peak (and inflate MFU). The side doubles from 256 up to
    `max_size`, stopping early once one product takes `min_run_s`: where the dtype is emulated (bf16 on a
    CPU without native bf16, a hundred times slower than fp32) a 2048 product takes many seconds and
    stalled a run's first step for minutes, while a smaller one measures the same rate."""
    size = 256
    while True:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        start = time.perf_counter()
        a @ b  # also the warm-up of this size
        if time.perf_counter() - start >= min_run_s or size >= max_size:
            break
        size *= 2
    best = float("inf")
    for _ in range(8):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    flops = 2 * size**3 / best
    _log.debug("matmul peak in %s: %.0f GFLOP/s, measured on %d x %d", dtype, flops / 1e9, size, size)
    return flops


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The FLOP/s to measure MFU against, or None where unknown (MPS, an unlisted GPU)."""
    if device.type == "cpu":
        return measured_matmul_flops(dtype)
    if device.type == "cuda":
        peak = datasheet_bf16_peak(torch.cuda.get_device_name(device))
        return peak if peak is None or dtype == torch.bfloat16 else peak / 2  # tf32 runs at half the rate
    return None
