"""The classification library (llm/classify.py): labelled texts in every format, the book's balanced split,
padded batches, the classifier GPT, what trains, exact resume, and the command."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch

from llm import classify
from llm.checkpoint import load_model, save_model
from llm.classify import (ClassificationDataError, Classifier, LabeledText, balance, classifier_from, collate,
                          load_texts, run_classify, split_texts)
from llm.config import Params
from llm.model import GPT, IGNORE_INDEX, model_config
from llm.tracking import MemoryTracker
from llm.validation import from_mapping
from tests.conftest import shared_file
from tests.data import DiesAtStep, Killed

WORDS = "the a to you me call now free prize cash lunch home see later ok".split()


def toy_rows(n: int = 160, seed: int = 0) -> list[tuple[str, str]]:
    """(label, text): a third spam, which always says WINNER somewhere; an easy task for a tiny model."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
        if i % 3 == 0:
            words.insert(rng.randint(0, len(words)), "WINNER")
        rows.append(("spam" if i % 3 == 0 else "ham", " ".join(words)))
    return rows


def raw_folder(tmp_path: Path, rows: list[tuple[str, str]]) -> Path:
    """A data/raw/ as the download stage leaves it, with one classification source `toy`."""
    raw = tmp_path / "raw"
    (raw / "classification").mkdir(parents=True)
    (raw / "classification" / "toy.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    entry = {"name": "toy", "role": "classification", "kind": "tsv", "text_field": "text", "label_field": "label",
             "columns": ["label", "text"], "file": "classification/toy.tsv"}
    (raw / "classification" / "manifest.json").write_text(json.dumps({"sources": [entry]}))
    return raw


def tiny_lm(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_model(GPT(model_config("tiny")), folder)
    return folder


def params(**classify_settings) -> Params:
    settings = {"data": "toy", "epochs": 1, "batch_size": 8, "global_batch_size": 8, "lr": 1e-3, "min_lr": 1e-3,
                "log_interval": 2, "eval_interval": 4, "eval_batches": 2, "checkpoint_interval": 4,
                **classify_settings}
    return from_mapping(Params, {"download": {"sources": [{"name": "corpus", "url": "corpus.txt"}]},
                                 "classify": settings})


# ---------------------------------------------------------------------------------------------------
# Data


def test_every_format_reads_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("spam", 'Free "entry", call now'), ("ham", "see you at 5"), ("ham", "ok")]
    expected = [LabeledText(text, label) for label, text in rows]
    (tmp_path / "a.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    (tmp_path / "a.csv").write_text("text,label\n" + "".join(f'"{t.replace(chr(34), 2 * chr(34))}",{lab}\n'
                                                            for lab, t in rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for lab, t in rows))
    (tmp_path / "a.json").write_text(json.dumps([{"text": t, "label": lab} for lab, t in rows]))
    pq.write_table(pa.table({"text": [t for _, t in rows], "label": [lab for lab, _ in rows]}), tmp_path / "a.parquet")

    assert load_texts(tmp_path / "a.tsv", "tsv", "text", "label", columns=["label", "text"]) == expected
    for kind in ("csv", "jsonl", "json", "parquet"):
        assert load_texts(tmp_path / f"a.{kind}", kind, "text", "label") == expected, kind


def test_numeric_labels_become_strings_numbered_in_sorted_order(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"t": "x", "y": 1}\n{"t": "y", "y": 0}\n{"t": "z", "y": 1}\n')
    texts = load_texts(tmp_path / "a.jsonl", "jsonl", "t", "y")
    assert [t.label for t in texts] == ["1", "0", "1"]
    assert classify.label_names(texts) == ["0", "1"]


def test_bad_records_are_refused_with_their_place_and_the_fix(tmp_path):
    (tmp_path / "empty.tsv").write_text("ham\thello\nspam\t \n")
    with pytest.raises(ClassificationDataError, match=r"empty.tsv: record 1: 'text' must be a non-empty text"):
        load_texts(tmp_path / "empty.tsv", "tsv", "text", "label", columns=["label", "text"])
    (tmp_path / "header.csv").write_text("message,category\nhi,ham\n")
    with pytest.raises(ClassificationDataError, match=r"its columns are message, category; fix the file or the "
                                                       r"source's text_field, label_field and columns"):
        load_texts(tmp_path / "header.csv", "csv", "text", "label")
    (tmp_path / "lines.jsonl").write_text('{"text": "a", "label": "x"}\n["not", "an object"]\n')
    with pytest.raises(ClassificationDataError, match=r"lines.jsonl: line 2 must be an object with 'text' and 'label'"):
        load_texts(tmp_path / "lines.jsonl", "jsonl", "text", "label")


def test_balance_undersamples_every_class_to_the_smallest_by_seed():
    texts = [LabeledText(text, label) for label, text in toy_rows(90)]
    balanced = balance(texts, seed=1)
    counts = {label: sum(t.label == label for t in balanced) for label in ("ham", "spam")}
    assert counts == {"ham": 30, "spam": 30}
    assert balance(texts, seed=1) == balanced and balance(texts, seed=2) != balanced
    assert all(t.label == "ham" or t in texts for t in balanced)


