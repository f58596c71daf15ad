"""Instruction data: records, the split, the book's prompts, its batches, and resumable epochs of them."""

from __future__ import annotations

import json

import pytest
import torch

from llm.config import TrainConfig

from llm.validation import from_mapping
from llm.instructions import (Example, InstructionBatches, InstructionDataError, Record, collate, count_truncated,
                              encode_records, learnable, load_records, prompt_text, read_split, split_records,
                              training_text, validation_batches, write_split)
from llm.model import GPT, IGNORE_INDEX, model_config
from llm.sampler import steps_per_epoch
from llm.tokenizer import get_tokenizer
from llm.tracking import MemoryTracker
from llm.train import Trainer
from tests.conftest import shared_file
from tests.data import copy_examples, one_thread

X = IGNORE_INDEX
WITH_INPUT = Record("Rewrite the sentence.", "The cat sat.", "The feline sat.")
NO_INPUT = Record("Name a color.", "", "Blue.")
ALPACA_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.\n\n### Instruction:\n")


# --- prompts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("record, style, prompt", [
    (WITH_INPUT, "alpaca",
     ALPACA_HEAD + "Rewrite the sentence.\n\n### Input:\nThe cat sat.\n\n### Response:\n"),
    (NO_INPUT, "alpaca", ALPACA_HEAD + "Name a color.\n\n### Response:\n"),
    (WITH_INPUT, "phi3", "<|user|>\nRewrite the sentence.\nThe cat sat.\n<|assistant|>:\n"),
    (NO_INPUT, "phi3", "<|user|>\nName a color.\n<|assistant|>:\n"),
])
def test_prompts_are_the_books(record, style, prompt):
    assert prompt_text(record, style) == prompt
    assert training_text(record, style) == prompt + record.output


def test_an_unknown_prompt_style_is_refused():
    with pytest.raises(ValueError, match=r"^unknown prompt style 'chatml'; known styles: alpaca, phi3$"):
        prompt_text(NO_INPUT, "chatml")


def test_a_conversation_is_its_turns_after_one_preamble_which_a_system_message_replaces():
    history = [Record("Name a color.", "", "Blue.")]
    last = Record("Name another.", "", "")
    turns = ("### Instruction:\nName a color.\n\n### Response:\nBlue.\n\n"
             "### Instruction:\nName another.\n\n### Response:\n")
    assert prompt_text(last, "alpaca", history=history) == ALPACA_HEAD.removesuffix("### Instruction:\n") + turns
    assert prompt_text(last, "alpaca", system="Answer in French.", history=history) == "Answer in French.\n\n" + turns
    assert prompt_text(NO_INPUT, "alpaca", system="") == "### Instruction:\nName a color.\n\n### Response:\n"
    assert prompt_text(last, "phi3", system="Be brief.", history=history) == (
        "<|system|>\nBe brief.\n<|user|>\nName a color.\n<|assistant|>:\nBlue.\n"
        "<|user|>\nName another.\n<|assistant|>:\n")


def test_an_answer_ends_where_the_format_goes_on():
    from llm.instructions import TEMPLATES

    assert TEMPLATES["alpaca"].stops == ("\n\n### Instruction:", "\n\n### Input:", "\n\n### Response:")
    assert TEMPLATES["phi3"].stops == ("\n<|user|>", "\n<|assistant|>:")  # its input separator is a bare newline


def test_examples_hold_the_prompt_then_the_output_then_end_of_text():
    enc = get_tokenizer("gpt2")
    tricky = Record("Say it.", "", "a <|endoftext|> b")  # plain text, not the special token
    examples = encode_records([WITH_INPUT, tricky], "alpaca")
    for record, example in zip([WITH_INPUT, tricky], examples):
        assert example.ids == (*enc.encode_ordinary(training_text(record)), enc.eot_token)
        assert example.prompt_len == len(enc.encode_ordinary(prompt_text(record)))
    assert examples[1].ids.count(enc.eot_token) == 1
    plain = encode_records([WITH_INPUT], "phi3", eot=False)[0]
    assert plain.ids == tuple(enc.encode_ordinary(training_text(WITH_INPUT, "phi3")))


# --- records ---------------------------------------------------------------------------------------

GOOD = {"instruction": "Add.", "input": "1 + 1", "output": "2", "source": "ignored"}


