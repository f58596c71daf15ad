"""The precision a run picks: training's auto is bf16 only where the CPU computes in bf16 natively, whatever
oneDNN accepts; inference is fp32 unless asked, wherever bf16 is fast. And the allocator a CPU run trains
with: freed buffers reused without faulting their pages in again."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
from types import MappingProxyType

import pytest
import torch

from llm.hardware import bf16_is_fast, inference_dtype, precision_name, train_dtype

CPU = torch.device("cpu")
AVX512 = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bw": True, "avx512_vl": True,
          "avx512_dq": True, "avx512_bf16": False, "amx_bf16": False, "amx_tile": False}


def pretend_cpu(monkeypatch: pytest.MonkeyPatch, **features: object) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: MappingProxyType(features))


@pytest.mark.parametrize("features, fast", [
    (AVX512, False),  # oneDNN runs bf16 here too, in software, several times slower than fp32
    ({**AVX512, "avx512_bf16": True}, True),  # Cooper Lake, Zen 4
    ({**AVX512, "avx512_bf16": True, "amx_bf16": True, "amx_tile": True}, True),  # Sapphire Rapids
    ({"architecture": "x86_64", "avx2": True}, False),
    ({"architecture": "arm64", "neon": True, "bf16": True}, True),  # Graviton 3, Apple M2
    ({"architecture": "arm64", "neon": True, "bf16": False}, False),
])
def test_cpu_bf16_is_fast_only_with_native_bf16(monkeypatch, features, fast):
    pretend_cpu(monkeypatch, **features)
    assert bf16_is_fast(CPU) is fast
    expected = torch.bfloat16 if fast else torch.float32
    assert train_dtype(CPU) == inference_dtype(CPU, "auto") == expected
    assert inference_dtype(CPU) == torch.float32  # the default: the same text on any CPU


def test_an_explicit_precision_overrides_the_hardware(monkeypatch):
    pretend_cpu(monkeypatch, **AVX512)
    assert train_dtype(CPU, "bf16") == torch.bfloat16
    pretend_cpu(monkeypatch, **{**AVX512, "amx_bf16": True})
    assert train_dtype(CPU, "fp32") == torch.float32


def test_a_dtype_is_named_as_params_yaml_names_it_and_a_bad_precision_is_refused():
    assert (precision_name(train_dtype(CPU, "bf16")), precision_name(inference_dtype(CPU))) == ("bf16", "fp32")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        inference_dtype(CPU, "fp16")


# A fresh process: allocates a 128 MB tensor and frees it, then counts the minor page faults of allocating
# and filling one of the same size again, with or without keep_freed_memory() first.
_REUSE = """
import resource, sys, torch
from llm.hardware import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
x = torch.empty(2**25).fill_(1.0)
del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
x = torch.empty(2**25).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc")
def test_kept_memory_is_reused_without_faulting_its_pages_again():
    def faults(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _REUSE, mode], capture_output=True, text=True, check=True)
        applied, count = out.stdout.split()
        return applied, int(count)

    pages = 2**25 * 4 // resource.getpagesize()
    _, default = faults("default")
    assert default > pages // 2  # glibc maps the buffer afresh: every page faults on the first write
    applied, kept = faults("keep")
    assert applied == "True"
    assert kept < pages // 20  # the freed buffer, reused in place
