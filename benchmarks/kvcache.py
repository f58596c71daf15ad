"""Generation with the KV cache against recomputing every position at every step, in one run.

    python -m benchmarks.kvcache

Greedy decoding of 256 new tokens from a one-token prompt (end-of-text) with the `cpu-small` preset
(4 layers, n_embd 256, context 256, GPT-2's 50,257-token head; random weights: speed does not depend
on them). The 1 + 255 tokens fed in fill the context exactly, so the cached run never falls back to
recomputation. Both paths produce the same tokens (checked first), and both run the head on the last
position only, so the ratio is the cache's own gain. Median of 5 interleaved repeats after a warm-up,
in fp32, the dtype the project generates in by default on every host, and, where the CPU runs bf16
natively, in bf16 (`--precision bf16`; about five minutes on 2 cores, with the batch and the book's loop
below). Also printed: the head's time per token, a floor no cache removes, the speed-up at the batch
of 8 prompts the evaluate stage decodes with (`evaluate.generate_batch_size`): there the head's weights
are read once for 8 rows, and what choosing bf16 gains over fp32 in cached decoding, for one prompt and
for 8 (the two dtypes in interleaved rounds, so that the ratio is paired).

Two more figures put the headline in context, both from this run:
- the book's loop (`generate_text_simple`: the whole window through the model and the head at every
  position, each step), the reference the book's own cache speed-up is measured against;
- the most any cache can gain here: a cached step for one prompt reads every weight once (64 MB in
  fp32), so it takes at least those bytes over the rate this machine reads memory at (timed as a sum
  over the head's weights); the uncached step over that floor bounds the speed-up, overheads aside.

The headline is the evaluate stage's batch: its last line is the cached tokens/s over uncached tokens/s
for 8 prompts in fp32, `kvcache_speedup=...`. For one prompt, what to improve is printed beside it: the
cached step's time over its memory floor.
"""

from __future__ import annotations

import copy

import torch

from benchmarks.common import time_interleaved
from llm.config import EvaluateConfig
from llm.generate import generate
from llm.hardware import bf16_is_fast, inference_dtype, measured_matmul_flops, precision_name
from llm.model import GPT, model_config

NEW_TOKENS = 256
EOT = 50256
EVALUATE_BATCH = EvaluateConfig().generate_batch_size  # how the evaluate stage decodes


