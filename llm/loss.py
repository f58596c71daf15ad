"""Next-token cross-entropy fused with the LM head.

At small model sizes the head (hidden @ W^T over GPT-2's 50,257 tokens) and the cross-entropy on its
output are most of a training step, and most of *that* is memory traffic, not arithmetic: the plain
path writes the (N, V) logits, reads them for log-softmax, writes log-probabilities, and repeats all of
it backward. Here the logits are turned into the loss and its gradient (softmax - one-hot) in one pass,
the gradient is kept in the compute dtype, and two matmuls at the end give the gradients of the hidden
states and of W. Same values as `F.cross_entropy(hidden @ W.T, targets)` (to the rounding of the
compute dtype).

- fp32 or bf16 (autocast), eager: the logits are computed straight into the gradient's buffer, and ATen's
  softmax kernel turns them into the gradient in place, row by row while each row is in cache: no (N, V)
  temporary. On bf16 logits the kernel computes in fp32 and rounds each probability once, so the bf16
  gradient is the one an fp32 softmax would give, rounded; the target's, p - 1, is the sum of the other
  probabilities, accumulated in fp32 (1 - p from the rounded p would be 0 for any p over 1 - 2**-9), the loss
  within 2**-8 of the exact loss of the bf16 logits, relatively so where p is at least 1/2.
- Another autocast dtype (fp16, whose probabilities lose precision as they shrink): chunks of CHUNK_ROWS
  rows of the logits are upcast to fp32 and turned into their rows of the gradient the same way; never
  more than one chunk of fp32 logits in memory.
- Under torch.compile, one chunk: Inductor fuses the pointwise passes into one kernel over each row
  itself. Even so it beats compiling the plain head + cross-entropy, by one exp per logit and, in bf16,
  the weight gradient laid out for speed (benchmarks/train.py times the whole step against nanoGPT's).

In bf16 on a CPU the logits' product runs by blocks of VOCAB_BLOCK rows of the weight (`head_logits`):
oneDNN multiplies 4,096 vocabulary rows at a time faster than all 50,257 at once (benchmarks/headblocks.py).

Under autocast the matmuls run in the autocast dtype (bf16), as the plain path's would.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

IGNORE_INDEX = -100
Reduction = Literal["mean", "none"]
REDUCTIONS: tuple[str, ...] = typing.get_args(Reduction)
CHUNK_ROWS = 128  # fp32 logits of 128 rows x 50,257 tokens: a 26 MB temporary
# Dtypes whose logits ATen's softmax turns into the gradient in place: it computes them in fp32 and rounds
# once. fp16 would keep too few bits of a small probability for its loss, so it is upcast by chunks.
IN_PLACE_DTYPES = (torch.float32, torch.bfloat16)
# Up to this many rows, a bf16 weight gradient is computed as G^T h, in the weight's layout; above, as
# (h^T G)^T. The second layout multiplies faster as rows grow, but casting its (C, V) product into the
# weight's (V, C) is a transposing pass that costs the same at any row count, and at C 768 several times
# a plain cast (benchmarks/headgrad.py measures both).
DIRECT_GRAD_WEIGHT_ROWS = 1024
# Rows of the weight (tokens of the vocabulary) per product in a bf16 head's forward on a CPU; 0: one product.
VOCAB_BLOCK = 4096
LSE_BLOCK_ROWS = 8  # rows of 50,257 fp32 logits that stay in a core's cache through the passes over them


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def logsumexp_(logits: Tensor) -> Tensor:
    """`torch.logsumexp(logits, dim=1)` of fp32 logits (n, V), to the bit, computed in place: `logits` is
    overwritten.

    torch's computes the rows' maxima, then `(logits - maxima).exp_()` into a new (n, V) tensor, and sums
    it: a temporary the size of the logits and passes over memory that does not fit a cache. On a CPU the
    same operations run here on blocks of LSE_BLOCK_ROWS rows in place, each block still in cache for its
    next pass, and nothing of the logits' size is allocated. Elsewhere torch's own runs: a GPU would pay
    kernel launches per block, and under torch.compile Inductor fuses the passes itself."""
    if logits.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.logsumexp(logits, dim=1)
    n = logits.shape[0]
    starts = list(range(0, n, LSE_BLOCK_ROWS))
    if len(starts) > 1 and n - starts[-1] == 1:
        # A block of one row would be summed differently: torch splits a lone row's sum across threads.
        starts.pop()
    out = torch.empty(n, dtype=logits.dtype, device=logits.device)  # (n,)
    for start, end in zip(starts, [*starts[1:], n]):
        block, rows = logits[start:end], out[start:end]
        peak = block.amax(dim=1, keepdim=True)
        peak.masked_fill_(peak.abs() == math.inf, 0.0)  # as torch's: an infinite maximum is not subtracted
        torch.sum(block.sub_(peak).exp_(), dim=1, out=rows)
        rows.log_().add_(peak.squeeze(1))
    return out


def head_logits(h: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """The logits h @ w.T (N, V) of hidden states h (N, C) and a head's weight w (V, C), into `out` if given.

    In bf16 on a CPU, a product per block of VOCAB_BLOCK rows of w, each into its columns of the result:
    for a vocabulary of GPT-2's size, oneDNN's one product over all of it runs at about half the rate of
    the blocks (benchmarks/headblocks.py). Under torch.compile the blocks are concatenated, which Inductor
    does by having each product write into its slice. Elsewhere, and in fp32 (where one product already
    runs at the CPU's peak), one product."""
    if not VOCAB_BLOCK or h.dtype != torch.bfloat16 or h.device.type != "cpu" or w.shape[0] <= VOCAB_BLOCK:
        return h @ w.T if out is None else torch.mm(h, w.T, out=out)
    starts = range(0, w.shape[0], VOCAB_BLOCK)
    if out is None:
        return torch.cat([h @ w[s:s + VOCAB_BLOCK].T for s in starts], dim=1)
    for s in starts:
        torch.mm(h, w[s:s + VOCAB_BLOCK].T, out=out[:, s:s + VOCAB_BLOCK])
    return out


def _chunk_loss(logits: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """The loss of each row of a chunk of fp32 logits, 0 where ignored (evaluation: no gradient); the
    chunk is overwritten."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)  # (n,)
    return (logsumexp_(logits) - picked) * valid


def _loss_and_grad_(logits: Tensor, targets: Tensor, valid: Tensor,
                    row_logits: Callable[[Tensor], Tensor]) -> Tensor:
    """Eager: a chunk of fp32 or bf16 logits (n, V) is overwritten with d(summed loss)/d(logits), softmax -
    one-hot on valid rows and zero on ignored ones; returns the loss of each row (0 where ignored), fp32.

    ATen's softmax kernel takes each row through its max, its exps and their normalisation while the row
    is in cache, in place: one pass over the chunk's memory, one exp per logit, nothing of the chunk's size
    allocated. In fp32 the target's gradient is p - 1 and the loss -log p, exact to fp32 rounding while p
    is a normal float (a loss below 87). In bf16, p itself is rounded to 2**-8, and 1 - p taken from it
    would lose a confident row's gradient (any p above 1 - 2**-9 rounds to 1): 1 - p is instead the sum of
    the other probabilities (accumulated in fp32, rounded once), one more read of the chunk, so the
    target's gradient is as exact as theirs; the loss is -log1p(-(1 - p)) where p is at least 1/2, and
    -log p, within 2**-8, below. Where p underflows, `row_logits(rows)` recomputes those rows' fp32
    logits for log-sum-exp minus the target's logit."""
    rows = torch.arange(len(targets), device=logits.device)
    picked = logits[rows, targets]  # (n,), before the softmax overwrites it
    torch._softmax(logits, 1, False, out=logits)  # (n, V): elementwise per row, so in place is safe
    probability = logits[rows, targets].float()  # (n,)
    if logits.dtype == torch.float32:
        loss, target_grad = -probability.log(), probability - 1
    else:
        logits[rows, targets] = 0.0
        # (n,): 1 - p, to the others' rounding. ATen sums bf16 in fp32 and rounds the sum once; asking it
        # for an fp32 sum instead upcasts the whole chunk into a temporary first.
        rest = logits.sum(dim=1).float()
        loss, target_grad = torch.where(probability < 0.5, -probability.log(), -torch.log1p(-rest)), -rest
    underflow = ((probability < torch.finfo(torch.float32).tiny) & valid).nonzero().squeeze(1)
    if len(underflow):
        loss[underflow] = logsumexp_(row_logits(underflow)) - picked[underflow].float()
    ignored = (~valid).nonzero().squeeze(1)
    if len(ignored):
        logits.index_fill_(0, ignored, 0.0)
    logits[rows, targets] = target_grad.where(valid, 0.0).to(logits.dtype)
    return loss.where(valid, 0.0)  # not loss * valid: an ignored row's loss may be inf


def _compiled_loss_and_grad(logits: Tensor, targets: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Under torch.compile: fp32 logits (n, V) to the loss of each row (0 where ignored) and
    d(summed loss)/d(logits), in pointwise operations and reductions that Inductor fuses into one kernel.

    Cheap per logit: Inductor keeps each row's numerators in a local buffer, so that the normaliser and the
    gradient are one pass over the row, one exp per logit; an ignored row's scale is 0 and its target -1,
    which no column matches; the comparison is in int32 (int64 vectors are slower)."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)  # (n,)
    peak = logits.amax(dim=1, keepdim=True)  # (n, 1)
    numerators = torch.exp(logits - peak)
    normaliser = numerators.sum(dim=1, keepdim=True)  # (n, 1)
    columns = torch.arange(logits.shape[1], dtype=torch.int32, device=logits.device)
    one_hot = columns[None, :] == torch.where(valid, targets, -1).int()[:, None]
    grad = numerators * (valid[:, None] / normaliser) - one_hot.float()
    lse = (peak + normaliser.log()).squeeze(1)  # (n,)
    return (lse - picked) * valid, grad


class _Spare:
    """The (N, V) gradient buffer, handed on from a step's backward to the next step's forward.

    A new buffer that size (200 MB for 8 x 256 rows in bf16) is memory the C allocator maps afresh, and
    the first write to each of its pages faults, a cost paid again at every step.
    Backward gives its buffer back once it has read it. One buffer is kept, the largest N seen, and a
    smaller N uses its front: fine-tuning batches are padded to their own lengths, so N changes from
    step to step, and a buffer kept per shape grew by hundreds of MB a step. Should a graph kept with
    `retain_graph` run backward again after another forward rewrote that buffer, autograd's version
    check raises instead of using it. Under torch.compile Inductor plans the buffers, and this stays out
    of its way.
    """

    def __init__(self) -> None:
        self.flat: Tensor | None = None  # 1-D; what take() hands out are views of its front

    def take(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
        if torch.compiler.is_compiling():
            return torch.empty(shape, dtype=dtype, device=device)
        size = shape[0] * shape[1]
        flat, self.flat = self.flat, None  # lent out: a second forward before backward gets its own
        fits = flat is not None and flat.numel() >= size and flat.dtype == dtype and flat.device == device
        if not fits:
            flat = torch.empty(size, dtype=dtype, device=device)  # a spare that does not fit is freed
        return flat[:size].view(shape)

    def give_back(self, buffer: Tensor) -> None:
        if not torch.compiler.is_compiling():
            self.flat = buffer._base  # the whole 1-D buffer that take() cut `buffer` from


_spare = _Spare()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None,
                dtype: torch.dtype, per_row: bool) -> Tensor:
        # hidden (N, C), weight (V, C), targets (N,)
        h, w = hidden.to(dtype), weight.to(dtype)
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        count = valid.sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows_loss = torch.empty(h.shape[0], dtype=torch.float32, device=hidden.device) if per_row else None
        grad_logits = _spare.take((h.shape[0], w.shape[0]), dtype, hidden.device)  # (N, V)
        compiling = torch.compiler.is_compiling()
        # Eager, the logits are computed straight into G. In fp32 and bf16 the softmax turns them into the
        # gradient in place: no chunk-sized temporary and no copy, so nothing to chunk for either; in fp16
        # a chunk at a time is upcast, turned into its gradient and written back.
        in_place = dtype in IN_PLACE_DTYPES and not compiling
        if chunk_rows is None:
            chunk_rows = h.shape[0] if in_place else CHUNK_ROWS
        if not compiling:
            head_logits(h, w, out=grad_logits)  # (N, V)
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            if compiling:
                logits = head_logits(h[rows], w).float()  # (n, V)
                loss, grad_logits[rows] = _compiled_loss_and_grad(logits, safe[rows], valid[rows])
            else:
                logits = grad_logits[rows] if in_place else grad_logits[rows].float()  # (n, V)
                loss = _loss_and_grad_(logits, safe[rows], valid[rows],
                                       lambda some, h_rows=h[rows]: (h_rows[some] @ w.T).float())
                if not in_place:
                    grad_logits[rows] = logits
            if per_row:
                rows_loss[rows] = loss
            else:
                total += loss.sum()
        ctx.save_for_backward(grad_logits, h, w, count)
        ctx.dtypes, ctx.per_row = (hidden.dtype, weight.dtype), per_row
        return rows_loss if per_row else total / count

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_logits, h, w, count = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if ctx.per_row:  # grad_output (N,): each row's gradient scales its own row of G
            scale = grad_output.to(grad_logits.dtype)[:, None]  # (N, 1)
        else:
            scale = (grad_output / count).to(grad_logits.dtype)
        if ctx.needs_input_grad[0]:
            grad_hidden = ((grad_logits @ w) * scale).to(ctx.dtypes[0])  # (N, C)
        if ctx.needs_input_grad[1]:
            if grad_logits.dtype == ctx.dtypes[1] or grad_logits.shape[0] <= DIRECT_GRAD_WEIGHT_ROWS:
                # G^T h comes out in the weight's layout: in its dtype (fp32) nothing to cast or copy, and
                # autograd adds the tied embedding's gradient into it in place; in bf16 a plain cast
                grad_weight = (grad_logits.T @ (h * scale)).to(ctx.dtypes[1])  # (V, C)
            else:
                # (h^T G)^T with h^T laid out contiguously first: in bf16, the layouts that oneDNN
                # multiplies fastest at many rows (the copy is of the small (N, C) side); then cast and
                # laid out as the weight in one pass
                product = (h * scale).T.contiguous() @ grad_logits  # (C, V)
                grad_weight = product.T.to(ctx.dtypes[1], memory_format=torch.contiguous_format)  # (V, C)
        _spare.give_back(grad_logits)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None, *,
                         reduction: Reduction = "mean") -> Tensor:
    """Cross-entropy of `hidden @ weight.T` against `targets`, ignoring IGNORE_INDEX targets: their mean,
    or with reduction "none" each target's (0 where ignored), shaped as `targets` (the negative
    log-probabilities that preference tuning sums per sequence).

    hidden (..., C), weight (V, C), targets (...): the leading dimensions are flattened. `chunk_rows`: rows
    of logits turned into losses at a time; by default all of them where they become the gradient in place
    (fp32 and bf16 training) or under torch.compile, else CHUNK_ROWS.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    shape, per_row = targets.shape, reduction == "none"
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    dtype = _compute_dtype(hidden)
    if torch.compiler.is_compiling():
        chunk_rows = hidden.shape[0]  # a compiler fuses the passes itself: one chunk, full-size matmuls
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        loss = _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, dtype, per_row)
        return loss.view(shape) if per_row else loss
    # No gradients wanted (evaluation): only the loss, chunk by chunk.
    chunk_rows = chunk_rows or CHUNK_ROWS
    h, w = hidden.to(dtype), weight.to(dtype)
    valid = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    rows = [_chunk_loss((h[s:s + chunk_rows] @ w.T).float(), safe[s:s + chunk_rows], valid[s:s + chunk_rows])
            for s in range(0, h.shape[0], chunk_rows)]
    if per_row:
        return torch.cat(rows).view(shape)
    return sum(r.sum() for r in rows) / valid.sum().clamp(min=1)
