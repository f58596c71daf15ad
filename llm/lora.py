"""LoRA (the book's appendix E): low-rank adapters on a GPT's linear layers, trained while all else is frozen.

    names = apply_lora(model, rank=16, alpha=16, targets=BLOCK_TARGETS)  # only the adapters train
    ...train...
    merge_lora(model)      # a plain GPT again: save it with llm.checkpoint.save_model

An adapted layer computes `x W^T + b + (alpha / rank) * x A B`, A (in, rank) and B (rank, out). B starts
at zero, so a fresh adapter changes nothing; the weight W and bias b stay frozen under their own names
(`h.0.attn.c_attn.weight`), beside `lora_A` and `lora_B`.

A target names a linear layer by its qualified name or by a suffix of it after a dot: "attn.c_attn" is
every block's query-key-value projection, "c_proj" both of a block's output projections, "h.0.mlp.c_fc"
one layer, "lm_head" the head.

The head is refused as a target while it shares its matrix with the token embedding (tie_weights: true):
merging would have to change the embedding too, or untie the two and change the checkpoint's format.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Every linear layer of a transformer block; the head is left out (tied to wte in GPT-2).
BLOCK_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update, as the book's LinearWithLoRA.

    Scaled by alpha / rank, as in the LoRA paper and most libraries, so that alpha need not change with
    the rank; the book scales by alpha alone, so its (rank r, alpha a) is alpha a * r here. A starts as
    in the printed book, kaiming-uniform with a = sqrt(5) on its (in, rank) shape, which is uniform in
    +-1 / sqrt(rank) (the book's repository has since moved to a normal of that std), and B at zero.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.register_parameter("weight", linear.weight)
        self.register_parameter("bias", linear.bias)
        like = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(self.in_features, rank, **like))
        self.lora_B = nn.Parameter(torch.zeros(rank, self.out_features, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * (x @ self.lora_A @ self.lora_B)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing what this layer computes, its weight W + scale * (A B)^T."""
        delta = (self.lora_A.float() @ self.lora_B.float()).T * self.scale  # (out, in), like W
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.weight + delta.to(self.weight.dtype))
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}, alpha={self.alpha}")


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] | list[str]) -> list[str]:
    """Put adapters on the linear layers that `targets` name and freeze every other parameter, in place.

    Returns the qualified names of the adapted layers. Nothing changes when a target is refused.
    """
    if rank < 1 or alpha <= 0:
        raise ValueError(f"LoRA needs rank >= 1 and alpha > 0, got rank {rank}, alpha {alpha}")
    if not targets:
        raise ValueError(f"no LoRA targets given; name some of the model's linear layers: {_kinds(model)}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge them with merge_lora first")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in targets:
        if not any(_matches(name, target) for name in linears):
            raise ValueError(f"LoRA target {target!r} matches no linear layer; the model's linear layers are "
                             f"{_kinds(model)} (a target is a layer's name or its end after a '.')")
    chosen = [name for name in linears if any(_matches(name, t) for t in targets)]
    _refuse_shared(model, chosen)
    model.requires_grad_(False)
    for name in chosen:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    return chosen


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put plain nn.Linear layers back, in place; returns the model
    with every parameter trainable again, as before apply_lora. A model without adapters is unchanged."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, name, module.merged())
    model.requires_grad_(True)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """The number of parameters that train (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def _kinds(model: nn.Module) -> str:
    """The linear layers' names without their block prefix (h.0.attn.c_attn -> attn.c_attn), once each."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = [re.sub(r"^(.*\.)?\d+\.", "", name) for name in linears]
    return ", ".join(dict.fromkeys(names))


def _refuse_shared(model: nn.Module, chosen: list[str]) -> None:
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name in chosen:
        others = [o for o in owners[id(model.get_submodule(name).weight)] if o != f"{name}.weight"]
        if others:
            raise ValueError(f"LoRA cannot target {name}: its weight is tied to {others[0]} (tie_weights: "
                             f"true), and merging the adapter would change {others[0]} too; leave {name} out "
                             f"of the targets, or use a model with tie_weights: false")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
