"""HellaSwag: which of four endings a language model finds likeliest after a context, scored as llm.c scores it.

    python -m llm.hellaswag --checkpoint data/checkpoints/pretrain --data data/raw/hellaswag/hellaswag_val.jsonl
                            [--limit N] [--batch-size 8] [--device cuda] [--precision fp32]

prints acc, acc_norm and the number of items. The evaluate stage scores its models the same way when
`evaluate.hellaswag` names a download source of role hellaswag (README, "HellaSwag").

Each item of the JSONL file (HellaSwag's own format: `ctx`, `endings` (4), `label`, and fields not read
here) becomes four rows, as llm.c's dev/data/hellaswag.py renders them: the context's tokens, then an
ending's tokens, the ending encoded with a leading space (" " + ending) and on its own, not with the
context. The loss is the next-token cross-entropy over the ending's tokens only; `acc` takes the ending
of least summed loss, `acc_norm` the ending of least mean loss per token (llm.c's names). For reference,
llm.c reports GPT-2 124M at acc 0.2859 and acc_norm 0.2955 on the validation set's 10,042 items.

The rows are right-padded and scored many items to a forward pass, with no KV cache: a causal model's
padding after a row changes nothing before it. The head and its loss (llm.loss.linear_cross_entropy) run
only at the positions that predict an ending's token. A row longer than the model's context loses tokens from the
start of its context (at least one is kept, to predict the ending's first token); the ending stays whole,
unless it alone is longer than the context, when its first tokens are kept. GPT-2's 1,024 positions hold
every HellaSwag row; `truncated` counts the items that lost tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import torch

from llm.checkpoint import CheckpointError, read_config, require_language_model
from llm.generate import add_device_options, load_for_inference
from llm.loss import linear_cross_entropy
from llm.model import GPT, eval_mode
from llm.tokenizer import TokenizerError, get_tokenizer

log = logging.getLogger(__name__)

ENDINGS = 4  # HellaSwag's items have four endings each
# llm.c's figures for GPT-2 124M on the validation set (dev/data/hellaswag.py), for the README and the report.
GPT2_124M = {"acc": 0.2859, "acc_norm": 0.2955}


class HellaSwagError(ValueError):
    """A HellaSwag file or item that cannot be scored."""


@dataclass(frozen=True)
class Item:
    ctx: str
    endings: tuple[str, ...]  # four
    label: int  # the index of the right ending


@dataclass(frozen=True)
class Rows:
    """One item as the model reads it: four rows of token ids, each the context then one ending."""

    tokens: list[list[int]]
    masks: list[list[int]]  # per row: 1 at the ending's tokens, 0 at the context's
    label: int
    truncated: bool  # some row lost tokens to fit the model's context


@dataclass(frozen=True)
class HellaSwagResult:
    acc: float  # the fraction of items whose right ending has the least summed loss
    acc_norm: float  # ... the least mean loss per ending token
    count: int  # items scored
    truncated: int = 0  # of them, those with a row cut to the model's context


def read_items(path: str | Path, limit: int | None = None) -> list[Item]:
    """The items of HellaSwag JSONL file `path` (the first `limit` of them); a malformed line is an error
    that names the file and the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise HellaSwagError(f"{path} not found: give a HellaSwag JSONL file (hellaswag_val.jsonl, which the "
                             f"download stage fetches with a source of role hellaswag)") from None
    except UnicodeDecodeError as exc:
        raise HellaSwagError(f"{path} is not UTF-8 text ({exc}): give a HellaSwag JSONL file") from exc
    items: list[Item] = []
    for number, line in enumerate(lines, start=1):
        if limit is not None and len(items) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HellaSwagError(f"{where}: not JSON ({exc.msg}); each line must be one item, a JSON object "
                                 f"with ctx, endings and label") from None
        items.append(_item(record, where))
    if not items:
        raise HellaSwagError(f"{path} holds no items: each line must be a JSON object with ctx, endings and label")
    return items


