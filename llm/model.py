"""The GPT model: the book's architecture with GPT-2's names and shapes.

    token ids (B, T) -> token + position embeddings -> dropout -> n_layer x Block -> LayerNorm -> head

    Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))      (pre-LayerNorm, residuals)

Attention has two implementations behind `ModelConfig.attention`: the book's explicit one (scores,
the causal mask, softmax, dropout) and PyTorch's fused `scaled_dot_product_attention`;
they agree to float32 rounding. `auto`, the default, runs SDPA except where the explicit product is the
faster (training on a CPU in bf16 or with dropout, over up to AUTO_EXPLICIT_MAX_KEYS keys). `ModelConfig.init` picks the
starting weights: GPT-2's N(0, 0.02) (the default), or PyTorch's default of each layer, which the book's
`GPTModel` trains from (the `gpt2-book` preset's: the book's chapter 5 curve depends on it).
`ModelConfig.objective: masked` makes the same blocks an encoder (BERT's objective, llm/masking.py):
attention without the causal mask, and a mask token after the tokenizer's ids. Text generation
(llm/generate.py) runs the same forward with a `KVCache`, a padding mask for left-padded batches, and
position ids derived from it.

    from llm.model import GPT, model_config
    model = GPT(model_config("tiny"))
    logits = model(idx)            # (B, T, vocab_size)
    loss = model(idx, targets)     # scalar; targets of -100 are ignored
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.dropout import Dropout
# IGNORE_INDEX is not used here: the model's users import it from this module.
from llm.loss import IGNORE_INDEX, Reduction, linear_cross_entropy  # noqa: F401
# Defined in llm/model_config.py, torch-free; model_config is imported from here too
# (`from llm.model import GPT, model_config`).
from llm.model_config import ModelConfig, model_config  # noqa: F401


# In training on a CPU, in bf16 (SDPA's flash kernel, and the math path that dropout takes) or in fp32 with
# dropout (the math path, drawing torch's mask element by element), SDPA is slower than the explicit product
# over up to this many keys, forward and backward together, and faster beyond; SDPA's slow part is its
# backward: its forward alone, what evaluation and generation run, is the faster at every length
# (benchmarks/attention.py, with --dropout for the second).
AUTO_EXPLICIT_MAX_KEYS = 512


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off (for generating, measuring); the model's mode, training say, is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------
# The KV cache


class KVCache:
    """Every layer's keys and values for the positions processed so far, preallocated to the context.

    A forward pass with a cache attends over the cached positions plus its own, stores its keys and
    values behind them, and advances `length`. Used by llm/generate.py; training never needs one.
    """

    def __init__(self, config: ModelConfig, batch_size: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.context_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions stored, the same for every layer

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new positions' k, v (B, nh, T, hs); return all positions' (B, nh, length + T, hs)."""
        end = self.length + k.size(2)
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


# ---------------------------------------------------------------------------------------------------
# The model


def auto_runs_explicit(device: torch.device, dtype: torch.dtype, keys: int, backward: bool,
                       dropout_p: float = 0.0) -> bool:
    """Where `attention: auto` runs the explicit product rather than SDPA: on a CPU, over up to
    AUTO_EXPLICIT_MAX_KEYS keys, with a backward pass to follow (training), in bf16 or with dropout.
    SDPA's CPU kernel has no dropout: with it, SDPA runs its math path, whose mask torch draws element by
    element, where the explicit product draws llm/dropout.py's in bulk."""
    return (backward and device.type == "cpu" and keys <= AUTO_EXPLICIT_MAX_KEYS
            and (dtype == torch.bfloat16 or dropout_p > 0))


def causal_allowed(T: int, S: int, device: torch.device) -> Tensor:
    """(T, S): which of S keys each of the last T queries may see, itself and the keys before it."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def causal_bias(T: int, S: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(T, S): the causal mask as a term added to the scores: 0 where `causal_allowed`, -inf where not."""
    return torch.full((T, S), float("-inf"), dtype=dtype, device=device).triu(S - T + 1)