def test_json_and_json_lines_load_the_same_records(tmp_path):
    bom = b"\xef\xbb\xbf"  # as some editors save UTF-8
    (tmp_path / "a.json").write_bytes(bom + json.dumps([GOOD, {**GOOD, "input": ""}]).encode())
    (tmp_path / "a.jsonl").write_text(f"{json.dumps(GOOD)}\n\n{json.dumps({**GOOD, 'input': ''})}\n")
    expected = [Record("Add.", "1 + 1", "2"), Record("Add.", "", "2")]
    assert load_records(tmp_path / "a.json") == expected
    assert load_records(tmp_path / "a.jsonl") == expected
    assert load_records(shared_file("instruction-data.json"))[2] == Record(
        "Convert 45 kilometers to meters.", "", "45 kilometers is 45000 meters.")


@pytest.mark.parametrize("name, text, problem", [
    ("d.json", json.dumps([GOOD, {"instruction": "a", "input": ""}]), "record 1 has no field 'output'"),
    ("d.json", json.dumps([GOOD, GOOD, {**GOOD, "input": 5}]),
     "record 2 has a non-string field 'input' (an integer)"),
    ("d.json", json.dumps([GOOD, {**GOOD, "output": None}]),
     "record 1 has a non-string field 'output' (null)"),
    ("d.json", json.dumps(["text"]),
     "record 0 is a string, not an object with fields 'instruction', 'input', 'output'"),
    ("d.json", '[{"instruction": "a",\n  "input": }]', "not valid JSON at line 2 column 12: Expecting value"),
    ("d.json", json.dumps(GOOD), "must hold a list of records, got an object (for one record per line, "
                                 "name the file .jsonl)"),
    ("d.json", "[]", "holds no records"),
    ("d.json", f"{json.dumps(GOOD)}\n{json.dumps(GOOD)}\n",
     "not valid JSON at line 2 column 1: Extra data (one record per line? name the file .jsonl)"),
    ("d.jsonl", f"{json.dumps(GOOD)}\n{{oops\n", "line 2 is not valid JSON: Expecting property name enclosed "
                                                 "in double quotes"),
    ("d.jsonl", f"{json.dumps(GOOD)}\n\n{json.dumps({'instruction': 'a', 'output': 'b'})}\n",
     "record 1 (line 3) has no field 'input'"),
])
def test_bad_records_are_refused_by_file_record_and_field(tmp_path, name, text, problem):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InstructionDataError) as caught:
        load_records(path)
    assert str(caught.value) == f"{path}: {problem}"


# --- the split -------------------------------------------------------------------------------------


def numbered(n: int) -> list[Record]:
    return [Record(f"instruction {i}", "", f"output {i}") for i in range(n)]


def test_the_default_split_is_the_books():
    records = load_records(shared_file("instruction-data.json"))
    split = split_records(records)
    assert (len(split.train), len(split.val), len(split.test)) == (935, 55, 110)
    # The book: train the first 85%, test the next 10%, val the rest.
    assert split.train == records[:935] and split.test == records[935:1045] and split.val == records[1045:]


def test_a_seeded_split_is_deterministic_disjoint_and_complete():
    records = numbered(1100)
    split = split_records(records, seed=7)
    assert split == split_records(records, seed=7)
    assert split != split_records(records, seed=8)
    assert (len(split.train), len(split.val), len(split.test)) == (935, 55, 110)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert set().union(*parts) == set(records) and sum(map(len, parts)) == len(records)
    assert split.train != records[:935]  # shuffled


def test_the_split_file_round_trips(tmp_path):
    split = split_records(numbered(40), seed=1)
    write_split(tmp_path / "split.json", split)
    assert read_split(tmp_path / "split.json") == split
    saved = json.loads((tmp_path / "split.json").read_text())
    assert list(saved) == ["train", "val", "test"]
    first = split.test[0]
    assert saved["test"][0] == {"instruction": first.instruction, "input": "", "output": first.output}


def test_a_split_with_an_empty_part_is_refused():
    with pytest.raises(ValueError, match=r"^train and test fractions must be in \(0, 1\) and leave some "
                                         r"records for val, got train 0.9, test 0.1$"):
        split_records(numbered(100), train=0.9, test=0.1)
    with pytest.raises(ValueError, match=r"^9 records split at train 0.85, test 0.1 leave a split empty "
                                         r"\(train 7, test 0, val 2\); use more records$"):
        split_records(numbered(9))


