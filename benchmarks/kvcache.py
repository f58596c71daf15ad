"""Generation with the KV cache against recomputing every position at every step, in one run.

    python -m benchmarks.kvcache

Greedy decoding of 256 new tokens from a one-token prompt (end-of-text) with the `cpu-small` preset
(4 layers, n_embd 256, context 256, GPT-2's 50,257-token head; random weights: speed does not depend
on them). The 1 + 255 tokens fed in fill the context exactly, so the cached run never falls back to
recomputation. Both paths produce the same tokens (checked first), and both run the head on the last
position only, so the ratio is the cache's own gain. Median of 5 interleaved repeats after a warm-up,
in fp32 and, where the CPU runs bf16 fast, in bf16, the dtype the project generates in there (about two
minutes on 2 cores, with the batch below). Also printed: the head's time per token, a floor no cache
removes, and the speed-up at the batch of 8 prompts the evaluate stage decodes with
(`evaluate.generate_batch_size`): there the head's weights are read once for 8 rows. The last line is the single prompt's cached tokens/s over uncached
tokens/s in the dtype the project generates in: `kvcache_speedup=...`.
"""

from __future__ import annotations

import torch

from benchmarks.common import time_interleaved
from llm.config import EvaluateConfig
from llm.generate import generate
from llm.hardware import inference_dtype, measured_matmul_flops
from llm.model import GPT, model_config

NEW_TOKENS = 256
EOT = 50256
EVALUATE_BATCH = EvaluateConfig().generate_batch_size  # how the evaluate stage decodes


def measure(model: GPT, label: str, batch_size: int = 1, repeats: int = 5) -> float:
    """Print cached vs uncached tokens/s for `model` on `batch_size` prompts; return the speed-up."""
    prompts = [[EOT]] * batch_size
    hidden = torch.randn(batch_size, model.config.n_embd, dtype=model.wte.weight.dtype)
    with torch.inference_mode():
        times = time_interleaved({
            "no cache": lambda: generate(model, prompts, NEW_TOKENS, use_cache=False),
            "KV cache": lambda: generate(model, prompts, NEW_TOKENS, use_cache=True),
            "head": lambda: [model.lm_head(hidden) for _ in range(NEW_TOKENS)],
        }, repeats=repeats)
    label = f"{label} batch {batch_size}"
    tokens = NEW_TOKENS * batch_size
    for name in ("no cache", "KV cache"):
        print(f"{label} {name:9s} {tokens / times[name].median:7.1f} tokens/s   "
              f"{times[name].median / NEW_TOKENS * 1e3:6.2f} ms/step   {NEW_TOKENS} steps: {times[name]}")
    print(f"{label} the head alone, {batch_size} x {model.config.n_embd} @ {model.config.n_embd} x "
          f"{model.config.vocab_size}: {times['head'].median / NEW_TOKENS * 1e3:.2f} ms/step, "
          f"{times['head'].median / times['KV cache'].median:.0%} of a cached step")
    return times["no cache"].median / times["KV cache"].median


def main() -> None:
    torch.manual_seed(0)
    model = GPT(model_config("cpu-small")).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"cpu-small, {NEW_TOKENS} new tokens, greedy")
    if generate(model, [[EOT]], NEW_TOKENS) != generate(model, [[EOT]], NEW_TOKENS, use_cache=False):
        raise SystemExit("cached and uncached decoding disagree: fix that before timing them")
    fast = inference_dtype(torch.device("cpu"))
    project = "fp32" if fast == torch.float32 else "bf16"  # what the project generates in on this machine
    print(f"matmul fp32 {measured_matmul_flops(torch.float32) / 1e9:.0f} GFLOP/s, "
          f"bf16 {measured_matmul_flops(torch.bfloat16) / 1e9:.0f} GFLOP/s: the project generates in {project} "
          f"here (bf16 where the CPU computes it natively)")
    speedups = {"fp32": measure(model, "fp32")}
    if project == "bf16":
        speedups["bf16"] = measure(model.to(fast), "bf16")
    batched = measure(model, project, batch_size=EVALUATE_BATCH, repeats=3)
    print("speed-up of the cache, one prompt: " + ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items())
          + f"; {EVALUATE_BATCH} prompts ({project}): {batched:.2f}x")
    print(f"kvcache_speedup={speedups[project]:.1f}")


if __name__ == "__main__":
    main()
