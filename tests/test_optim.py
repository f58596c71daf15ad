import math

import pytest
import torch

from llm.model import GPT, model_config
from llm.optim import adamw, clip_gradients, lr_factor, warmup_cosine


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup_steps=10, max_steps=110, min_lr_ratio=0.1) for s in range(130)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:110], factors[11:111]))
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[110:] == [pytest.approx(0.1)] * 20


def test_weight_decay_applies_to_matrices_only():
    model = GPT(model_config("tiny", vocab_size=128))
    optimizer = adamw(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == model.num_params(False)
    scheduler = warmup_cosine(optimizer, warmup_steps=2, max_steps=10, min_lr_ratio=0.1)
    assert scheduler.get_last_lr()[0] == pytest.approx(5e-4)
    optimizer.step()  # no gradients yet: changes nothing, but keeps torch's call-order check quiet
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3)


def _model_with_gradients(scale: float) -> GPT:
    model = GPT(model_config("tiny", vocab_size=128))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    next(model.parameters()).grad = None  # a parameter without a gradient, as a frozen one under LoRA
    return model


@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_clipping_scales_as_torchs_clip_grad_norm_over_the_limit_and_not_at_all_under_it(max_norm):
    ours, reference = _model_with_gradients(0.1), GPT(model_config("tiny", vocab_size=128))
    for a, b in zip(ours.parameters(), reference.parameters()):
        b.grad = None if a.grad is None else a.grad.clone()
    before = [None if p.grad is None else p.grad.clone() for p in ours.parameters()]

    norm = clip_gradients(ours, max_norm)

    expected = torch.nn.utils.clip_grad_norm_([p for p in reference.parameters() if p.grad is not None], max_norm)
    assert norm == pytest.approx(expected.item(), rel=1e-6) and norm > 0.5
    for p, q, old in zip(ours.parameters(), reference.parameters(), before):
        if old is None:
            assert p.grad is None
        elif max_norm < norm:
            torch.testing.assert_close(p.grad, q.grad)
        else:
            assert torch.equal(p.grad, old)
    if max_norm < norm:
        grads = [p.grad.flatten() for p in ours.parameters() if p.grad is not None]
        clipped = torch.linalg.vector_norm(torch.cat(grads))
        assert clipped.item() == pytest.approx(max_norm, rel=1e-4)


def test_a_limit_of_0_is_no_limit_and_the_norm_is_still_measured():
    model = _model_with_gradients(10.0)
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    norm = clip_gradients(model, 0)
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert norm == pytest.approx(torch.linalg.vector_norm(torch.cat([g.flatten() for g in before])).item(), rel=1e-5)
    assert norm > 1 and all(torch.equal(a, b) for a, b in zip(before, after))