class SelfAttention(nn.Module):
    """Multi-head self-attention: causal in a GPT, bidirectional in an encoder."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.n_head = config.n_head
        self.layer = layer  # which slice of a KVCache is this layer's
        self.dropout = config.dropout
        self.attention = config.attention
        self.causal = not config.is_encoder
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)  # q, k, v in one
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = Dropout(config.dropout)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, allowed: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """x (B, T, C). `allowed` (B, 1, T, S) says which keys each query may see; None: every key in an
        encoder, and in a GPT the causal mask, with the T queries the last of the S positions (all of them
        without a cache)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        hs = C // self.n_head
        q, k, v = (t.view(B, T, self.n_head, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, nh, S, hs), S = cached + T
        y = self._attend(q, k, v, allowed)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None) -> Tensor:
        T, S = q.size(2), k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        if not self._explicit_for(q, S, dropout_p):
            if self.causal and allowed is None and 1 < T < S:
                # SDPA's is_causal aligns the mask top-left, right only when T == S; one new token sees
                # every key; a chunk after cached positions needs the mask spelled out.
                allowed = causal_allowed(T, S, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p,
                                                  is_causal=self.causal and allowed is None and T == S)
        B, nh, _, hs = q.shape
        if self.causal and allowed is None:
            # One product gives the scaled scores with the mask added (the scale applied before rounding
            # to the compute dtype): no passes over the (B, nh, T, S) scores to divide and to mask, nor
            # their backward passes.
            bias = causal_bias(T, S, q.dtype, q.device)  # (T, S)
            scores = torch.baddbmm(bias, q.reshape(B * nh, T, hs), k.reshape(B * nh, S, hs).transpose(1, 2),
                                   alpha=1 / math.sqrt(hs)).view(B, nh, T, S)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, S)
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
        # In the scores' dtype: under bf16 autocast softmax would return fp32 weights, which dropout would
        # then mask in fp32 and the product with v cast back to bf16, passes over (B, nh, T, S) for
        # nothing. softmax still computes in fp32 inside, as SDPA's bf16 kernels do.
        weights = torch.softmax(scores, dim=-1, dtype=scores.dtype)
        return self.attn_dropout(weights) @ v  # (B, nh, T, hs)

    def _explicit_for(self, q: Tensor, S: int, dropout_p: float) -> bool:
        """Whether this call runs the explicit product: always with `explicit`, never with `sdpa`, and with
        `auto` where it is the faster (whether a backward follows: whether autograd records q)."""
        if self.attention == "auto":
            return auto_runs_explicit(q.device, q.dtype, S, backward=q.requires_grad, dropout_p=dropout_p)
        return self.attention == "explicit"


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's (and the book's) tanh approximation
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, allowed: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), allowed, cache)
        return x + self.mlp(self.ln_2(x))