# --- batches ---------------------------------------------------------------------------------------

PAD = 99
HAND_MADE = [
    Example((10, 11, 12, 13, PAD), prompt_len=2),  # prompt 10 11, response 12 13, end-of-text
    Example((20, 21, 22, PAD), prompt_len=2),
    Example((30, 31, 32, 33, 34, 35, PAD), prompt_len=4),
]


def test_a_batch_is_the_books_collate():
    inputs, targets = collate(HAND_MADE, PAD)
    assert inputs.tolist() == [[10, 11, 12, 13, PAD, PAD],
                               [20, 21, 22, PAD, PAD, PAD],
                               [30, 31, 32, 33, 34, 35]]
    # The end-of-text after each response is a target; the padding after it is not.
    assert targets.tolist() == [[11, 12, 13, PAD, X, X],
                                [21, 22, PAD, X, X, X],
                                [31, 32, 33, 34, 35, PAD]]
    assert inputs.dtype == targets.dtype == torch.int64


def test_prompt_masking_leaves_the_response_and_end_of_text():
    _, targets = collate(HAND_MADE, PAD, mask_prompt=True)
    assert targets.tolist() == [[X, 12, 13, PAD, X, X],
                                [X, 22, PAD, X, X, X],
                                [X, X, X, 34, 35, PAD]]


def test_max_length_cuts_every_row():
    inputs, targets = collate(HAND_MADE, PAD, max_length=4)
    assert inputs.tolist() == [[10, 11, 12, 13], [20, 21, 22, PAD], [30, 31, 32, 33]]
    assert targets.tolist() == [[11, 12, 13, PAD], [21, 22, PAD, X], [31, 32, 33, 34]]
    _, masked = collate(HAND_MADE, PAD, mask_prompt=True, max_length=4)
    assert masked.tolist() == [[X, 12, 13, PAD], [X, 22, PAD, X], [X, X, X, 34]]


def test_truncated_examples_are_counted_as_collate_cuts_them():
    assert count_truncated(HAND_MADE, 4) == (1, 6)  # 5, 4 and 7 ids fill 4, 3 and 6 positions
    assert count_truncated(HAND_MADE, 3) == (2, 6)
    assert count_truncated(HAND_MADE, 6) == count_truncated(HAND_MADE, None) == (0, 6)
    for max_length in range(1, 8):  # the same off-by-one as collate: an example is cut when it loses an id
        cut = sum(collate([e], PAD, max_length=max_length)[0].numel() < collate([e], PAD)[0].numel()
                  for e in HAND_MADE)
        assert count_truncated(HAND_MADE, max_length)[0] == cut


def test_examples_with_nothing_to_learn_are_refused_and_can_be_dropped():
    long_prompt = Example((1, 2, 3, 4, 5, 6, PAD), prompt_len=5)
    examples = [*HAND_MADE, long_prompt]
    assert learnable(examples, mask_prompt=True, max_length=4) == HAND_MADE
    assert learnable(examples, mask_prompt=False, max_length=4) == examples
    message = (r"^1 of 4 examples have nothing to learn: their prompt fills max_length 4 and mask_prompt "
               r"ignores the prompt's targets; drop them with llm.instructions.learnable\(\), or raise "
               r"max_length$")
    with pytest.raises(ValueError, match=message):
        InstructionBatches(examples, 2, seed=0, pad_id=PAD, mask_prompt=True, max_length=4)
    with pytest.raises(ValueError, match=message):
        validation_batches(examples, 2, PAD, mask_prompt=True, max_length=4)


def indexed(n: int) -> list[Example]:
    """Examples whose one input is their index, so a batch's inputs say which examples it holds."""
    return [Example((i, 100 + i), prompt_len=1) for i in range(n)]


def drawn(batches: InstructionBatches, count: int) -> list[list[int]]:
    return [batches.next_batch()[0][:, 0].tolist() for _ in range(count)]


