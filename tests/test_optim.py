import math

import pytest

from llm.model import GPT, model_config
from llm.optim import adamw, lr_factor, warmup_cosine


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