def test_the_split_is_seeded_disjoint_and_sized_as_the_books():
    texts = [LabeledText(f"text {i}", "ab"[i % 2]) for i in range(101)]
    split = split_texts(texts, train=0.7, val=0.1, seed=123)
    assert (len(split.train), len(split.val), len(split.test)) == (70, 10, 21)
    assert sorted(split.train + split.val + split.test, key=lambda t: t.text) == sorted(texts, key=lambda t: t.text)
    assert split_texts(texts, seed=123) == split and split_texts(texts, seed=124) != split
    with pytest.raises(ClassificationDataError, match="leave a split empty"):
        split_texts(texts[:5])


def test_the_sms_spam_collection_balances_and_splits_as_the_book_does():
    texts = load_texts(shared_file("SMSSpamCollection"), "tsv", "text", "label", columns=["label", "text"])
    assert len(texts) == 5574 and sum(t.label == "spam" for t in texts) == 747
    split = split_texts(balance(texts, 123), seed=123)
    assert (len(split.train), len(split.val), len(split.test)) == (1045, 149, 300)  # the book's sizes


# ---------------------------------------------------------------------------------------------------
# The classifier


def test_collate_pads_right_to_the_longest_and_marks_the_real_tokens():
    x, y = collate([classify.Example((5, 6, 7), 1), classify.Example((8,), 0)], pad_id=99)
    assert x.tolist() == [[5, 6, 7], [8, 99, 99]]
    assert y.tolist() == [[1, 1, 1], [0, IGNORE_INDEX, IGNORE_INDEX]]


@pytest.mark.parametrize("pooling", ["last", "mean", "first"])
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("objective", ["causal", "masked"])
def test_padding_never_changes_a_prediction(pooling, attention, objective):
    torch.manual_seed(0)
    lm = GPT(model_config("tiny", attention=attention, objective=objective))
    model = classifier_from(lm, num_classes=3, pooling=pooling, seed=0).eval()
    text = classify.Example(tuple(torch.randint(0, 50000, (5,)).tolist()), 0)
    longer = classify.Example(tuple(torch.randint(0, 50000, (17,)).tolist()), 1)
    alone = model.class_logits(*_inputs(collate([text], 50256)))
    for pad_id in (50256, 0):
        padded = model.class_logits(*_inputs(collate([text, longer], pad_id)))
        torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)


def _inputs(batch):
    x, y = batch
    return x, y != IGNORE_INDEX


def test_the_classifier_keeps_the_backbone_and_gets_a_new_head():
    torch.manual_seed(0)
    lm = GPT(model_config("tiny"))
    model = classifier_from(lm, num_classes=2, pooling="last", seed=0)
    assert model.config.num_classes == 2 and not model.config.tie_weights
    assert model.lm_head.weight.shape == (2, 64)
    for name, p in lm.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(p, model.state_dict()[name]), name


def test_only_the_last_block_the_final_norm_and_the_head_train(tmp_path):
    raw, start = raw_folder(tmp_path, toy_rows(60)), tiny_lm(tmp_path / "lm")
    result = run_classify(params(trainable="last-block"), raw, start, tmp_path / "out", tracker=MemoryTracker())
    before = load_model(start).state_dict()
    after = load_model(tmp_path / "out").state_dict()
    trained = ("h.1.", "ln_f.", "lm_head.")
    for name, p in after.items():
        if name.startswith(trained):
            assert name == "lm_head.weight" or not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"{name} changed, but it is frozen"
    assert result.metrics["steps"] == 3 and "val_accuracy" in result.metrics  # 28 train texts, 8 a step
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["labels"] == ["ham", "spam"] and saved["truncated_texts"]["train"] == 0


def test_a_classifier_learns_and_a_killed_run_resumes_to_the_same_weights(tmp_path):
    raw, start = raw_folder(tmp_path, toy_rows(160)), tiny_lm(tmp_path / "lm")
    settings = params(trainable="all", epochs=3, lr=2e-3, min_lr=2e-3)
    whole = run_classify(settings, raw, start, tmp_path / "whole", tracker=MemoryTracker())
    scored = classify.final_scores(whole.model, tmp_path / "whole", batch_size=16)
    assert scored.metrics["test_accuracy"] >= 0.85 and scored.metrics["train_loss"] < 0.3
    tests = sum(map(sum, scored.confusion))  # 54 spam, so 108 balanced texts: 75 train, 10 val, 23 test
    assert tests == 23 and len(scored.wrong) == round(tests * (1 - scored.metrics["test_accuracy"]))

    with pytest.raises(Killed):
        run_classify(settings, raw, start, tmp_path / "killed", tracker=DiesAtStep(18))
    run_classify(settings, raw, start, tmp_path / "killed", tracker=MemoryTracker())
    ours = safetensors.torch.load_file(tmp_path / "killed" / "model.safetensors")
    for name, p in safetensors.torch.load_file(tmp_path / "whole" / "model.safetensors").items():
        assert torch.equal(p, ours[name]), name


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_an_encoder_backbone_learns_to_classify(tmp_path, pooling):
    torch.manual_seed(0)
    start = tmp_path / "encoder"
    save_model(GPT(model_config("tiny", objective="masked")), start)
    raw = raw_folder(tmp_path, toy_rows(160))
    result = run_classify(params(trainable="all", epochs=3, lr=2e-3, min_lr=2e-3, pooling=pooling), raw, start,
                          tmp_path / "out", tracker=MemoryTracker())
    saved = load_model(tmp_path / "out").config
    assert saved.is_encoder and saved.is_classifier and saved.pooling == pooling
    assert classify.final_scores(result.model, tmp_path / "out", batch_size=16).metrics["test_accuracy"] >= 0.85
    assert [label for label, _ in Classifier(tmp_path / "out")(["WINNER call now"])] == ["spam"]


