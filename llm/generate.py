"""Text generation: greedy and sampled decoding with a KV cache, batched prompts, and a command.

    python -m llm.generate --checkpoint data/checkpoints/pretrain --prompt "Every effort moves you"
        [--max-new-tokens 50] [--temperature 0.8] [--top-k 50] [--top-p 0.95] [--seed 1] [--precision bf16]

prints the continuation (not the prompt) as it is generated; `--temperature 0` decodes greedily. It computes
in fp32 unless `--precision` asks for bf16 (llm/hardware.py: why), so greedy text is the same on any machine.

What is computed, whatever the path: each new token comes from the model's logits at the last position
of the last `context_length` tokens (a longer prompt is cropped to its end), exactly as a plain loop of
`model(tokens[:, -context_length:])` would compute them. The fast paths keep that meaning:

- KV cache (the default): each step runs the model on the new token only, attending over the stored
  keys and values of the earlier positions. GPT-2's position embeddings are absolute, so once the text
  outgrows the context, cropping shifts every position by one at each step and no stored key stays
  valid. From there on each step recomputes the cropped window, as uncached decoding does: the tokens
  are the same either way, and the cache speeds up everything up to the context length.
- Batched prompts of different lengths are left-padded; a padding mask keeps padding out of attention
  and position ids count from each row's first real token, so each row decodes as it would alone.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch
from torch import Tensor, nn

from llm.checkpoint import CheckpointError, load_model, read_config, require_language_model
from llm.config import INFERENCE_PRECISION, PRECISIONS, Precision
from llm.hardware import inference_dtype
from llm.model import GPT, eval_mode
from llm.tokenizer import TokenizerError, get_tokenizer
from llm.validation import ConfigError, Problem, check_range, from_mapping


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked from the logits."""

    temperature: float = 0.0  # 0: greedy (argmax); else logits / temperature, then sampled
    top_k: int | None = None  # sample among the k most likely tokens only
    top_p: float | None = None  # ... among the fewest most likely tokens whose probabilities reach top_p
    # (and any token tied with the least likely of those)
    seed: int | None = None  # for reproducible sampling; None: torch's global generator

    def problems(self) -> Iterator[Problem]:
        yield from check_range("temperature", self.temperature, 0)
        if self.top_k is not None:
            yield from check_range("top_k", self.top_k, 1)
        if self.top_p is not None:
            yield from check_range("top_p", self.top_p, 0, 1, closed="(]")


