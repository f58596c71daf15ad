"""The precision a run picks: training's auto is bf16 only where the CPU computes in bf16 natively, whatever
oneDNN accepts; inference is fp32 unless asked, wherever bf16 is fast."""

from __future__ import annotations

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