def test_lora_adapters_are_merged_into_a_plain_classifier(tmp_path):
    raw, start = raw_folder(tmp_path, toy_rows(60)), tiny_lm(tmp_path / "lm")
    result = run_classify(params(trainable="lora", lora_rank=4), raw, start, tmp_path / "out", tracker=MemoryTracker())
    saved = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert not [name for name in saved if "lora" in name]
    assert set(saved) == set(load_model(start).state_dict()) and saved["lm_head.weight"].shape == (2, 64)
    assert [label for label, _ in Classifier(tmp_path / "out")(["WINNER call now"])] in (["ham"], ["spam"])
    assert result.metrics["steps"] == 3


# ---------------------------------------------------------------------------------------------------
# The command, and what refuses a classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("classifier")
    raw, start = raw_folder(tmp_path, toy_rows(60)), tiny_lm(tmp_path / "lm")
    run_classify(params(trainable="all"), raw, start, tmp_path / "out", tracker=MemoryTracker())
    return tmp_path / "out"


def test_the_command_prints_each_texts_label_and_probability(trained, capsys, monkeypatch):
    assert classify.main(["--checkpoint", str(trained), "WINNER now", "see you"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[2] for line in lines] == ["WINNER now", "see you"]
    assert all(line.split("\t")[0] in ("ham", "spam") and 0.5 <= float(line.split("\t")[1]) <= 1 for line in lines)
    monkeypatch.setattr("sys.stdin", io.StringIO("one\n\ntwo\n"))
    assert classify.main(["--checkpoint", str(trained), "-"]) == 0
    assert [line.split("\t")[2] for line in capsys.readouterr().out.splitlines()] == ["one", "two"]


def test_a_classifier_and_a_language_model_refuse_each_others_jobs(trained, tmp_path, capsys):
    from llm import generate

    assert generate.main(["--checkpoint", str(trained), "--prompt", "hi"]) == 1
    assert (f"{trained} is a classifier (classes: ham, spam), not a language model: classify texts with `python -m "
            f"llm.classify --checkpoint {trained} TEXT`") in capsys.readouterr().err
    lm = tiny_lm(tmp_path / "lm")
    assert classify.main(["--checkpoint", str(lm), "hello"]) == 1
    assert f"{lm} is a language model, not a classifier" in capsys.readouterr().err
    with pytest.raises(Exception, match=r"classify.init_from: .* is a classifier already"):
        run_classify(params(init_from=str(trained)), raw_folder(tmp_path, toy_rows(30)), lm, tmp_path / "out",
                     tracker=MemoryTracker())


def test_classify_settings_and_data_are_checked_in_the_users_words(tmp_path):
    from llm.validation import ConfigError

    with pytest.raises(ConfigError) as caught:
        params(train_fraction=0.8, val_fraction=0.2, trainable="lora", lora_rank=0, max_length=0)
    assert caught.value.problems == [
        ("classify.val_fraction", "train_fraction + val_fraction must leave some records for test, got 0.8 + 0.2"),
        ("classify.max_length", "must be in [1, inf], got 0"),
        ("classify.lora_rank", "must be positive with trainable: lora (e.g. 16)")]
    start = tiny_lm(tmp_path / "lm")
    with pytest.raises(FileNotFoundError, match=r"classify.data: no downloaded source 'spam' with role classification "
                                                r"\(downloaded: toy\); add it to download.sources or fix the name"):
        run_classify(params(data="spam"), raw_folder(tmp_path / "a", toy_rows(30)), start, tmp_path / "out",
                     tracker=MemoryTracker())
    one_class = [("ham", text) for _, text in toy_rows(30)]
    with pytest.raises(ClassificationDataError, match=r"every record has the label 'ham'; a classifier needs at least "
                                                      r"two classes"):
        run_classify(params(), raw_folder(tmp_path / "b", one_class), start, tmp_path / "out", tracker=MemoryTracker())
