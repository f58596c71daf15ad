"""Dropout with a bulk-drawn mask: F.dropout's function (rate, scale, gradient, eval), seeded by torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm.dropout import Dropout, dropout, keep_threshold
from llm.model import GPT, model_config


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_each_element_is_dropped_with_probability_p_and_the_rest_scaled_as_f_dropout_scales(p):
    x = torch.rand(1_000_000) + 0.5  # no zeros of its own
    y = dropout(x, p)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(p, abs=5 * (p * (1 - p) / x.numel()) ** 0.5)  # five standard errors
    kept = y != 0
    # The scale is 1 / (1 - p) of the p that the 16-bit threshold rounds to: within 2**-17 of p.
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=2**-17 / (1 - p) + 1.3e-6, atol=0)
    assert y.mean().item() == pytest.approx(x.mean().item(), rel=0.01)  # the expectation is kept


def test_the_rate_is_p_to_within_two_to_the_minus_17():
    for p in (0.1, 1 / 3, 0.999):
        assert abs(keep_threshold(p) / 2**16 - p) <= 2**-17


def test_the_mask_is_decided_by_torchs_seed_and_is_fresh_at_every_call():
    x = torch.ones(4, 256, 64)
    torch.manual_seed(7)
    first, second = dropout(x, 0.1), dropout(x, 0.1)
    torch.manual_seed(7)
    assert torch.equal(dropout(x, 0.1), first)
    assert not torch.equal(first, second)
    torch.manual_seed(8)
    assert not torch.equal(dropout(x, 0.1), first)


def test_the_gradient_is_the_mask_and_scale_of_the_forward():
    x = torch.randn(8, 300, requires_grad=True)
    y = dropout(x, 0.25)
    y.backward(torch.ones_like(y))
    kept = y.detach() != 0
    torch.testing.assert_close(x.grad, kept.float() / 0.75)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_output_keeps_the_inputs_dtype_and_shape_and_scales_by_the_scale_in_that_dtype(dtype):
    x = torch.randn(2, 3, 5, 7, dtype=dtype)
    y = dropout(x, 0.1)
    assert y.dtype == dtype and y.shape == x.shape
    kept = y != 0
    scale = torch.tensor(2**16 / (2**16 - keep_threshold(0.1)), dtype=dtype)
    assert 0 < kept.sum() < x.numel() and torch.equal(y[kept], x[kept] * scale)


def test_eval_mode_and_p_zero_pass_the_input_through():
    x = torch.randn(3, 4)
    module = Dropout(0.3).eval()
    assert module(x) is x
    assert dropout(x, 0.0) is x
    assert dropout(x, 0.3, training=False) is x
    assert isinstance(module, torch.nn.Dropout) and repr(module) == repr(torch.nn.Dropout(0.3))


@pytest.mark.parametrize("p", [1 - 2**-20, 2**-20])
def test_a_rate_that_rounds_to_one_or_to_zero_falls_back_to_f_dropout(p):
    x = torch.ones(100_000)
    torch.manual_seed(0)
    expected = F.dropout(x, p, True)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, p), expected)


def test_a_model_with_dropout_trains_deterministically_and_compiles_to_one_graph():
    model = GPT(model_config("tiny", vocab_size=256, dropout=0.1, attention="explicit")).train()
    idx = torch.randint(0, 256, (2, 16))
    torch.manual_seed(3)
    a = model(idx, idx)
    torch.manual_seed(3)
    assert torch.equal(model(idx, idx), a)
    # Under compile the mask is F.dropout's, drawn inside the graph: no NumPy call breaks it.
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.isfinite(compiled(idx, idx))


def test_in_bf16_the_kept_elements_are_scaled_as_f_dropout_scales_them():
    x = torch.rand(100_000, dtype=torch.bfloat16) + 0.5
    ours, theirs = dropout(x, 0.1), F.dropout(x, 0.1)
    assert ours.dtype == torch.bfloat16
    both = (ours != 0) & (theirs != 0)
    assert torch.equal(ours[both], theirs[both])
