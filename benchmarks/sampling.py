"""Picking the next token from the logits: ours against Hugging Face transformers', in one run.

    python -m benchmarks.sampling [--rounds 7]

Ours: `llm.generate.sample_next`, what every decoding step of the project runs (the commands, the served
model, the evaluate stage, the pretrain stage's samples). The reference: transformers' own code for the
same settings, as `GenerationMixin._sample` runs it: its logits warpers (`TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper`, in the order `generate` applies them; its default top-k of 50 off
where ours has none), then `torch.argmax` when greedy, else softmax and `torch.multinomial`, which the
book's chapter 5 samples with too. Needs transformers, which the test extras install (`scripts/test`
sets them up).

Both sides take the same fp32 logits of GPT-2's 50,257 tokens, drawn from a normal distribution (a
trained model's are peakier; the work per token does not depend on it), for one row (a chat, a command)
and for 8 (the evaluate stage's batch), under the settings the project uses: greedy (the evaluate stage
and the commands by default), temperature 1 (what the served model samples with unless the client says
otherwise: MLflow's default), temperature 0.8 with top-k 50 (the pretrain stage's samples) and
temperature 0.9 with top-p 0.95. The two sides of a setting run in turn, round after round
(benchmarks.common.time_interleaved), each round many picks; their medians are compared. Checked first,
for each setting: both sides pick the same tokens where the logits leave one choice (greedy: always;
sampled: logits where one token holds all the mass).

For scale it also prints a cached decoding step of the `cpu-small` model (one prompt, greedy, fp32),
which each pick is added to. Last line: `sampling_speedup=R`, ours over transformers' at temperature 1
for one row (the served model's default).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from benchmarks.common import time_interleaved
from llm.generate import Sampling, generate, sample_next
from llm.model import GPT, model_config

VOCAB = 50_257
SETTINGS = {
    "greedy": Sampling(),
    "temperature 1": Sampling(temperature=1.0),
    "temperature 0.8, top-k 50": Sampling(temperature=0.8, top_k=50),
    "temperature 0.9, top-p 0.95": Sampling(temperature=0.9, top_p=0.95),
}
HEADLINE = ("temperature 1", 1)
PICKS_PER_ROUND = 20
EOT = 50256


def transformers_pick(sampling: Sampling) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' next-token choice for `sampling`, as its `generate` makes it (greedy or sampled)."""
    warpers = LogitsProcessorList()
    if sampling.temperature > 0 and sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k is not None:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p is not None:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    no_ids = torch.zeros(1, 0, dtype=torch.long)  # the warpers above do not read the tokens so far

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if sampling.temperature == 0:
            return torch.argmax(logits, dim=-1)
        scores = warpers(no_ids, logits)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)

    return pick


def picks(pick: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor) -> Callable[[], None]:
    """PICKS_PER_ROUND picks from `logits`, timed as one."""
    def run() -> None:
        for _ in range(PICKS_PER_ROUND):
            pick(logits)

    return run


def decoding_step_s(rounds: int) -> float:
    """Seconds a cached decoding step of cpu-small takes, one prompt, greedy: the step a pick adds to."""
    torch.manual_seed(0)
    model = GPT(model_config("cpu-small", dropout=0.0))
    tokens = 64
    timing = time_interleaved({"step": lambda: generate(model, [[EOT]], tokens)}, repeats=rounds)
    return timing["step"].median / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds per setting, the two sides in turn in each")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; logits of {VOCAB:,} tokens, fp32; "
          f"the median of {args.rounds} rounds of {PICKS_PER_ROUND} picks")
    generator = torch.Generator().manual_seed(0)
    ratios: dict[tuple[str, int], float] = {}
    for rows in (1, 8):
        logits = torch.randn(rows, VOCAB, generator=generator)
        decided = logits.clone()
        decided[:, 7] = 1e4  # one token with all the mass: every sampler must pick it
        for name, sampling in SETTINGS.items():
            sides = {"transformers": transformers_pick(sampling),
                     "ours": functools.partial(sample_next, sampling=sampling)}
            # The same choice where the logits leave one: greedy always, sampling where one token holds the mass.
            check = logits if sampling.temperature == 0 else decided
            assert torch.equal(sides["ours"](check), sides["transformers"](check)), f"{name}: different tokens"
            times = time_interleaved({side: picks(pick, logits) for side, pick in sides.items()},
                                     repeats=args.rounds)
            theirs, ours = (times[side].median / PICKS_PER_ROUND for side in sides)
            ratios[name, rows] = theirs / ours
            print(f"{rows} row{'s' if rows > 1 else ' '} {name:28s} transformers {theirs * 1e6:8.0f} us   "
                  f"ours {ours * 1e6:7.0f} us   {ratios[name, rows]:5.1f}x")
    step_s = decoding_step_s(args.rounds)
    print(f"for scale: a cached decoding step of cpu-small, one prompt, greedy, fp32: {step_s * 1e3:.2f} ms")
    print(f"sampling_speedup={ratios[HEADLINE]:.2f}")


if __name__ == "__main__":
    main()