# What nn.Linear, nn.Embedding, nn.LayerNorm and GPT's own init call to fill their weights.
_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_", "constant_")


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """torch.nn.init's fills as no-ops, while a model that weights are loaded into is built: its tensors
    stay uninitialised memory, where they are allocated. Building on the meta device instead would skip the
    fills too, but the first fill of a meta tensor imports torch._dynamo and moving it off meta imports
    sympy (seconds, in every process that loads a model). Transformers' `no_init_weights` does the same.
    Not for threads that build other models meanwhile: the functions are swapped process-wide."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.embedding_rows, config.n_embd)
        self.wpe = nn.Embedding(config.context_length, config.n_embd)
        self.drop = Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        # A classifier's head needs no bias: ln_f's bias, through the head, already gives each class one.
        self.lm_head = nn.Linear(config.n_embd, config.num_classes or config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        if config.init == "gpt2":  # else each layer keeps the initialisation PyTorch gave it above
            self._init_gpt2()

    @classmethod
    def empty(cls, config: ModelConfig, device: torch.device | str = "cpu") -> GPT:
        """A GPT whose weights are uninitialised memory on `device`, to load weights into: built there
        with torch.nn.init's fills skipped, which take seconds for the GPT-2 sizes on a CPU."""
        with torch.device(device), _no_init():
            return cls(config)

    def _init_gpt2(self) -> None:
        self.apply(self._init_weights)
        # GPT-2 scales the layers that write into the residual stream by 1/sqrt(its 2 * n_layer writes),
        # so the residual's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, targets: Tensor | None = None, reduction: Reduction = "mean") -> Tensor:
        """Logits (B, T, vocab_size) for token ids `idx` (B, T); with `targets` (B, T), the mean
        next-token cross-entropy instead (positions whose target is IGNORE_INDEX count for nothing), or
        with reduction "none" each position's (B, T), 0 where ignored: the training loop's only way in,
        through DDP and compile, to per-sequence log-probabilities (llm/preference.py).

        A classifier's `targets` hold each sequence's class id at its real tokens and IGNORE_INDEX at its
        padding; the loss is the cross-entropy of `class_logits`. Without targets it gives the head's
        output at every position, (B, T, num_classes).
        """
        if targets is not None and self.config.is_classifier:
            if reduction != "mean":
                raise ValueError("a classifier's loss is one per sequence: reduction must be 'mean'")
            real = targets != IGNORE_INDEX
            labels = targets.amax(dim=1)  # a row's one class id; IGNORE_INDEX is below every id
            return F.cross_entropy(self.class_logits(idx, real).float(), labels)
        hidden = self.forward_hidden(idx)  # (B, T, C)
        if targets is None:
            return F.linear(hidden, self.head_weight)  # (B, T, vocab_size)
        # The head and the loss fused (llm/loss.py): the (B, T, vocab_size) logits are never stored.
        return linear_cross_entropy(hidden, self.head_weight, targets, reduction=reduction)

    @property
    def head_weight(self) -> Tensor:
        """The head's matrix (vocab_size or num_classes, C): an encoder's tied head without the mask
        token's row, which is an input only and never predicted."""
        weight = self.lm_head.weight
        if weight.shape[0] == self.lm_head.out_features:
            # No slice where no row is left out: a slice's backward zero-fills a (V, C) gradient and copies
            # into it, at every step.
            return weight
        return weight[: self.lm_head.out_features]

    def class_logits(self, idx: Tensor, real: Tensor) -> Tensor:
        """A classifier's logits (B, num_classes) for right-padded token ids `idx` (B, T), `real` (B, T)
        True at real tokens. Pooled over real tokens only, and padding cannot change a prediction: a causal
        model's real positions never see the padding after them, an encoder's are kept from it by the mask."""
        hidden = self.forward_hidden(idx, padding_mask=real if self.config.is_encoder else None)  # (B, T, C)
        if self.config.pooling == "mean":
            weights = real.to(hidden.dtype)[:, :, None]  # (B, T, 1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        elif self.config.pooling == "first":
            pooled = hidden[:, 0]
        else:
            last = real.long().cumsum(1).argmax(1)  # the position of each row's last real token
            pooled = hidden[torch.arange(idx.size(0), device=idx.device), last]
        return self.lm_head(pooled)  # (B, num_classes)

    def forward_hidden(
        self, idx: Tensor, *, padding_mask: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """The final hidden states (B, T, n_embd), before the head.

        Training passes only `idx`. Generation may pass a `cache` (these tokens follow its cached
        positions) and, for left-padded batches, a `padding_mask` (B, cached + T), True at real tokens:
        padding is never attended to, and each row's positions count from its first real token. An
        encoder takes right-padded batches, and no cache: it does not generate.
        """
        B, T = idx.shape
        if cache is not None and self.config.is_encoder:
            raise ValueError("an encoder (objective: masked) sees every position at once and generates "
                             "nothing: it takes no KV cache")
        past = 0 if cache is None else cache.length
        if past + T > self.config.context_length:
            raise ValueError(f"{past + T} positions exceed context_length {self.config.context_length}: "
                             "crop the input to the last context_length tokens")
        if padding_mask is None:
            allowed, pos = None, torch.arange(past, past + T, device=idx.device)  # causal, or every key
        elif self.config.is_encoder:
            allowed, pos = self._padding_keys(B, T, padding_mask), torch.arange(T, device=idx.device)
        else:
            allowed, pos = self._padding_attention(B, T, past, padding_mask)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x, allowed, cache)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    @staticmethod
    def _padding_attention(B: int, T: int, past: int, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Which keys each query may see (B, 1, T, past + T), and the queries' positions (B, T)."""
        S = past + T
        if padding_mask.shape != (B, S):
            raise ValueError(f"padding_mask must be (batch, cached + new positions) = {(B, S)}, "
                             f"got {tuple(padding_mask.shape)}")
        query = torch.arange(past, S, device=padding_mask.device)[:, None]  # (T, 1)
        key = torch.arange(S, device=padding_mask.device)[None, :]  # (1, S)
        # A padding query sees itself only: a row with nothing to attend to would make softmax NaN.
        allowed = (key <= query) & (padding_mask[:, None, None, :] | (key == query))  # (B, 1, T, S)
        pos = (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)
        return allowed, pos

    @staticmethod
    def _padding_keys(B: int, T: int, padding_mask: Tensor) -> Tensor:
        """Which keys each of an encoder's queries may see (B, 1, T, T): the real tokens, and itself."""
        if padding_mask.shape != (B, T):
            raise ValueError(f"padding_mask must be (batch, positions) = {(B, T)}, got {tuple(padding_mask.shape)}")
        itself = torch.eye(T, dtype=torch.bool, device=padding_mask.device)  # keeps a padding row from NaN
        return padding_mask[:, None, None, :] | itself  # (B, 1, T, T)

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache on this model's device, in its dtype."""
        weight = self.wte.weight
        return KVCache(self.config, batch_size, device=weight.device, dtype=weight.dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; `non_embedding` leaves out the lookup tables: the position embeddings, and the
        token embeddings unless tied to the head (then they are the head's matmul, and count)."""
        n = sum(p.numel() for p in self.parameters())  # a tied matrix is one parameter, counted once
        if non_embedding:
            n -= self.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, forward and backward: 6N + 12 * n_layer * n_embd * seq_len.

        6N: each non-embedding parameter does a multiply and an add (2 FLOPs) per token forward, and
        twice that backward. The second term is attention's two matmuls (q @ k^T, weights @ v), which
        have no parameters: 2 * 2 * n_embd * seq_len per layer forward, 3x that with backward (counted
        over every key, as PaLM and nanoGPT do, though the causal mask skips half of them). The
        estimate of the PaLM paper (appendix B); MFU = tokens/s * flops_per_token / peak FLOP/s.
        `seq_len` defaults to context_length.
        """
        cfg = self.config
        seq_len = cfg.context_length if seq_len is None else seq_len
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * seq_len
