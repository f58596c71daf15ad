"""Explicit-product attention (the book's) against PyTorch's scaled_dot_product_attention, in one run:
what `attention: auto` (llm/model.py) decides on.

    python -m benchmarks.attention [--dtype auto | fp32 | bf16 | both] [--dropout 0.0] [--repeats 5]

Times one causal self-attention layer (the model's own SelfAttention, with attention = "explicit" and =
"sdpa", the same weights, dropout `--dropout`: 0 by default) at n_embd 256 and 4 heads (the `cpu-small`
shape) over 256, 512 and 1024 keys, in fp32 and, under autocast as the model runs it, in bf16, three ways:
- training: forward and backward, on a batch of full-length sequences holding 2,048 tokens (8 x 256,
  4 x 512, 2 x 1024), with the attention weights' dropout where `--dropout` is above 0 (SDPA's CPU
  kernel has none: with dropout it runs its math path, whose mask torch draws element by element, where
  the explicit product draws llm/dropout.py's);
- forward alone, without gradients, on the same batch: what evaluation runs (val loss, perplexity);
- decoding: one new query over that many keys in a KV cache, for 8 prompts (the evaluate stage's batch).
Median of `--repeats` interleaved repeats after a warm-up; about a minute on 2 cores. `--dtype auto` (the
default) offers bf16 only where the CPU computes it natively (llm/hardware.py's `bf16_is_fast`); emulated
bf16 is many times slower and no setting of a model's.

Each line prints explicit time / SDPA time (above 1: SDPA is faster) and the side `auto` takes there.
The last line is `attention_auto_vs_sdpa=R`: SDPA's time over the time of the side `auto` takes, in
training at 256 keys in the host's training dtype (the cpu-small pretraining shape; 1.0 where auto takes
SDPA).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import torch

from benchmarks.common import time_interleaved
from llm.config import EvaluateConfig
from llm.hardware import autocast, bf16_is_fast
from llm.model import AUTO_EXPLICIT_MAX_KEYS, KVCache, ModelConfig, SelfAttention, auto_runs_explicit, model_config

TOKENS = 2048  # per batch, at every length
DECODING_BATCH = EvaluateConfig().generate_batch_size  # how the evaluate stage decodes
KEYS = (256, 512, 1024)


def training_step(layer: SelfAttention, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        with autocast(x.device, dtype):
            y = layer(x)
        y.float().sum().backward()

    return step


def forward_only(layer: SelfAttention, x: torch.Tensor, dtype: torch.dtype,
                 cache: KVCache | None = None) -> Callable[[], None]:
    """The layer's forward without gradients; with a `cache`, x's positions follow its stored ones."""
    def step() -> None:
        with torch.no_grad(), autocast(x.device, dtype):
            layer(x, None, cache)

    return step


def decoding_cache(config: ModelConfig, batch_size: int, stored: int, dtype: torch.dtype) -> KVCache:
    """A cache holding `stored` positions of random keys and values in `dtype` (one layer's are used)."""
    cache = KVCache(config, batch_size, torch.device("cpu"), dtype)
    cache.keys.normal_()
    cache.values.normal_()
    cache.length = stored
    return cache


def compare(keys: int, dtype: torch.dtype, dropout: float, repeats: int) -> float:
    """Print explicit time / SDPA time for each pass at `keys` keys in `dtype`; return training's, or 1.0
    where `auto` takes SDPA in training."""
    config = model_config("cpu-small", context_length=keys, dropout=dropout)
    sdpa = SelfAttention(dataclasses.replace(config, attention="sdpa"), layer=0)
    explicit = SelfAttention(dataclasses.replace(config, attention="explicit"), layer=0)
    explicit.load_state_dict(sdpa.state_dict())
    x = torch.randn(TOKENS // keys, keys, config.n_embd, requires_grad=True)
    new = torch.randn(DECODING_BATCH, 1, config.n_embd)
    cache = decoding_cache(config, DECODING_BATCH, keys - 1, dtype)
    passes = {  # (whether a backward follows, the step)
        "training": (True, lambda layer: training_step(layer.train(), x, dtype)),
        "forward": (False, lambda layer: forward_only(layer.eval(), x.detach(), dtype)),
        "decoding": (False, lambda layer: forward_only(layer.eval(), new, dtype, cache)),
    }
    training_ratio = 1.0
    for name, (backward, step) in passes.items():
        times = time_interleaved({"explicit": step(explicit), "sdpa": step(sdpa)}, repeats=repeats)
        dropout_p = dropout if backward else 0.0  # evaluation and generation run in eval mode
        auto = "explicit" if auto_runs_explicit(x.device, dtype, keys, backward, dropout_p) else "sdpa"
        ratio = times["explicit"].median / times["sdpa"].median
        print(f"{str(dtype).removeprefix('torch.'):8s} {keys:5d} keys, {name:8s}: explicit {times['explicit']}, "
              f"sdpa {times['sdpa']}; explicit/sdpa {ratio:.2f}x; auto takes {auto}", flush=True)
        if name == "training" and auto == "explicit":
            training_ratio = ratio
    return training_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "both"], default="auto")
    parser.add_argument("--dropout", type=float, default=0.0, help="the attention weights' dropout in training")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    native = bf16_is_fast(torch.device("cpu"))
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "both": [torch.float32, torch.bfloat16],
              "auto": [torch.float32, torch.bfloat16] if native else [torch.float32]}[args.dtype]
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {native}; one attention "
          f"layer (n_embd 256, 4 heads): training and the forward alone over {TOKENS} tokens, decoding "
          f"{DECODING_BATCH} prompts; dropout {args.dropout} in training; auto: explicit in training up to "
          f"{AUTO_EXPLICIT_MAX_KEYS} keys in bf16, or with dropout")
    headline = 1.0
    for dtype in dtypes:
        for keys in KEYS:
            ratio = compare(keys, dtype, args.dropout, args.repeats)
            if keys == KEYS[0] and dtype == dtypes[-1]:
                headline = 1 / ratio
    print(f"attention_auto_vs_sdpa={headline:.2f}")


if __name__ == "__main__":
    main()