def test_epochs_are_reshuffled_and_drop_the_incomplete_global_batch():
    batches = InstructionBatches(indexed(10), batch_size=2, seed=3, pad_id=PAD, global_batch_size=4)
    assert steps_per_epoch(10, 4) == 2  # two optimizer steps of 4 examples; 2 examples left out
    epochs = [sum(drawn(batches, 4), []) for _ in range(3)]  # 4 batches of 2 per epoch
    for epoch in epochs:
        assert len(set(epoch)) == 8 and set(epoch) <= set(range(10))
    assert epochs[0] != epochs[1] != epochs[2]
    again = InstructionBatches(indexed(10), batch_size=2, seed=3, pad_id=PAD, global_batch_size=4)
    assert sum(drawn(again, 12), []) == sum(epochs, [])
    other = InstructionBatches(indexed(10), batch_size=2, seed=4, pad_id=PAD, global_batch_size=4)
    assert sum(drawn(other, 4), []) != epochs[0]


def test_resuming_gives_the_batches_of_an_uninterrupted_run():
    def source():
        return InstructionBatches(HAND_MADE * 3, batch_size=2, seed=5, pad_id=PAD, mask_prompt=True)

    straight = source()
    expected = [straight.next_batch() for _ in range(9)]  # 4 batches per epoch: crosses two epochs
    first = source()
    got = [first.next_batch() for _ in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # as the trainer's checkpoint stores it
    resumed = source()
    resumed.load_state_dict(state)
    got += [resumed.next_batch() for _ in range(4)]
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_ranks_take_their_rows_of_each_global_batch():
    single = InstructionBatches(indexed(12), batch_size=4, seed=1, pad_id=PAD)
    ranks = [InstructionBatches(indexed(12), batch_size=2, seed=1, pad_id=PAD, rank=r, world_size=2)
             for r in range(2)]
    for _ in range(4):  # past the end of the first epoch (3 global batches)
        rows = single.next_batch()[0][:, 0].tolist()
        assert [r.next_batch()[0][:, 0].tolist() for r in ranks] == [rows[0::2], rows[1::2]]


def test_batch_sizes_are_checked():
    with pytest.raises(ValueError, match=r"^global_batch_size 6 must be a multiple of batch_size 2 x 2 "
                                         r"processes$"):
        InstructionBatches(indexed(12), batch_size=2, seed=1, pad_id=PAD, global_batch_size=6, world_size=2)
    with pytest.raises(ValueError, match=r"^3 training examples are fewer than one global batch of 4; lower "
                                         r"global_batch_size or use more records$"):
        InstructionBatches(indexed(3), batch_size=4, seed=1, pad_id=PAD)


def test_validation_batches_cover_every_example_in_order():
    batches = validation_batches(indexed(5), 2, PAD)
    assert [x[:, 0].tolist() for x, _ in batches] == [[0, 1], [2, 3], [4]]
    assert [y[:, 0].tolist() for _, y in batches] == [[100, 101], [102, 103], [104]]


# --- training --------------------------------------------------------------------------------------


def test_loss_falls_when_the_trainer_learns_instructions(tmp_path):
    torch.manual_seed(0)
    model = GPT(model_config("tiny", vocab_size=512, context_length=64))
    config = from_mapping(TrainConfig, {
        "batch_size": 8, "global_batch_size": 8, "max_steps": 30, "lr": 3e-3, "warmup_steps": 3,
        "log_interval": 10, "eval_interval": 10, "sample_interval": 0, "checkpoint_interval": 30,
        "precision": "fp32", "device": "cpu"})
    train = InstructionBatches(copy_examples(64), config.batch_size, config.seed, pad_id=511,
                               mask_prompt=True, max_length=64)
    val = validation_batches(copy_examples(16, seed=1), 8, pad_id=511, mask_prompt=True, max_length=64)
    tracker = MemoryTracker()
    with one_thread():
        Trainer(model, train, val, config, tmp_path, settings={"test": 1}, tracker=tracker).fit()
    losses = tracker.series("val_loss")
    assert [step for step, _ in losses] == [0, 10, 20, 30]
    assert losses[0][1] > 5.5 and losses[-1][1] < losses[0][1] - 2  # from about ln(512) = 6.2


def test_every_prompt_style_the_settings_accept_has_a_template():
    import typing

    from llm.instructions import TEMPLATES, PromptStyle

    assert set(typing.get_args(PromptStyle)) == set(TEMPLATES)