def book_generate(model: GPT, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The book's `generate_text_simple`: each step runs the last context_length tokens through the
    model and the head at every position, then takes the last position's argmax."""
    ctx = model.config.context_length
    idx = torch.tensor([prompt])
    for _ in range(max_new_tokens):
        logits = model(idx[:, -ctx:])[:, -1]  # (1, vocab_size), from (1, T, vocab_size)
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return idx[0, len(prompt) :].tolist()


def measure(model: GPT, label: str, batch_size: int = 1, repeats: int = 5) -> dict[str, float]:
    """Print cached vs uncached tokens/s for `model` on `batch_size` prompts; return seconds per step
    of each (and, for one prompt, of the book's loop and of the head alone)."""
    prompts = [[EOT]] * batch_size
    hidden = torch.randn(batch_size, model.config.n_embd, dtype=model.wte.weight.dtype)
    candidates = {
        "no cache": lambda: generate(model, prompts, NEW_TOKENS, use_cache=False),
        "KV cache": lambda: generate(model, prompts, NEW_TOKENS, use_cache=True),
        "head": lambda: [model.lm_head(hidden) for _ in range(NEW_TOKENS)],
    }
    if batch_size == 1:
        candidates["book loop"] = lambda: book_generate(model, prompts[0], NEW_TOKENS)
    with torch.inference_mode():
        times = time_interleaved(candidates, repeats=repeats)
    label = f"{label} batch {batch_size}"
    tokens = NEW_TOKENS * batch_size
    for name in ("book loop", "no cache", "KV cache") if batch_size == 1 else ("no cache", "KV cache"):
        print(f"{label} {name:9s} {tokens / times[name].median:7.1f} tokens/s   "
              f"{times[name].median / NEW_TOKENS * 1e3:6.2f} ms/step   {NEW_TOKENS} steps: {times[name]}")
    print(f"{label} the head alone, {batch_size} x {model.config.n_embd} @ {model.config.n_embd} x "
          f"{model.config.vocab_size}: {times['head'].median / NEW_TOKENS * 1e3:.2f} ms/step, "
          f"{times['head'].median / times['KV cache'].median:.0%} of a cached step")
    return {name: timing.median / NEW_TOKENS for name, timing in times.items()}


def bf16_over_fp32(model: GPT, model16: GPT, repeats: int = 7) -> dict[int, float]:
    """What choosing bf16 gains: cached decoding with `model16` (its bf16 copy) against `model` in fp32, in
    interleaved rounds, for one prompt and for the evaluate stage's batch; bf16's tokens/s over fp32's."""
    gain = {}
    for batch_size in (1, EVALUATE_BATCH):
        prompts = [[EOT]] * batch_size
        with torch.inference_mode():
            times = time_interleaved({"fp32": lambda: generate(model, prompts, NEW_TOKENS),
                                      "bf16": lambda: generate(model16, prompts, NEW_TOKENS)}, repeats=repeats)
        gain[batch_size] = times["fp32"].median / times["bf16"].median
        print(f"bf16 over fp32, cached, batch {batch_size}: {gain[batch_size]:.2f}x the tokens/s "
              f"(fp32 {times['fp32']}, bf16 {times['bf16']})")
    return gain


def cached_step_floor(model: GPT) -> float:
    """Seconds a cached step for one prompt takes at least: every weight it uses read once (all but
    the position table, of which it reads one row), at the rate this machine sums the head's weights."""
    head = model.lm_head.weight
    with torch.inference_mode():
        seconds = time_interleaved({"read": lambda: head.sum()}, warmup=5, repeats=21)["read"].median
    used = [p for name, p in model.named_parameters() if name != "wpe.weight"]  # tied head: counted once
    weight_bytes = sum(p.numel() * p.element_size() for p in used)
    rate = head.numel() * head.element_size() / seconds
    print(f"a cached step reads {weight_bytes / 1e6:.1f} MB of weights; at this machine's {rate / 1e9:.0f} GB/s "
          f"(a sum over the head's) that takes {weight_bytes / rate * 1e3:.2f} ms, whatever the code")
    return weight_bytes / rate


def main() -> None:
    torch.manual_seed(0)
    model = GPT(model_config("cpu-small")).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"cpu-small, {NEW_TOKENS} new tokens, greedy")
    cached = generate(model, [[EOT]], NEW_TOKENS)
    if cached != generate(model, [[EOT]], NEW_TOKENS, use_cache=False):
        raise SystemExit("cached and uncached decoding disagree: fix that before timing them")
    if cached[0] != book_generate(model, [EOT], NEW_TOKENS):
        raise SystemExit("the book's loop and ours disagree: fix that before timing them")
    project = inference_dtype(torch.device("cpu"))  # what the project generates in by default
    print(f"matmul fp32 {measured_matmul_flops(torch.float32) / 1e9:.0f} GFLOP/s, "
          f"bf16 {measured_matmul_flops(torch.bfloat16) / 1e9:.0f} GFLOP/s: the project generates in "
          f"{precision_name(project)} by default, on every host")
    steps = {"fp32": measure(model, "fp32")}
    floor = {"fp32": cached_step_floor(model)}
    batched = measure(model, "fp32", batch_size=EVALUATE_BATCH, repeats=3)
    bf16_gain: dict[int, float] = {}
    if bf16_is_fast(torch.device("cpu")):  # bf16 is a choice (--precision bf16) where the CPU computes it
        model16 = copy.deepcopy(model).to(torch.bfloat16)
        bf16_gain = bf16_over_fp32(model, model16)
        steps["bf16"] = measure(model16, "bf16")
        floor["bf16"] = cached_step_floor(model16)
    for dtype, step in steps.items():
        print(f"{dtype}, one prompt: the cache is {step['no cache'] / step['KV cache']:.2f}x faster than our "
              f"uncached decoding (at most {step['no cache'] / floor[dtype]:.1f}x on this machine) and "
              f"{step['book loop'] / step['KV cache']:.2f}x faster than the book's loop; a cached step takes "
              f"{step['KV cache'] * 1e3:.2f} ms, {step['KV cache'] / floor[dtype]:.1f}x its memory floor of "
              f"{floor[dtype] * 1e3:.2f} ms (what to improve)")
    if bf16_gain:
        print(f"bf16 by choice over fp32, cached, paired: {bf16_gain[1]:.2f}x the tokens/s for one prompt, "
              f"{bf16_gain[EVALUATE_BATCH]:.2f}x for {EVALUATE_BATCH}")
    speedup = batched["no cache"] / batched["KV cache"]
    print(f"fp32, {EVALUATE_BATCH} prompts (the evaluate stage's batch): the cache is {speedup:.2f}x faster "
          "than our uncached decoding")
    print(f"kvcache_speedup={speedup:.1f}")


if __name__ == "__main__":
    main()
