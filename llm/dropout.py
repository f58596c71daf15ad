"""Dropout whose random mask is cheap to draw on a CPU: torch.nn.Dropout's function, another generator.

    from llm.dropout import Dropout
    self.drop = Dropout(0.1)          # in a model, where nn.Dropout(0.1) would be

In training each element is zeroed with probability p and the rest scaled by 1 / (1 - p), as
`F.dropout` does; in eval mode it passes its input through. The difference is where the mask comes
from on a CPU. `F.dropout` draws it with `bernoulli_`, element by element from PyTorch's Mersenne
Twister, and the book's model draws a lot of them (dropout 0.1 after the embeddings, on every layer's
attention weights and after every residual branch): a large part of its training step on a CPU
(benchmarks/dropout.py measures both masks, alone and in the step). Here NumPy's PCG64 fills 16-bit
words in bulk, four from each of its 64-bit draws, and an element is kept where its word is at or above
p * 2**16 (p to within 2**-17, the scale from the same rounded p, so the expectation is exact; a p that
rounds to 0 or to 1 takes F.dropout). Drawing the random bits is most of the mask's cost: 16 of them an
element are half of 32's, and plenty for a rate. In bf16 the scale is rounded to bf16, as F.dropout's is
(for p 0.1, kept elements are multiplied by 1.109 rather than 1.111).

The mask is still a function of torch's global generator: PCG64's seed is one draw from it, so
`torch.manual_seed` decides every mask, as it decides `F.dropout`'s (the trainer reseeds per step for
exact resume, llm/train.py). The masks differ from `F.dropout`'s for the same seed: another generator.
On a GPU, and under torch.compile (which draws its own masks inside its kernels), this is `F.dropout`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_WORD = 2**16  # the mask's random words are uint16, compared as int16 (torch has no uint16 comparison)
_WORDS_PER_DRAW = 4  # PCG64's draws are 64 bits
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer type of each float type's width


def keep_threshold(p: float) -> int:
    """The smallest kept word: an element is dropped where its uniform 16-bit word is below this."""
    return round(p * _WORD)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> Tensor:
    """A bool mask of `shape`, True where an element is kept: each independently with probability
    1 - keep_threshold(p) / 2**16, drawn by PCG64 seeded from torch's global generator."""
    seed = int(torch.empty((), dtype=torch.int64).random_())
    n = math.prod(shape)
    draws = np.random.PCG64(seed).random_raw(-(-n // _WORDS_PER_DRAW))
    words = draws.view(np.int16)[:n]  # uint16 bits, read as int16
    return torch.from_numpy(np.greater_equal(words, keep_threshold(p) - _WORD // 2)).view(shape)


def scaled_keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype) -> Tensor:
    """`keep_mask` in `dtype`: 1 / (1 - p) where kept (of the p the mask draws, rounded to `dtype`), 0
    where dropped. Built in integers, as the scale's bit pattern times 1 or 0: ATen converts bool to a
    float type about ten times slower than to an integer type of its width."""
    bits = _BITS[dtype.itemsize]
    scale = torch.tensor(_WORD / (_WORD - keep_threshold(p)), dtype=dtype).view(bits).item()
    return keep_mask(shape, p).to(bits).mul_(scale).view(dtype)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """`F.dropout(x, p, training)`, with the mask from `scaled_keep_mask` on a CPU outside torch.compile."""
    if not training or p == 0:
        return x
    threshold = keep_threshold(p)
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not 0 < threshold < _WORD:
        return F.dropout(x, p, training)
    return x * scaled_keep_mask(x.shape, p, x.dtype)


class Dropout(nn.Dropout):
    """nn.Dropout computing `dropout`: an nn.Dropout to whatever inspects a model, with no state."""

    def __init__(self, p: float = 0.5):
        super().__init__(p)  # and no `inplace`, which nn.Dropout takes: `dropout` never writes into x

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
