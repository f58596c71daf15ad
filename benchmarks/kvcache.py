"""Generation with the KV cache against recomputing every position at every step, in one run.

    python -m benchmarks.kvcache

Greedy decoding of 256 new tokens from a one-token prompt (end-of-text) with the `cpu-small` preset
(4 layers, n_embd 256, context 256, GPT-2's 50,257-token head; random weights: speed does not depend
on them). The 1 + 255 tokens fed in fill the context exactly, so the cached run never falls back to
recomputation. Both paths produce the same tokens (checked first), and both run the head on the last
position only, so the ratio is the cache's own gain. Median of 5 interleaved repeats after a warm-up.
Also printed: the head's share of a step, the floor that no cache removes. The last line is cached
tokens/s over uncached tokens/s: `kvcache_speedup=...`.
"""

from __future__ import annotations

import torch

from benchmarks.common import median_seconds
from llm.generate import generate
from llm.model import GPT, model_config

NEW_TOKENS = 256
EOT = 50256


def main() -> None:
    torch.manual_seed(0)
    model = GPT(model_config("cpu-small")).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"cpu-small, {NEW_TOKENS} new tokens, greedy")
    if generate(model, [[EOT]], NEW_TOKENS) != generate(model, [[EOT]], NEW_TOKENS, use_cache=False):
        raise SystemExit("cached and uncached decoding disagree: fix that before timing them")
    hidden = torch.randn(1, model.config.n_embd)
    with torch.inference_mode():
        times = median_seconds({
            "no cache": lambda: generate(model, [[EOT]], NEW_TOKENS, use_cache=False),
            "KV cache": lambda: generate(model, [[EOT]], NEW_TOKENS, use_cache=True),
            "head": lambda: [model.lm_head(hidden) for _ in range(NEW_TOKENS)],
        })
    per_token = {label: seconds / NEW_TOKENS * 1e3 for label, seconds in times.items()}  # ms
    for label in ("no cache", "KV cache"):
        print(f"{label:9s} {1e3 / per_token[label]:7.1f} tokens/s   {per_token[label]:6.2f} ms/token")
    print(f"the head alone, 1 x {model.config.n_embd} @ {model.config.n_embd} x {model.config.vocab_size}: "
          f"{per_token['head']:.2f} ms/token, {per_token['head'] / per_token['KV cache']:.0%} of a cached step")
    print(f"kvcache_speedup={times['no cache'] / times['KV cache']:.1f}")


if __name__ == "__main__":
    main()
