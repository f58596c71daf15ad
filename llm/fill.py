"""Fill in the blanks: an encoder's (model.objective: masked) guesses for each [MASK] of a text.

    python -m llm.fill --checkpoint data/checkpoints/pretrain "The capital of France is [MASK]." [--top-k 5]

prints, for each mask in order, its `top_k` most probable tokens with their probabilities. Each mask
stands for one token. GPT-2's tokens carry the space before a word, so a space right before a mask
belongs to the token that fills it (" Paris"), as in the text the encoder was trained on. Computed in
fp32 unless `--precision` asks for bf16, like every command that runs a model.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import tiktoken
import torch
import torch.nn.functional as F
from torch import nn

from llm.checkpoint import CheckpointError, read_config
from llm.generate import add_device_options, load_for_inference
from llm.model import GPT, eval_mode
from llm.tokenizer import TokenizerError, get_tokenizer

MASK = "[MASK]"  # how a text marks the tokens to fill in

Guesses = list[tuple[str, float]]  # (token text, probability), most probable first


def encode_masked(enc: tiktoken.Encoding, text: str, mask_token_id: int) -> list[int]:
    """Token ids of `text` with each MASK as `mask_token_id`; a space before a mask is the filling token's."""
    pieces = text.split(MASK)
    if len(pieces) == 1:
        raise ValueError(f"the text has no {MASK}: mark each token to fill in with {MASK}, e.g. "
                         f"\"The capital of France is {MASK}.\"")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i < len(pieces) - 1:
            piece = piece.removesuffix(" ")
        ids += enc.encode_ordinary(piece)
        if i < len(pieces) - 1:
            ids.append(mask_token_id)
    return ids


@torch.no_grad()
def fill(model: GPT, enc: tiktoken.Encoding, text: str, top_k: int = 5) -> list[Guesses]:
    """The `top_k` guesses of encoder `model` for each MASK of `text`, in order."""
    config = model.config
    if not config.is_encoder:
        raise ValueError("fill needs an encoder (model.objective: masked): a causal model predicts the next "
                         "token only; continue a text with llm.generate instead")
    ids = encode_masked(enc, text, config.mask_token_id)
    if len(ids) > config.context_length:
        raise ValueError(f"the text has {len(ids)} tokens; the model sees at most {config.context_length}: "
                         f"shorten it")
    idx = torch.tensor([ids], device=model.head_weight.device)
    with eval_mode(model):
        logits = model(idx)[0, idx[0] == config.mask_token_id].float()  # (masks, vocab_size)
    probs, tokens = F.softmax(logits, dim=-1).topk(min(top_k, config.vocab_size), dim=-1)
    return [[(enc.decode([t]), p) for t, p in zip(row_tokens.tolist(), row_probs.tolist())]
            for row_tokens, row_probs in zip(tokens, probs)]


def format_fills(fills: Sequence[Guesses]) -> str:
    """One line per mask: `[MASK] 1: ' Paris' 0.412, ' London' 0.101, ...`."""
    return "\n".join(f"{MASK} {i}: " + ", ".join(f"{token!r} {p:.3f}" for token, p in guesses)
                     for i, guesses in enumerate(fills, start=1))


def fill_sampler(tokenizer: str, prompt: str) -> Callable[[nn.Module, int], dict[str, str]]:
    """An encoder's samples: its guesses for the masks of `prompt` (one after it if it has none)."""
    enc = get_tokenizer(tokenizer)
    text = prompt if MASK in prompt else f"{prompt} {MASK}"

    def sample(model: nn.Module, step: int) -> dict[str, str]:
        return {f"samples/step-{step:06d}.txt": f"{text}\n{format_fills(fill(model, enc, text))}"}

    return sample


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.fill", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="an encoder's checkpoint folder")
    parser.add_argument("text", help=f"the text, with {MASK} for each token to fill in")
    parser.add_argument("--top-k", type=int, default=5, help="guesses shown per mask (default: 5)")
    add_device_options(parser)
    args = parser.parse_args(argv)
    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
        config = read_config(args.checkpoint)
        if config.model.is_classifier:
            raise CheckpointError(f"{args.checkpoint} is a classifier: classify texts with "
                                  f"`python -m llm.classify --checkpoint {args.checkpoint} TEXT`")
        if not config.model.is_encoder:
            raise CheckpointError(f"{args.checkpoint} is a causal model (model.objective: causal), not an encoder: "
                                  f"it cannot fill in masks; continue a text with `python -m llm.generate "
                                  f"--checkpoint {args.checkpoint} --prompt TEXT`, or pretrain an encoder with "
                                  f"model.objective: masked")
        enc = get_tokenizer(config.tokenizer)
        model = load_for_inference(args.checkpoint, args.device, args.precision)
        print(format_fills(fill(model, enc, args.text, args.top_k)))
    except (CheckpointError, TokenizerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
