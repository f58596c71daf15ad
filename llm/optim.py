"""Optimizer, gradient clipping and learning-rate schedule for training: AdamW with decay on matrices only,
clipping by the global gradient norm, warmup + cosine.

Weight decay pulls weights toward zero; it helps matrices (attention, MLP, embeddings) and hurts biases
and LayerNorm gains, which is why GPT-2 style training decays only parameters with two or more
dimensions. The schedule warms up linearly from 0 to `lr` over `warmup_steps`, then follows a cosine
down to `min_lr` at `max_steps`, and stays there.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn


def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
          device_type: str) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every parameter in one pass over its memory, where the default loop makes
    # several passes per tensor: on a CPU the optimizer step is then a small part of a training step.
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """The global L2 norm of the model's gradients; where it exceeds `max_norm` (0: no limit), the gradients
    are scaled down to it, as torch's clip_grad_norm_ scales them.

    clip_grad_norm_ itself multiplies every gradient by min(1, max_norm / norm) at every step, a pass over
    all of them that changes nothing on a step under the limit, or with no limit at all (the book's
    recipe): the norm is read back here anyway, so the scaling runs only where it changes something."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    value = norm.item()
    if 0 < max_norm < value:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return value


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                  min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, max_steps, min_lr_ratio))
