"""The precision a run picks: training's auto is bf16 only where the CPU computes in bf16 natively, whatever
oneDNN accepts; inference is fp32 unless asked, wherever bf16 is fast. And the allocator a CPU run trains
with: freed buffers kept in the heap, not given back to the kernel, for the next step to reuse."""

from __future__ import annotations

from types import MappingProxyType

import pytest
import torch

from llm.hardware import (bf16_is_fast, datasheet_bf16_peak, has_glibc, inference_dtype, measured_matmul_flops,
                          precision_name, train_dtype)
from tests.memory import BUFFER_BYTES, bytes_given_back

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


@pytest.mark.parametrize(("min_run_s", "max_size", "measured_on"), [(0.0, 2048, 256), (float("inf"), 512, 512)])
def test_the_matmul_peak_grows_its_size_only_while_a_product_is_quick(caplog, min_run_s, max_size, measured_on):
    # Where bf16 is emulated, a 2048 product takes many seconds: the size stops once one is slow enough.
    with caplog.at_level("DEBUG", logger="llm.hardware"):
        flops = measured_matmul_flops.__wrapped__(torch.bfloat16, max_size=max_size, min_run_s=min_run_s)
    assert flops > 0
    assert caplog.messages == [f"matmul peak in torch.bfloat16: {flops / 1e9:.0f} GFLOP/s, measured on "
                               f"{measured_on} x {measured_on}"]


def test_a_dtype_is_named_as_params_yaml_names_it_and_a_bad_precision_is_refused():
    assert (precision_name(train_dtype(CPU, "bf16")), precision_name(inference_dtype(CPU))) == ("bf16", "fp32")
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        inference_dtype(CPU, "fp16")


@pytest.mark.skipif(not has_glibc(), reason="needs glibc")
def test_freed_memory_stays_with_the_process_for_the_next_step_to_reuse():
    setup = ("from llm.hardware import keep_freed_memory\n"
             "print(keep_freed_memory() if sys.argv[1] == 'keep' else False)")
    _, default = bytes_given_back(setup, "default")
    assert default > BUFFER_BYTES * 9 // 10  # glibc unmaps a buffer this large as soon as it is freed
    applied, kept = bytes_given_back(setup, "keep")
    assert applied == "True"
    assert kept < BUFFER_BYTES // 20


@pytest.mark.parametrize(("device_name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA L40S", 362), ("NVIDIA L40", 181), ("NVIDIA L4", 121),
    ("NVIDIA GeForce RTX 4090", 165), ("NVIDIA B999", None)])
def test_a_gpus_bf16_peak_is_its_own_models_not_a_shorter_names_it_contains(device_name, tflops):
    peak = datasheet_bf16_peak(device_name)
    assert (peak if peak is None else round(peak / 1e12)) == tflops
