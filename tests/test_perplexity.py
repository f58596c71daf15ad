import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from llm.loss import CHUNK_ROWS, IGNORE_INDEX
from llm.model import GPT, model_config
from llm.perplexity import perplexity, sequential_batches
from llm.shards import TokenStream
from tests.data import make_shards


def val_stream(tmp_path, tokens, vocab_size: int) -> TokenStream:
    make_shards(tmp_path / "shards", train=np.arange(4) % vocab_size, val=np.asarray(tokens),
                vocab_size=vocab_size)
    return TokenStream.from_manifest(tmp_path / "shards", "val")


def test_sequential_batches_cover_every_target_once(tmp_path):
    rng = np.random.default_rng()
    tokens = rng.integers(0, 999, size=rng.integers(150, 300))  # 2 or more shards of 97
    make_shards(tmp_path, train=tokens[:4], val=tokens, tokens_per_shard=97, vocab_size=1000)
    targets = []
    for x, y in sequential_batches(TokenStream.from_manifest(tmp_path, "val"), context_length=16, batch_size=3):
        assert x.shape == y.shape and x.shape[1] == 16
        targets.extend(y[y != IGNORE_INDEX].tolist())
    assert targets == tokens[1:].tolist()


class TargetLosses(nn.Module):
    """What perplexity calls: `model(idx, targets, reduction="none")`, each target's loss, 0 where ignored;
    here the cross-entropy of the logits of `logits` (a module from token ids to logits)."""

    def __init__(self, logits: nn.Module):
        super().__init__()
        self.logits = logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "none"
        return torch.nn.functional.cross_entropy(self.logits(idx).flatten(0, 1), targets.flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)


class Bigram(nn.Module):
    """Logits that depend on the current token only: row `a` of a fixed table for input token `a`."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


def test_loss_is_the_token_weighted_mean_over_every_target_including_the_padded_last_window(tmp_path):
    # Each token a predicts a + 1 (mod 4) with probability 3 / (3 + 1 + 1 + 1) = 1/2, any other with 1/6.
    table = torch.zeros(4, 4)
    table[torch.arange(4), (torch.arange(4) + 1) % 4] = math.log(3)
    # Targets: 0>1 1>2 2>3 3>0 0>2 2>2 2>3 3>1 1>2: six hits (ln 2 each) and three misses (ln 6 each).
    stream = val_stream(tmp_path, [0, 1, 2, 3, 0, 2, 2, 3, 1, 2], vocab_size=4)

    # Windows of 4 targets in batches of 2: the second batch is one window with one target, 3 padded.
    result = perplexity(TargetLosses(Bigram(table)), stream, context_length=4, batch_size=2)

    expected = (6 * math.log(2) + 3 * math.log(6)) / 9  # = ln(24) / 3
    assert result.tokens == 9
    assert result.loss == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(24 ** (1 / 3), rel=1e-6)
    assert result.tokens_per_s > 0


def naive_loss(model: GPT, tokens: list[int], context_length: int) -> tuple[float, int]:
    """One window at a time, one target at a time: the mean of -log p(target) over every target."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, context_length):
            window = torch.tensor(tokens[start:start + context_length + 1])
            logits = model(window[None, :-1])[0]
            for t in range(len(window) - 1):
                total -= logits[t].log_softmax(-1)[window[t + 1]].item()
                count += 1
    return total / count, count


def test_a_gpt_scores_what_a_naive_loop_over_every_position_scores_with_dropout_off(tmp_path):
    torch.manual_seed(0)
    model = GPT(model_config("tiny", vocab_size=256, context_length=16, dropout=0.5))
    tokens = torch.randint(0, 256, (150,)).tolist()  # 149 targets: 9 full windows and one of 5
    stream = val_stream(tmp_path, tokens, vocab_size=256)

    model.train()
    result = perplexity(model, stream, context_length=16, batch_size=4)

    assert model.training  # restored
    expected, count = naive_loss(model.eval(), tokens, 16)
    assert result.tokens == count == 149
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operator returns while the mode is on."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self.numel = max(self.numel, value.numel())
        return out


def test_a_gpt_is_scored_without_ever_holding_a_batch_of_logits(tmp_path):
    torch.manual_seed(0)
    vocab, context, batch = 1024, 64, 8  # 512 rows of logits a batch, 4 of the loss's chunks
    model = GPT(model_config("tiny", vocab_size=vocab, context_length=context))
    tokens = torch.randint(0, vocab, (3 * batch * context,)).tolist()
    stream = val_stream(tmp_path, tokens, vocab_size=vocab)

    with LargestTensor() as largest:
        result = perplexity(model, stream, context_length=context, batch_size=batch)

    assert largest.numel <= CHUNK_ROWS * vocab < batch * context * vocab
    expected, _ = naive_loss(model.eval(), tokens, context)
    assert result.loss == pytest.approx(expected, rel=1e-5)


def test_a_split_without_a_target_is_refused_with_the_fix(tmp_path):
    stream = val_stream(tmp_path, [3], vocab_size=4)
    with pytest.raises(ValueError, match=r"^the split holds 1 token\(s\): perplexity needs at least 2 "
                                         r"\(one next-token target\); tokenize more text into it$"):
        perplexity(TargetLosses(Bigram(torch.zeros(4, 4))), stream, context_length=4, batch_size=2)


def test_bits_per_byte_is_the_loss_in_bits_over_the_targets_bytes_without_end_of_text(tmp_path):
    from llm.perplexity import token_byte_lengths
    from llm.tokenizer import get_tokenizer

    enc = get_tokenizer("gpt2")
    lengths = token_byte_lengths(enc)
    assert lengths[enc.eot_token] == 0 and lengths[enc.encode_ordinary(" the")[0]] == 4
    assert lengths.shape == (50257,) and int(lengths.min()) == 0 and int((lengths == 0).sum()) == 1
    text = "Every effort moves you. The café was empty — naïve, wasn't it?"
    ids = enc.encode_ordinary(text) + [enc.eot_token] + enc.encode_ordinary(" A second document.")
    stream = val_stream(tmp_path, ids, 50257)
    torch.manual_seed(0)
    logits = nn.Sequential(nn.Embedding(50257, 8), nn.Linear(8, 50257))  # from the current token alone
    model = TargetLosses(logits)
    result = perplexity(model, stream, context_length=8, batch_size=2, token_bytes=lengths)
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(logits(torch.tensor(ids[:-1])), torch.tensor(ids[1:]),
                                                   reduction="none")
    counted = torch.tensor([t != enc.eot_token for t in ids[1:]])
    nbytes = len(enc.decode_bytes([t for t in ids[1:] if t != enc.eot_token]))
    assert result.bytes == nbytes
    assert result.bits_per_byte == pytest.approx(losses[counted].sum().item() / (math.log(2) * nbytes), rel=1e-6)
    assert result.loss == pytest.approx(losses.mean().item(), rel=1e-6)
    assert math.isnan(perplexity(model, stream, 8, 2).bits_per_byte)  # no lengths given
