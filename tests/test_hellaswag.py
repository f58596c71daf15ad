"""HellaSwag scoring as llm.c does it: the rows and their ending masks, batched scores equal to a row-by-row
reference, a tiny model that learned the right ending picks it, and the errors bad input gets."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llm.checkpoint import save_model
from llm.config import DownloadConfig, SourceConfig
from llm.hellaswag import (HellaSwagError, Item, accuracies, ending_losses, hellaswag, main, read_items,
                           render_item)
from llm.model import GPT, model_config
from llm.tokenizer import get_tokenizer
from llm.validation import ConfigError, from_mapping

RIGHT = Item(ctx="A man is sitting on a roof. He", label=0,
             endings=("starts pulling up roofing on a roof.", "is using wrap to wrap a pair of skis.",
                      "is ripping level tiles off.", "is holding a rubik's cube."))


def write_items(path: Path, items: list[Item], **extra) -> Path:
    """A file in HellaSwag's format, with fields the scorer does not read, as the real file has them."""
    lines = [json.dumps({"ind": i, "activity_label": "Roof shingle removal", "ctx_a": item.ctx, "ctx_b": "",
                         "ctx": item.ctx, "endings": list(item.endings), "label": item.label, "split": "val",
                         **extra}) for i, item in enumerate(items)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_each_row_is_the_context_then_one_ending_and_the_mask_covers_the_ending_alone():
    enc = get_tokenizer("gpt2")
    rows = render_item(RIGHT, enc, context_length=1024)

    for tokens, mask, ending in zip(rows.tokens, rows.masks, RIGHT.endings):
        ctx, end = enc.encode(RIGHT.ctx), enc.encode(" " + ending)  # llm.c's render_example
        assert tokens == ctx + end and mask == [0] * len(ctx) + [1] * len(end)
        assert enc.decode([t for t, m in zip(tokens, mask) if m]) == " " + ending  # with its leading space
    assert rows.label == 0 and not rows.truncated


def test_a_row_too_long_for_the_model_loses_the_start_of_its_context_and_keeps_its_ending():
    enc = get_tokenizer("gpt2")
    ctx, ends = enc.encode(RIGHT.ctx), [enc.encode(" " + e) for e in RIGHT.endings]
    short = len(ctx) + min(map(len, ends)) - 3  # too short for every row

    rows = render_item(RIGHT, enc, context_length=short)

    assert rows.truncated
    for tokens, mask, end in zip(rows.tokens, rows.masks, ends):
        assert len(tokens) == short + 1  # the last token is a target only, never an input
        assert tokens == (ctx + end)[-(short + 1):] and mask[-len(end):] == [1] * len(end) and sum(mask) == len(end)
    tiny = render_item(RIGHT, enc, context_length=4)  # an ending longer than the context: its first tokens
    assert all(t[0] == ctx[-1] and t[1:] == e[:4] and m == [0, 1, 1, 1, 1]
               for t, m, e in zip(tiny.tokens, tiny.masks, ends))


def reference_losses(model: GPT, tokens: list[int], mask: list[int]) -> tuple[float, float]:
    """One row, unbatched, from the full logits: the ending's summed and mean next-token loss."""
    with torch.no_grad():
        logits = model.eval()(torch.tensor([tokens[:-1]]))[0]  # the last token is a target only
    losses = F.cross_entropy(logits, torch.tensor(tokens[1:]), reduction="none")
    ending = losses[torch.tensor(mask[1:], dtype=torch.bool)]
    return ending.sum().item(), ending.mean().item()


def test_batched_scores_equal_a_row_by_row_reference():
    torch.manual_seed(0)
    model = GPT(model_config("tiny", context_length=24))
    enc = get_tokenizer("gpt2")
    rng = random.Random(0)
    words = "the a man dog runs over under quickly red house sits jumps on water tree blue".split()
    items = [Item(" ".join(rng.choices(words, k=rng.randint(1, 14))).capitalize(),
                  tuple(" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in range(4)), rng.randrange(4))
             for _ in range(7)]
    rendered = [render_item(item, enc, model.config.context_length) for item in items]
    assert any(r.truncated for r in rendered)  # some rows cut, the rest padded in the batch

    sums, counts = ending_losses(model, rendered, batch_size=3)

    expected = torch.tensor([[reference_losses(model, t, m) for t, m in zip(r.tokens, r.masks)] for r in rendered],
                            dtype=torch.float64)
    torch.testing.assert_close(sums, expected[..., 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums / counts, expected[..., 1], rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [[sum(m) for m in r.masks] for r in rendered]
    labels = [item.label for item in items]
    result = hellaswag(model, items, enc, batch_size=2)
    assert result.count == 7 and result.truncated == sum(r.truncated for r in rendered)
    assert result.acc == pytest.approx(sum(int(expected[i, :, 0].argmin()) == labels[i] for i in range(7)) / 7)
    assert result.acc_norm == pytest.approx(sum(int(expected[i, :, 1].argmin()) == labels[i] for i in range(7)) / 7)


def test_acc_is_by_summed_loss_and_acc_norm_by_mean_loss_per_token():
    # The long right ending has the larger sum, but the smaller mean.
    sums = torch.tensor([[8.0, 3.0, 5.0, 6.0]], dtype=torch.float64)
    counts = torch.tensor([[8.0, 1.0, 2.0, 2.0]], dtype=torch.float64)
    result = accuracies(sums, counts, [0])
    assert (result.acc, result.acc_norm, result.count) == (0.0, 1.0, 1)


def test_a_tiny_model_trained_on_the_right_ending_picks_it(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(model_config("tiny"))
    enc = get_tokenizer("gpt2")
    data = write_items(tmp_path / "hellaswag_val.jsonl", [RIGHT, Item(RIGHT.ctx, RIGHT.endings[::-1], 3)])
    items = read_items(data)
    assert hellaswag(model, items, enc).acc < 1  # untrained, it does not know
    text = torch.tensor([enc.encode(RIGHT.ctx + " " + RIGHT.endings[0])])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        model(text[:, :-1], text[:, 1:]).backward()
        optimizer.step()

    result = hellaswag(model, items, enc)

    assert (result.acc, result.acc_norm, result.count) == (1.0, 1.0, 2)
    save_model(model, tmp_path / "ckpt")
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--limit", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == "acc: 1/1=1.0000\nacc_norm: 1/1=1.0000\n"


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 2: not JSON"),
    ('["a list"]', r"line 2: an item must be a JSON object"),
    ('{"ctx": "x", "label": 0}', r"line 2: the item has no endings"),
    ('{"ctx": "", "endings": ["a", "b", "c", "d"], "label": 0}', r"line 2: ctx must be a non-empty string"),
    ('{"ctx": "x", "endings": ["a", "b", "c"], "label": 0}', r"line 2: endings must be a list of 4 strings"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": 4}', r"line 2: label must be .* from 0 to 3, got 4"),
    ('{"ctx": "x", "endings": ["a", "b", "c", "d"], "label": "0"}', r"line 2: label must be .* got '0'"),
])
def test_a_malformed_item_is_an_error_naming_the_file_and_line(tmp_path, line, message):
    path = write_items(tmp_path / "h.jsonl", [RIGHT])
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(HellaSwagError, match=rf"^{path}, {message}"):
        read_items(path)
    assert len(read_items(path, limit=1)) == 1  # the lines after the limit are not read


def test_no_items_a_missing_file_and_models_that_are_no_language_model_are_refused(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(HellaSwagError, match="holds no items"):
        read_items(tmp_path / "empty.jsonl")
    with pytest.raises(HellaSwagError, match="not found: give a HellaSwag JSONL file"):
        read_items(tmp_path / "absent.jsonl")
    enc = get_tokenizer("gpt2")
    with pytest.raises(HellaSwagError, match=r"an encoder \(model.objective: masked\)"):
        hellaswag(GPT(model_config("tiny", objective="masked")), [RIGHT], enc)
    with pytest.raises(HellaSwagError, match="a classifier"):
        hellaswag(GPT(model_config("tiny", num_classes=2, tie_weights=False)), [RIGHT], enc)
    with pytest.raises(HellaSwagError, match="past the model's vocab_size of 500"):
        hellaswag(GPT(model_config("tiny", vocab_size=500)), [RIGHT], enc)
    save_model(GPT(model_config("tiny", objective="masked")), tmp_path / "encoder")
    data = write_items(tmp_path / "h.jsonl", [RIGHT])
    assert main(["--checkpoint", str(tmp_path / "encoder"), "--data", str(data), "--device", "cpu"]) == 1
    assert "is an encoder (model.objective: masked), not a causal language model" in capsys.readouterr().err


def test_a_hellaswag_source_is_jsonl_and_downloads_unpinned_with_its_hash_to_pin(tmp_path, caplog):
    from llm import download as dl

    corpus = {"name": "c", "url": "https://h/c.txt"}
    config = from_mapping(DownloadConfig, {"sources": [corpus, {"name": "hellaswag-val", "kind": "jsonl",
                                                                  "role": "hellaswag", "url": "https://h/v.jsonl"}]})
    assert config.sources[1].role == "hellaswag"
    with pytest.raises(ConfigError, match=r"sources\[1\]\.kind: must be jsonl for a hellaswag source"):
        from_mapping(DownloadConfig, {"sources": [corpus, {"name": "h", "kind": "json", "role": "hellaswag",
                                                           "url": "https://h/v.json"}]})
    data = write_items(tmp_path / "hellaswag_val.jsonl", [RIGHT])
    source = SourceConfig(name="hellaswag-val", url=str(data), kind="jsonl", role="hellaswag")
    with caplog.at_level(logging.WARNING, logger="llm.download"):
        result = dl.fetch(source.url, dl.source_path(tmp_path / "raw", source), None)
    assert result.path == tmp_path / "raw/hellaswag/hellaswag_val.jsonl"
    assert f"hellaswag_val.jsonl: no sha256 pinned; the file fetched has sha256 {result.sha256}" in caplog.text
