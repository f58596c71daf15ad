"""The finetune stage: learning from instruction records, the split it leaves, LoRA, bad data (resume after a
kill: tests/test_faults.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch

from llm.checkpoint import SPLIT_FILE, load_model, read_config, save_model
from llm.config import Params
from llm.download import write_manifests
from llm.finetune import run_finetune
from llm.instructions import InstructionDataError, Record, encode_records, read_split
from llm.model import GPT, model_config
from llm.tracking import MemoryTracker
from llm.validation import from_mapping
from tests.conftest import shared_file

FINETUNE = {"batch_size": 4, "global_batch_size": 4, "epochs": None, "max_steps": 12, "lr": 1e-3, "min_lr": 1e-3,
            "log_interval": 2, "eval_interval": 6, "eval_batches": 2, "sample_interval": 6, "sample_tokens": 4,
            "checkpoint_interval": 6, "precision": "fp32", "device": "cpu", "max_length": 96}


def params(**finetune) -> Params:
    return from_mapping(Params, {"finetune": {**FINETUNE, **finetune}})


def make_raw(root: Path, records: list) -> Path:
    raw = root / "raw"
    (raw / "instructions").mkdir(parents=True)
    (raw / "instructions" / "data.json").write_text(json.dumps(records))
    write_manifests(raw, [{"name": "instruction-data", "role": "instructions", "kind": "json", "text_field": None,
                           "file": "instructions/data.json", "url": "x", "sha256": "0" * 64, "bytes": 1}])
    return raw


@pytest.fixture
def stage(tmp_path):
    """A raw folder with 80 of the book's records and a tiny 'pretrained' GPT-2-vocabulary model."""
    records = json.loads(shared_file("instruction-data.json").read_text())[:80]
    raw = make_raw(tmp_path, records)
    torch.manual_seed(0)
    save_model(GPT(model_config("tiny", context_length=96)), tmp_path / "pretrain")
    return raw, tmp_path / "pretrain", tmp_path / "finetune"


def test_finetuning_learns_and_leaves_the_split_for_evaluation(stage):
    raw, pretrain, out = stage
    tracker = MemoryTracker()
    result = run_finetune(params(), raw, pretrain, out, tracker=tracker)
    val = tracker.series("val_loss")
    assert val[0][0] == 0 and val[-1][1] < val[0][1] - 0.5
    split = read_split(out / SPLIT_FILE)
    assert (len(split.train), len(split.test), len(split.val)) == (68, 8, 4)  # the book's 85% / 10% / rest
    assert tracker.texts["samples/step-000012.txt"].startswith("Below is an instruction that describes a task.")
    assert load_model(out).config.n_layer == 2 and result.metrics["steps"] == 12
    history = json.loads((out / "history.json").read_text())
    assert [s for s, _ in history["val_loss"]] == [0, 6, 12]


def test_epochs_set_the_number_of_steps(stage):
    raw, pretrain, out = stage
    result = run_finetune(params(epochs=1.0, max_steps=999, sample_interval=0), raw, pretrain, out,
                          tracker=MemoryTracker())
    assert result.metrics["steps"] == 68 // 4


def test_lora_trains_adapters_only_and_saves_a_plain_merged_model(stage):
    raw, pretrain, out = stage
    before = safetensors.torch.load_file(pretrain / "model.safetensors")
    result = run_finetune(params(lora_rank=4, lora_alpha=8, lr=5e-3, min_lr=5e-3), raw, pretrain, out,
                          tracker=MemoryTracker())
    saved = safetensors.torch.load_file(out / "model.safetensors")
    assert not any("lora" in name for name in saved)
    def embedding(weights):  # tied: stored once, under either name
        return weights.get("wte.weight", weights.get("lm_head.weight"))

    assert torch.equal(embedding(saved), embedding(before))  # frozen: not a target
    assert not torch.equal(saved["h.0.attn.c_attn.weight"], before["h.0.attn.c_attn.weight"])  # merged adapter
    merged = load_model(out)
    idx = torch.randint(0, 50257, (1, 16))
    torch.testing.assert_close(merged(idx), result.model.eval()(idx))
    assert json.loads((out / "config.json").read_text())["trainable_parameters"] < 100_000


def test_examples_longer_than_max_length_are_counted_warned_about_and_recorded(tmp_path, caplog):
    short = {"instruction": "Say yes.", "input": "", "output": "yes"}
    long_output = {**short, "output": " a" * 150}
    long_prompt = {**short, "instruction": " b" * 80}  # with mask_prompt, fills max_length 64 alone
    # 20 records in file order: train the first 17, test the next 2, val the last one.
    records = [long_output, long_output, long_prompt, *[short] * 16, long_output]
    raw = make_raw(tmp_path, records)
    save_model(GPT(model_config("tiny", context_length=96)), tmp_path / "pretrain")
    longest, prompt_only = (len(e.ids) - 1 for e in encode_records([Record(**r) for r in (long_output, long_prompt)]))
    assert prompt_only < longest  # the longest in train and val alike
    settings = {"max_steps": 2, "sample_interval": 0, "eval_batches": 1}
    with caplog.at_level(logging.WARNING, logger="llm.finetune"):
        run_finetune(params(**settings, max_length=64, mask_prompt=True), raw, tmp_path / "pretrain",
                     tmp_path / "out", tracker=MemoryTracker())
    fix = "raise finetune.max_length (up to the model's context_length 96) or shorten them"
    assert [r.getMessage() for r in caplog.records] == [
        f"finetune: 2 of 17 train examples are longer than max_length 64 tokens (longest {longest}) and are cut "
        f"to it; {fix}",
        f"finetune: 1 of 17 train examples are left out: with finetune.mask_prompt their prompt alone fills "
        f"max_length 64, which leaves nothing to learn; {fix}",
        f"finetune: 1 of 1 val examples are longer than max_length 64 tokens (longest {longest}) and are cut to "
        f"it; {fix}",
    ]
    saved = read_config(tmp_path / "out").extra
    assert {k: saved[k] for k in ("max_length", "truncated_examples", "longest_example", "dropped_examples")} == {
        "max_length": 64, "truncated_examples": {"train": 2, "val": 1},
        "longest_example": {"train": longest, "val": longest}, "dropped_examples": {"train": 1, "val": 0}}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llm.finetune"):  # no max_length: the model's context is the limit
        run_finetune(params(**settings, max_length=None), raw, tmp_path / "pretrain", tmp_path / "out2",
                     tracker=MemoryTracker())
    assert caplog.records[0].getMessage() == (
        f"finetune: 3 of 17 train examples are longer than max_length 96 tokens (longest {longest}) and are cut to "
        f"it; max_length is the model's context_length 96: shorten them, or start from a model with a longer context")
    assert read_config(tmp_path / "out2").extra["truncated_examples"] == {"train": 3, "val": 1}


def test_bad_records_are_refused_with_index_and_field(tmp_path):
    raw = make_raw(tmp_path, [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}])
    save_model(GPT(model_config("tiny")), tmp_path / "pretrain")
    with pytest.raises(InstructionDataError, match="record 1 has no field 'output'"):
        run_finetune(params(), raw, tmp_path / "pretrain", tmp_path / "out", tracker=MemoryTracker())


def test_missing_pretrained_model_says_to_run_pretrain(tmp_path):
    raw = make_raw(tmp_path, [{"instruction": "a", "input": "", "output": "b"}])
    with pytest.raises(FileNotFoundError, match=r"run the pretrain stage first \(`dvc repro pretrain`\)"):
        run_finetune(params(), raw, tmp_path / "nothing", tmp_path / "out", tracker=MemoryTracker())