def sample_next(logits: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Tensor:
    """The next token id of each row (B,) from last-position logits (B, vocab_size)."""
    if sampling.temperature == 0:
        return argmax(logits)
    logits = logits.float() / sampling.temperature
    tokens = None  # which token each column of `logits` is: None while the columns are the whole vocabulary
    if sampling.top_k is not None and sampling.top_k < logits.size(-1):
        logits, tokens = top_k(logits, sampling.top_k)  # (B, n): the rest of the row is never drawn
    probs = logits.softmax(dim=-1)
    if sampling.top_p is not None and sampling.top_p < 1:
        probs = nucleus(probs, sampling.top_p)
    picked = draw(probs, generator)  # (B,)
    return picked if tokens is None else tokens.gather(-1, picked[:, None]).squeeze(-1)


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest logits of each row (B, n), largest first, and their token ids (B, n). A tie at the k-th
    value is kept whole, as transformers keeps it, so n is more than k where some row has one; a row with
    fewer is filled up with -inf."""
    values, tokens = logits.topk(k, dim=-1)  # (B, k)
    kth = values[:, -1:]  # (B, 1)
    n = int((logits >= kth).sum(dim=-1).max())
    if n > k:
        values, tokens = logits.topk(n, dim=-1)
        values = values.masked_fill(values < kth, float("-inf"))
    return values, tokens


def argmax(logits: Tensor) -> Tensor:
    """Each row's most likely token (B,) from logits (B, vocab_size): the first of tied maxima, as torch's."""
    if logits.device.type == "cpu":
        # NumPy's argmax runs in SIMD lanes; torch's CPU max-with-index steps through a row an element at a
        # time, a sizeable part of a cached decoding step over GPT-2's vocabulary (benchmarks/sampling.py).
        # NumPy has no bf16: floats first, which keeps every value and so the pick.
        return torch.from_numpy(logits.detach().float().numpy().argmax(axis=-1))
    return logits.max(dim=-1).indices


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """`probs` (B, V) with each row's tokens outside its nucleus zeroed: the most likely tokens, taken from
    the top while those taken before hold less than `top_p` (the first always stays), and any token as likely
    as the last one taken (a tie is kept whole, not cut by the order a sort happened to leave it in)."""
    ranked = descending(probs)  # (B, V)
    before = ranked.cumsum(dim=-1) - ranked  # what the tokens ranked above each one hold
    taken = (before < top_p).sum(dim=-1, keepdim=True)  # (B, 1), at least 1
    least = ranked.gather(-1, taken - 1)  # (B, 1): the probability of the last token taken
    return probs.where(probs >= least, 0.0)


def descending(values: Tensor) -> Tensor:
    """Each row of `values` (B, V) sorted from the largest down."""
    if values.device.type == "cpu":
        # NumPy's sort is vectorised; torch's CPU sort is many times slower over GPT-2's vocabulary
        # (benchmarks/sampling.py).
        return torch.from_numpy(np.sort(values.detach().numpy(), axis=-1)).flip(-1)
    return values.sort(dim=-1, descending=True).values


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row (B,), drawn with the row's probabilities (B, V), which need not sum to 1.

    Inverse transform sampling: the token where one uniform draw, scaled to the row's total, falls in the
    row's cumulative distribution, summed in float64 so that a token of tiny probability keeps its share
    (float32 on MPS, which has no float64). torch.multinomial draws one sample as a race of exponentials
    instead: a random number per token, over GPT-2's vocabulary most of the time a cached decoding step of a
    small model takes (benchmarks/sampling.py); this draws one per row."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float32 if probs.device.type == "mps" else torch.float64)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    if not bool(((total > 0) & total.isfinite()).all()):
        raise ValueError("the next token's probabilities are NaN, infinite or all zero: the logits hold NaN "
                         "or inf, so the model's weights are broken (check the checkpoint; in bf16, try fp32)")
    uniform = torch.rand(total.shape, dtype=total.dtype, device=probs.device, generator=generator)
    # Kept below the total after rounding, the draw lands on a token whose probability is above 0.
    point = torch.minimum(uniform * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Token ids (B, P) with each prompt right-aligned, and a mask (B, P): True at real tokens."""
    width = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    real = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            real[row, width - len(prompt) :] = True
    return tokens.to(device), real.to(device)


def generate_steps(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    use_cache: bool = True,
) -> Iterator[Tensor]:
    """Yield the next token of every prompt (B,), `max_new_tokens` times; no stopping at end-of-text."""
    if model.config.is_encoder:
        raise ValueError("an encoder (model.objective: masked) does not generate text: it fills in masks "
                         "(llm.fill); generate with a causal model")
    problems = list(sampling.problems())
    if problems:
        raise ConfigError(problems, source="sampling")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    empty = [row for row, prompt in enumerate(prompts) if not prompt]
    if not prompts or empty:
        raise ValueError(f"every prompt needs at least one token (empty: {empty or 'no prompts given'}); "
                         "start from the end-of-text token to generate from nothing")
    return _steps(model, prompts, max_new_tokens, sampling, use_cache)


def _steps(
    model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling, use_cache: bool
) -> Iterator[Tensor]:
    ctx = model.config.context_length
    device = model.wte.weight.device
    tokens, real = _left_pad([prompt[-ctx:] for prompt in prompts], device)  # (B, P)
    padded = not bool(real.all())  # without padding the model needs no mask: its fast causal path
    generator = None if sampling.seed is None else torch.Generator(device).manual_seed(sampling.seed)
    with eval_mode(model), torch.inference_mode():
        cache = model.new_cache(len(prompts)) if use_cache else None
        for _ in range(max_new_tokens):
            if cache is not None and tokens.size(1) <= ctx:
                new = tokens[:, cache.length :]
                hidden = model.forward_hidden(new, padding_mask=real if padded else None, cache=cache)
            else:
                cache = None  # past the context every position shifts: stored keys no longer apply
                window = tokens[:, -ctx:]
                hidden = model.forward_hidden(window, padding_mask=real[:, -ctx:] if padded else None)
            next_ids = sample_next(model.lm_head(hidden[:, -1]), sampling, generator)  # (B,)
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            real = torch.cat([real, real.new_ones(len(prompts), 1)], dim=1)
            yield next_ids


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """The new tokens of each prompt, each row ending before its first `eos_id` (not included)."""
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    steps = generate_steps(model, prompts, max_new_tokens, sampling, use_cache=use_cache)
    with contextlib.closing(steps):  # leaving early still restores the model's mode
        for next_ids in steps:
            for row, token in enumerate(next_ids.tolist()):
                if finished[row]:
                    continue
                if token == eos_id:
                    finished[row] = True
                else:
                    outputs[row].append(token)
            if all(finished):
                break
    return outputs


def stream(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """The new tokens of one prompt as they are generated, stopping before `eos_id`."""
    steps = generate_steps(model, [prompt], max_new_tokens, sampling, use_cache=use_cache)
    with contextlib.closing(steps):
        for next_ids in steps:
            token = int(next_ids[0])
            if token == eos_id:
                return
            yield token


class TextDecoder:
    """The text of one answer's tokens as they arrive, in pieces to show at once. A character of several
    UTF-8 bytes may be split across tokens: its bytes are held back until it is complete (invalid bytes
    become U+FFFD). With `stops`, the text ends before the first of them (`stopped` turns True), and text
    that may be the start of one is held back until the next tokens tell: a piece once given is never
    taken back, so the pieces of a stream add up to the whole answer."""

    def __init__(self, tokenizer: tiktoken.Encoding, stops: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [stop for stop in stops if stop]
        self.stopped = False
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text that may begin a stop text

    def add(self, token: int) -> str:
        """The text that `token` completes ("" while it is held back, and once stopped)."""
        if self.stopped:
            return ""
        return self._release(self._utf8.decode(self.tokenizer.decode_single_token_bytes(token)))

    def finish(self) -> str:
        """The rest of the text, at the end of the tokens."""
        if self.stopped:
            return ""
        text = self._release(self._utf8.decode(b"", final=True))
        held, self._held = self._held, ""
        return text + ("" if self.stopped else held)

    def _release(self, text: str) -> str:
        text = self._held + text
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            self.stopped, self._held = True, ""
            return text[:min(found)]
        # Hold back the longest end of the text that a stop text starts with.
        keep = max((n for stop in self.stops for n in range(min(len(stop) - 1, len(text)), 0, -1)
                    if text.endswith(stop[:n])), default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]


def decode_stream(tokenizer: tiktoken.Encoding, token_ids: Iterable[int]) -> Iterator[str]:
    """Text pieces for token ids as they arrive (TextDecoder without stop texts)."""
    decoder = TextDecoder(tokenizer)
    for token in token_ids:
        if text := decoder.add(token):
            yield text
    if text := decoder.finish():
        yield text


def prompt_sampler(tokenizer: str, prompt: str, max_new_tokens: int,
                   seed: int) -> Callable[[nn.Module, int], dict[str, str]]:
    """Continuations of one prompt, sampled with a fixed seed so that steps compare."""
    enc = get_tokenizer(tokenizer)
    ids = enc.encode_ordinary(prompt)

    def sample(model: nn.Module, step: int) -> dict[str, str]:
        out = generate(model, [ids], max_new_tokens, Sampling(temperature=0.8, top_k=50, seed=seed),
                       eos_id=enc.eot_token)[0]
        return {f"samples/step-{step:06d}.txt": prompt + enc.decode(out)}

    return sample


def load_for_inference(checkpoint: str | Path, device: torch.device | str = "cpu",
                       precision: Precision = INFERENCE_PRECISION) -> GPT:
    """The checkpoint's model on `device`, in the dtype that `precision` picks there (fp32 by default, the
    same text on any machine: llm/hardware.py); what the commands and the served model generate with."""
    model = load_model(checkpoint, device)
    return model.to(inference_dtype(torch.device(device), precision))


# ---------------------------------------------------------------------------------------------------
# The command


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """--device and --precision, as every command that runs a model takes them."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default=INFERENCE_PRECISION,
                        help=f"{INFERENCE_PRECISION} (the default): the same tokens on any machine; bf16: bf16 "
                             "weights, half the memory, but tokens that can change with the machine, and on a CPU "
                             "no faster for one prompt; auto: bf16 where the hardware runs it natively, else fp32")


def add_sampling_options(parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float,
                         top_k: int | None) -> None:
    """--max-new-tokens, --temperature, --top-k, --top-p and --seed, with a command's own defaults, and the
    device options; `sampling_from` reads them back, checked."""
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=temperature,
                        help="0 for greedy decoding" + (" (the default)" if temperature == 0 else ""))
    parser.add_argument("--top-k", type=int, default=top_k, help="0 or none: sample from the whole vocabulary")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    add_device_options(parser)


def sampling_from(args: argparse.Namespace) -> Sampling:
    """The Sampling the options of `add_sampling_options` ask for; ConfigError naming a bad one."""
    settings = {"temperature": args.temperature, "top_k": args.top_k or None, "top_p": args.top_p, "seed": args.seed}
    return from_mapping(Sampling, settings, source="the command line")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llm.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a checkpoint folder (model.safetensors and config.json)")
    parser.add_argument("--prompt", required=True, help="the text to continue ('' starts from end-of-text)")
    add_sampling_options(parser, max_new_tokens=50, temperature=0.8, top_k=50)
    parser.add_argument("--no-cache", action="store_true", help="recompute every position at every step")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        sampling = sampling_from(args)  # checked before loading
        config = read_config(args.checkpoint)
        require_language_model(config, args.checkpoint)
        tokenizer = get_tokenizer(config.tokenizer)
        if config.model.vocab_size != tokenizer.n_vocab:
            raise CheckpointError(f"{args.checkpoint}: the model's vocab_size {config.model.vocab_size} does "
                                  f"not match tokenizer {config.tokenizer!r} ({tokenizer.n_vocab} tokens)")
        model = load_for_inference(args.checkpoint, args.device, args.precision)
        prompt = tokenizer.encode(args.prompt, allowed_special="all") or [tokenizer.eot_token]
        if len(prompt) > config.model.context_length:
            print(f"note: the prompt has {len(prompt)} tokens; the model sees its last "
                  f"{config.model.context_length}", file=sys.stderr)
        tokens = stream(model, prompt, args.max_new_tokens, sampling, eos_id=tokenizer.eot_token,
                        use_cache=not args.no_cache)
        for text in decode_stream(tokenizer, tokens):
            sys.stdout.write(text)
            sys.stdout.flush()
    except (CheckpointError, ConfigError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
