"""Explicit-product attention (the book's) against PyTorch's scaled_dot_product_attention, in one run:
what `attention: auto` (llm/model.py) decides on.

    python -m benchmarks.attention [--dtype auto | fp32 | bf16 | both] [--repeats 5]

Times the forward and backward of one causal self-attention layer (the model's own SelfAttention, with
attention = "explicit" and = "sdpa", the same weights, dropout 0) on a batch of full-length sequences at
n_embd 256 and 4 heads (the `cpu-small` shape) over 256, 512 and 1024 keys, in fp32 and, under autocast as
training runs it, in bf16. Batches hold 2,048 tokens (8 x 256, 4 x 512, 2 x 1024). Median of `--repeats`
interleaved repeats after a warm-up; under a minute on 2 cores. `--dtype auto` (the default) offers bf16
only where the CPU computes it natively (llm/hardware.py's `bf16_is_fast`); emulated bf16 is many times
slower and no setting of a model's.

Each line prints explicit time / SDPA time (above 1: SDPA is faster) and the side `auto` takes there.
The last line is `attention_auto_vs_sdpa=R`: SDPA's time over the time of the side `auto` takes, at 256
keys in the host's training dtype (the cpu-small pretraining shape; 1.0 where auto takes SDPA).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import torch

from benchmarks.common import time_interleaved
from llm.hardware import bf16_is_fast
from llm.model import AUTO_EXPLICIT_MAX_KEYS, SelfAttention, auto_runs_explicit, model_config

TOKENS = 2048  # per batch, at every length
KEYS = (256, 512, 1024)


def training_step(layer: SelfAttention, x: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    def step() -> None:
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            y = layer(x)
        y.float().sum().backward()

    return step


def compare(keys: int, dtype: torch.dtype, repeats: int) -> tuple[float, str]:
    """explicit time / SDPA time, and the side `auto` takes, at `keys` keys in `dtype`."""
    config = model_config("cpu-small", context_length=keys, dropout=0.0)
    sdpa = SelfAttention(dataclasses.replace(config, attention="sdpa"), layer=0)
    explicit = SelfAttention(dataclasses.replace(config, attention="explicit"), layer=0)
    explicit.load_state_dict(sdpa.state_dict())
    x = torch.randn(TOKENS // keys, keys, config.n_embd, requires_grad=True)
    times = time_interleaved({"explicit": training_step(explicit, x, dtype), "sdpa": training_step(sdpa, x, dtype)},
                             repeats=repeats)
    auto = "explicit" if auto_runs_explicit(x.device, dtype, keys) else "sdpa"
    ratio = times["explicit"].median / times["sdpa"].median
    print(f"{str(dtype).removeprefix('torch.'):8s} {keys:5d} keys: explicit {times['explicit']}, sdpa {times['sdpa']}; "
          f"explicit/sdpa {ratio:.2f}x; auto takes {auto}", flush=True)
    return ratio, auto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "both"], default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    native = bf16_is_fast(torch.device("cpu"))
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16], "both": [torch.float32, torch.bfloat16],
              "auto": [torch.float32, torch.bfloat16] if native else [torch.float32]}[args.dtype]
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {native}; forward+backward "
          f"of one attention layer (n_embd 256, 4 heads) over {TOKENS} tokens; auto: explicit in bf16 up to "
          f"{AUTO_EXPLICIT_MAX_KEYS} keys")
    headline = 1.0
    for dtype in dtypes:
        for keys in KEYS:
            ratio, auto = compare(keys, dtype, args.repeats)
            if keys == KEYS[0] and dtype == dtypes[-1]:
                headline = 1 / ratio if auto == "explicit" else 1.0
    print(f"attention_auto_vs_sdpa={headline:.2f}")


if __name__ == "__main__":
    main()