def _item(record: object, where: str) -> Item:
    if not isinstance(record, dict):
        raise HellaSwagError(f"{where}: an item must be a JSON object with ctx, endings and label, got "
                             f"{type(record).__name__}")
    missing = [key for key in ("ctx", "endings", "label") if key not in record]
    if missing:
        raise HellaSwagError(f"{where}: the item has no {', '.join(missing)}; HellaSwag items have ctx, endings "
                             f"and label")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str) or not ctx.strip():
        raise HellaSwagError(f"{where}: ctx must be a non-empty string (the endings' first token is predicted "
                             f"from it), got {ctx!r}")
    if not (isinstance(endings, list) and len(endings) == ENDINGS and all(isinstance(e, str) for e in endings)):
        raise HellaSwagError(f"{where}: endings must be a list of {ENDINGS} strings, got {_short(endings)}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < ENDINGS:
        raise HellaSwagError(f"{where}: label must be the right ending's index, an integer from 0 to "
                             f"{ENDINGS - 1}, got {label!r}")
    return Item(ctx, tuple(endings), label)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def render_item(item: Item, enc: tiktoken.Encoding, context_length: int) -> Rows:
    """The four rows of `item` and their ending masks, as llm.c's render_example makes them (unpadded),
    each cut to fit a model of `context_length` positions (the module's docstring says how)."""
    ctx = enc.encode_ordinary(item.ctx)
    tokens, masks, truncated = [], [], False
    for ending in item.endings:
        whole = enc.encode_ordinary(" " + ending)  # GPT-2's tokens carry the space before a word
        end = whole[:context_length]
        # The row's last token is a target only, never an input: a row of context_length + 1 tokens fits.
        kept = ctx[-(context_length + 1 - len(end)):]
        truncated |= len(kept) < len(ctx) or len(end) < len(whole)
        tokens.append(kept + end)
        masks.append([0] * len(kept) + [1] * len(end))
    return Rows(tokens, masks, item.label, truncated)


def _check_scorable(model: GPT) -> None:
    config = model.config
    if config.is_classifier:
        raise HellaSwagError(f"a classifier ({config.num_classes} classes) predicts labels, not tokens: HellaSwag "
                             f"scores a causal language model's next-token losses")
    if config.is_encoder:
        raise HellaSwagError("an encoder (model.objective: masked) predicts masked tokens, not the next one: "
                             "HellaSwag scores a causal language model (objective: causal)")


def ending_losses(model: GPT, rendered: Sequence[Rows], batch_size: int = 8,
                  autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ending's summed loss over its tokens and its number of tokens, both (items, 4), float64 on
    the CPU; `batch_size` items (4 rows each) to a forward pass, on the model's device and in its dtype
    (`autocast_dtype`, e.g. torch.bfloat16, runs the forward under autocast, as llm.perplexity does)."""
    _check_scorable(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = model.head_weight.device
    vocab = model.config.vocab_size
    sums, counts = [], []
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with eval_mode(model), torch.inference_mode(), autocast:
        for start in range(0, len(rendered), batch_size):
            rows = [(t, m) for item in rendered[start:start + batch_size] for t, m in zip(item.tokens, item.masks)]
            width = max(len(t) for t, _ in rows)
            tokens = torch.zeros(len(rows), width, dtype=torch.int64)
            mask = torch.zeros(len(rows), width, dtype=torch.bool)
            for i, (t, m) in enumerate(rows):
                tokens[i, :len(t)] = torch.tensor(t)
                mask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
            if int(tokens.max()) >= vocab:
                raise HellaSwagError(f"token id {int(tokens.max())} is past the model's vocab_size of {vocab}: "
                                     f"score with the tokenizer the model was trained with")
            # llm.c's shift: position t predicts token t + 1, and only an ending's tokens are targets.
            targets = tokens[:, 1:].to(device)
            scored = mask[:, 1:].to(device)
            hidden = model.forward_hidden(tokens[:, :-1].to(device))  # (rows, T, C)
            # The head only where an ending's token is predicted: the context's positions need no logits.
            losses = linear_cross_entropy(hidden[scored], model.head_weight, targets[scored], reduction="none")
            row = scored.nonzero()[:, 0]
            summed = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row, losses.double())
            sums.append(summed.cpu().view(-1, ENDINGS))
            counts.append(mask[:, 1:].sum(dim=1).double().view(-1, ENDINGS))
    return torch.cat(sums), torch.cat(counts)


def accuracies(sums: torch.Tensor, counts: torch.Tensor, labels: Sequence[int], truncated: int = 0) -> HellaSwagResult:
    """acc by the least summed loss, acc_norm by the least mean loss per token (the first ending on a tie)."""
    labels_t = torch.tensor(list(labels))
    acc = (sums.argmin(dim=1) == labels_t).double().mean().item()
    acc_norm = ((sums / counts).argmin(dim=1) == labels_t).double().mean().item()
    return HellaSwagResult(acc=acc, acc_norm=acc_norm, count=len(labels_t), truncated=truncated)


def hellaswag(model: GPT, items: Sequence[Item], enc: tiktoken.Encoding, batch_size: int = 8,
              autocast_dtype: torch.dtype | None = None) -> HellaSwagResult:
    """Score `model` on `items`, tokenized with `enc` (the tokenizer the model was trained with)."""
    _check_scorable(model)
    if not items:
        raise HellaSwagError("no HellaSwag items to score: read them from a HellaSwag JSONL file with read_items")
    rendered = [render_item(item, enc, model.config.context_length) for item in items]
    truncated = sum(r.truncated for r in rendered)
    if truncated:
        log.warning("HellaSwag: %d of %d items have a row longer than the model's %d positions; their contexts "
                    "were cut from the start", truncated, len(items), model.config.context_length)
    sums, counts = ending_losses(model, rendered, batch_size, autocast_dtype)
    return accuracies(sums, counts, [r.label for r in rendered], truncated)


def format_result(result: HellaSwagResult) -> str:
    correct, correct_norm = round(result.acc * result.count), round(result.acc_norm * result.count)
    lines = [f"acc: {correct}/{result.count}={result.acc:.4f}",
             f"acc_norm: {correct_norm}/{result.count}={result.acc_norm:.4f}"]
    if result.truncated:
        lines.append(f"truncated: {result.truncated} items had their contexts cut to fit the model")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.hellaswag", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a causal language model's checkpoint folder")
    parser.add_argument("--data", type=Path, required=True, help="a HellaSwag JSONL file (hellaswag_val.jsonl)")
    parser.add_argument("--limit", type=int, default=None, help="score the first N items only")
    parser.add_argument("--batch-size", type=int, default=8, help="items (4 rows each) per forward pass")
    add_device_options(parser)
    args = parser.parse_args(argv)
    try:
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {args.limit}")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        saved = read_config(args.checkpoint)
        require_language_model(saved, args.checkpoint)
        items = read_items(args.data, args.limit)
        enc = get_tokenizer(saved.tokenizer)
        model = load_for_inference(args.checkpoint, args.device, args.precision)
        print(format_result(hellaswag(model, items, enc, args.batch_size)))
    except (CheckpointError, TokenizerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
