"""Instruction data for fine-tuning (the book's chapter 7): records, their split, prompts, token batches.

    records = load_records("data/raw/instructions/instruction-data.json")
    split = split_records(records)                  # the book's 85% train, 10% test, 5% val
    write_split("data/finetune/split.json", split)  # evaluate reads the same test records back
    train = encode_records(split.train, "alpaca")
    batches = InstructionBatches(train, batch_size=8, seed=123, pad_id=50256, max_length=1024)
    val = validation_batches(encode_records(split.val, "alpaca"), 8, pad_id=50256, max_length=1024)

A record is `{"instruction", "input", "output"}` (the book's instruction-data.json, Alpaca-52k and its
kin), in a JSON list or in JSON Lines. The model learns `training_text(record)`: the prompt, which is
everything it is given at inference up to and including the response header, then the output, then one
end-of-text token so that it learns to stop.

Batches are the book's `custom_collate_fn`: padded to the longest example with the pad token (GPT-2's
end-of-text, 50256), targets shifted by one, padding targets ignored (IGNORE_INDEX) but the end-of-text
after the response kept; optionally the prompt's targets are ignored too (the book's exercise 7.2), and
rows are cut at `max_length` (`count_truncated` counts them). `InstructionBatches` serves them for
llm.train.Trainer in epochs of a seeded shuffle, resumably, each DDP rank taking its slice of every global
batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import torch

from llm.config import PromptStyle
from llm.files import read_json, write_json_atomic
from llm.model import IGNORE_INDEX
from llm.sampler import EpochBatches
from llm.tokenizer import get_tokenizer

Batch = tuple[torch.Tensor, torch.Tensor]
FIELDS = ("instruction", "input", "output")


class InstructionDataError(ValueError):
    """Instruction data that cannot be read; the message names the file, the record and the field."""


# ---------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str  # "" when the instruction needs no input
    output: str


def load_records(path: str | Path, kind: Literal["json", "jsonl"] | None = None) -> list[Record]:
    """The records of a JSON list or a JSON Lines file (`kind` None: `.jsonl` files are JSON Lines).

    Fields besides the three are ignored. Records are numbered from 0 in errors, as in `data[17]`.
    """
    path = Path(path)
    kind = kind or ("jsonl" if path.suffix == ".jsonl" else "json")
    records = [_record(value, f"{path}: {where}") for where, value in json_values(path, kind)]
    if not records:
        raise InstructionDataError(f"{path}: holds no records")
    return records


def json_values(path: Path, kind: str) -> Iterator[tuple[str, Any]]:
    """(where, parsed value) for each record of a JSON list or JSON Lines file, `where` as errors name
    it ("record 17", "record 17 (line 18)")."""
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a byte order mark is no part of the JSON
    except FileNotFoundError:
        raise InstructionDataError(f"{path}: not found; run the download stage first "
                                   "(`dvc repro download`)") from None
    except UnicodeDecodeError as exc:
        raise InstructionDataError(f"{path}: byte {exc.start} is not valid UTF-8 ({exc.reason})") from None
    if kind == "jsonl":
        # Split on "\n" only: str.splitlines would also cut at U+2028, which JSON strings may hold.
        numbered = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
        for index, (number, line) in enumerate(numbered):
            try:
                yield f"record {index} (line {number})", json.loads(line)
            except json.JSONDecodeError as exc:
                raise InstructionDataError(f"{path}: line {number} is not valid JSON: {exc.msg}") from None
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (one record per line? name the file .jsonl)" if exc.msg == "Extra data" else ""
        raise InstructionDataError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: "
                                   f"{exc.msg}{hint}") from None
    if not isinstance(data, list):
        raise InstructionDataError(f"{path}: must hold a list of records, got {_kind(data)} "
                                   "(for one record per line, name the file .jsonl)")
    for index, value in enumerate(data):
        yield f"record {index}", value


def string_fields(value: Any, where: str, fields: Sequence[str],
                  error: type[InstructionDataError] = InstructionDataError) -> list[str]:
    """The string `fields` of a parsed JSON record, in order; `error` naming `where` and what is wrong."""
    if not isinstance(value, dict):
        raise error(f"{where} is {_kind(value)}, not an object with fields {', '.join(map(repr, fields))}")
    for name in fields:
        if name not in value:
            raise error(f"{where} has no field {name!r}")
        if not isinstance(value[name], str):
            raise error(f"{where} has a non-string field {name!r} ({_kind(value[name])})")
    return [value[name] for name in fields]


def _record(value: Any, where: str) -> Record:
    return Record(*string_fields(value, where, FIELDS))


def _kind(value: Any) -> str:
    """What a JSON value is, in words."""
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
             bool: "a boolean", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------
# The split


SPLITS = ("train", "val", "test")


R = TypeVar("R")


@dataclass(frozen=True)
class Split(Generic[R]):
    train: list[R]
    val: list[R]
    test: list[R]


def split_records(records: Sequence[R], *, train: float = 0.85, test: float = 0.10,
                  seed: int | None = None) -> Split[R]:
    """Train, test and val (the rest) records, sized as the book does: int(n * train), int(n * test).

    With `seed` None the records keep the file's order: train is the first 85%, test the next 10% and
    val the last 5%, exactly the book's split of its instruction-data.json, so that the test records are
    the book's and results compare with its published responses. A file in some order (by topic, by
    source) needs a `seed`: records are then ordered by a hash of (seed, index), the same order for the
    same seed on every machine and library version, unlike a random generator's stream.
    """
    n = len(records)
    if not (0 < train < 1 and 0 < test < 1 and train + test < 1):
        raise ValueError(f"train and test fractions must be in (0, 1) and leave some records for val, got "
                         f"train {train}, test {test}")
    n_train, n_test = int(n * train), int(n * test)
    if min(n_train, n_test, n - n_train - n_test) == 0:
        raise ValueError(f"{n} records split at train {train}, test {test} leave a split empty "
                         f"(train {n_train}, test {n_test}, val {n - n_train - n_test}); use more records")
    order = list(range(n)) if seed is None else sorted(range(n), key=lambda i: _hash(seed, i))
    ordered = [records[i] for i in order]
    return Split(train=ordered[:n_train], val=ordered[n_train + n_test:],
                 test=ordered[n_train:n_train + n_test])


def _hash(seed: int, index: int) -> bytes:
    return hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()


def write_split(path: str | Path, split: Split[Any]) -> None:
    """Write the split (of Records, or of any dataclass) as JSON {"train": [...], "val": [...], "test": [...]},
    atomically."""
    write_json_atomic(path, {name: [dataclasses.asdict(r) for r in getattr(split, name)] for name in SPLITS})


def read_split(path: str | Path, parse: Callable[[Any, str], R] | None = None, stage: str = "finetune") -> Split[R]:
    """The split that `write_split` wrote, checked record by record: Records, or what `parse(value, where)`
    makes of each value (a stage's own record type; `stage` is the stage that writes the file)."""
    parse = parse or _record  # type: ignore[assignment]
    path = Path(path)
    if not path.is_file():
        raise InstructionDataError(f"{path}: not found; run the {stage} stage first (`dvc repro {stage}`)")
    try:
        data = read_json(path)
    except json.JSONDecodeError as exc:
        raise InstructionDataError(f"{path}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(name), list) for name in SPLITS):
        raise InstructionDataError(f"{path}: must hold an object with lists 'train', 'val' and 'test'")
    return Split(**{name: [parse(value, f"{path}: {name} record {i}") for i, value in enumerate(data[name])]
                    for name in SPLITS})


# ---------------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class PromptTemplate:
    system: str | None  # the preamble before the first instruction (None: none); a chat's system message replaces it
    system_head: str  # around the preamble: before it ...
    system_tail: str  # ... and after it
    instruction: str  # before each instruction
    input: str  # between the instruction and the input, when there is an input
    response: str  # the response header, after which the model writes
    turn_end: str  # in a conversation: after an earlier turn's answer, before the next instruction

    def turn(self, record: Record) -> str:
        """One instruction with its input (if not empty), up to and including the response header."""
        text = self.instruction + record.instruction
        if record.input:
            text += self.input + record.input
        return text + self.response

    @property
    def stops(self) -> tuple[str, ...]:
        """Where an answer ends that the model runs on past: the format's next instruction, input or
        response header (an untrained or rambling model writes the user's next turn itself)."""
        marks = (self.turn_end + self.instruction, self.input, self.response)
        return tuple(mark.rstrip("\n") for mark in marks if mark.strip())


TEMPLATES: dict[str, PromptTemplate] = {
    # The book's format_input (ch07/01_main-chapter-code/gpt_instruction_finetuning.py) and the
    # "\n\n### Response:\n" its InstructionDataset puts before the output. Its first sentence is the
    # preamble, which a conversation's system message replaces; earlier turns are separated as its
    # sections are, by a blank line.
    "alpaca": PromptTemplate(
        system="Below is an instruction that describes a task. Write a response that appropriately completes "
               "the request.",
        system_head="", system_tail="\n\n",
        instruction="### Instruction:\n", input="\n\n### Input:\n", response="\n\n### Response:\n", turn_end="\n\n"),
    # Exercise 7.1's Phi-3 template: format_input_phi and InstructionDatasetPhi in the book's
    # ch07/01_main-chapter-code/exercise_experiments.py. Its markers are plain text to GPT-2's tokenizer.
    # It has no preamble; a system message goes in Phi-3's own <|system|> block, which the book leaves out.
    "phi3": PromptTemplate(system=None, system_head="<|system|>\n", system_tail="\n", instruction="<|user|>\n",
                           input="\n", response="\n<|assistant|>:\n", turn_end="\n"),
}


def template(style: PromptStyle) -> PromptTemplate:
    """The template of `style`; a ValueError naming the known styles for another."""
    if style not in TEMPLATES:
        raise ValueError(f"unknown prompt style {style!r}; known styles: {', '.join(TEMPLATES)}")
    return TEMPLATES[style]


def prompt_text(record: Record, style: PromptStyle = "alpaca", *, system: str | None = None,
                history: Sequence[Record] = ()) -> str:
    """What the model is given: the instruction, the input if not empty, and the response header.

    A conversation (the served chat model, llm/pyfunc_chat.py) also has `history`, its earlier turns as
    records whose output is the answer given: each is written as `training_text` writes a record, without
    the preamble, which comes once, and ended by the template's `turn_end` (text, not the end-of-text token
    the model learnt after an answer: prompts are encoded as plain text). It may also have a `system`
    message, which replaces the template's preamble ("": none). With neither, this is the prompt the model
    was fine-tuned on.
    """
    form = template(style)
    preamble = form.system if system is None else system
    text = form.system_head + preamble + form.system_tail if preamble else ""
    for turn in history:
        text += form.turn(turn) + turn.output + form.turn_end
    return text + form.turn(record)


def training_text(record: Record, style: PromptStyle = "alpaca") -> str:
    """The prompt followed by the output: the text the model learns."""
    return prompt_text(record, style) + record.output


# ---------------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class Example:
    """One record's tokens: the prompt's `prompt_len` ids, then the output's, then end-of-text if asked."""

    ids: tuple[int, ...]
    prompt_len: int

    def __post_init__(self):
        if len(self.ids) < 2 or not 1 <= self.prompt_len <= len(self.ids):
            raise ValueError(f"an example needs at least 2 ids and 1 <= prompt_len <= len(ids), got "
                             f"{len(self.ids)} ids and prompt_len {self.prompt_len}")


def encode_records(records: Sequence[Record], style: PromptStyle = "alpaca", tokenizer: str = "gpt2",
                   *, eot: bool = True) -> list[Example]:
    """Each record's prompt and output tokens, and the end-of-text token after them when `eot`.

    Prompt and output are encoded apart and joined, so an example starts with exactly the tokens that
    generation is later prompted with; for the book's 1,100 records that equals the book's encoding of
    the whole text. `encode_ordinary` reads "<|endoftext|>" inside a record as plain text: data cannot
    inject the special token (the book's `encode` would raise on it).
    """
    enc = get_tokenizer(tokenizer)
    prompts = enc.encode_ordinary_batch([prompt_text(r, style) for r in records])
    outputs = enc.encode_ordinary_batch([r.output for r in records])
    end = (enc.eot_token,) if eot else ()
    return [Example((*prompt, *output, *end), len(prompt)) for prompt, output in zip(prompts, outputs)]


# ---------------------------------------------------------------------------------------------------
# Batches


def collate(examples: Sequence[Example], pad_id: int, *, mask_prompt: bool = False,
            max_length: int | None = None) -> Batch:
    """Inputs and next-token targets (B, T), T the longest example's length - 1, at most `max_length`.

    Inputs are padded with `pad_id`; targets past an example's last id are IGNORE_INDEX, and so are the
    prompt's with `mask_prompt` (only the response and its end-of-text are learned). The book appends
    the end-of-text in its collate; here `encode_records` does, which gives the same batches.
    """
    width = max(len(e.ids) for e in examples) - 1
    if max_length is not None:
        width = min(width, max_length)
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.ids[:width + 1], dtype=torch.long)
        inputs[row, :len(ids) - 1] = ids[:-1]
        targets[row, :len(ids) - 1] = ids[1:]
        if mask_prompt:
            targets[row, :example.prompt_len - 1] = IGNORE_INDEX  # the targets that are prompt tokens
    return inputs, targets


def count_truncated(examples: Sequence[Example], max_length: int | None) -> tuple[int, int]:
    """How many examples `collate` cuts at `max_length`, and the longest example's length.

    Lengths are the positions an example fills, len(ids) - 1 (its last id is only a target), as `collate`
    measures them: an example is cut when that exceeds max_length, and the longest length is the
    max_length that would cut none.
    """
    longest = max((len(e.ids) - 1 for e in examples), default=0)
    if max_length is None:
        return 0, longest
    return sum(len(e.ids) - 1 > max_length for e in examples), longest


def learnable(examples: Sequence[Example], *, mask_prompt: bool, max_length: int | None) -> list[Example]:
    """The examples with at least one target: with `mask_prompt`, a prompt that fills `max_length`
    leaves none, and a batch of such examples would have a loss of 0 / 0."""
    return [e for e in examples if _targets(e, mask_prompt, max_length) > 0]


def _targets(example: Example, mask_prompt: bool, max_length: int | None) -> int:
    end = len(example.ids) - 1 if max_length is None else min(len(example.ids) - 1, max_length)
    return end - (example.prompt_len - 1 if mask_prompt else 0)


def _check_learnable(examples: Sequence[Example], mask_prompt: bool, max_length: int | None) -> None:
    dropped = len(examples) - len(learnable(examples, mask_prompt=mask_prompt, max_length=max_length))
    if dropped:
        raise ValueError(f"{dropped} of {len(examples)} examples have nothing to learn: their prompt fills "
                         f"max_length {max_length} and mask_prompt ignores the prompt's targets; drop them "
                         f"with llm.instructions.learnable(), or raise max_length")


class InstructionBatches(EpochBatches[Example]):
    """Training batches of instruction examples (`collate`d) in epochs of a seeded shuffle, resumable: see
    llm.sampler.EpochBatches."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, pad_id: int, *,
                 mask_prompt: bool = False, max_length: int | None = None,
                 global_batch_size: int | None = None, rank: int = 0, world_size: int = 1):
        _check_learnable(examples, mask_prompt, max_length)
        batch = functools.partial(collate, pad_id=pad_id, mask_prompt=mask_prompt, max_length=max_length)
        super().__init__(examples, batch, batch_size, seed, global_batch_size=global_batch_size, rank=rank,
                         world_size=world_size)


def validation_batches(examples: Sequence[Example], batch_size: int, pad_id: int, *,
                       mask_prompt: bool = False, max_length: int | None = None) -> list[Batch]:
    """Every example once, in order, `batch_size` to a batch (the last may be smaller): the same batches
    at every evaluation. Slice the list to evaluate on fewer."""
    if not examples:
        raise ValueError("no validation examples: the val split is empty")
    _check_learnable(examples, mask_prompt, max_length)
    return [collate(examples[i:i + batch_size], pad_id, mask_prompt=mask_prompt, max_length=max_length)
            for i in range(0, len(examples), batch_size)]
