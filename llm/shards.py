"""Token shards: Arrow IPC files of token ids, written atomically and read memory-mapped with zero copies.

A shard holds one record batch with one column, `input_ids: list<uint16>` (uint32 for vocabularies over
65,536), one row per document. A row ends with the end-of-text token exactly when its document ends
there: a document longer than what is left of a shard continues in the next shard's first row (and the
book-style validation cut leaves a document's training part without one), so a shard never holds more
than `tokens_per_shard` tokens and writing never needs a whole document in memory.

Reading: the list column's flat values buffer *is* the token stream, so `TokenStream` maps every shard
of a split and serves windows straight from the page cache. `RandomWindows` draws training batches in a
seeded, resumable order; llm/perplexity.py covers a split exactly once for evaluation.

    python -m llm.shards data/shards        # print what the manifest says and check every shard
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from llm import faults
from llm.files import atomic_path, read_json
from llm.validation import bulleted

if TYPE_CHECKING:
    import torch

COLUMN = "input_ids"


class ShardError(ValueError):
    """A shard that is missing, truncated or not what the manifest says."""


def _arrow_type(dtype: str) -> pa.DataType:
    return {"uint16": pa.uint16(), "uint32": pa.uint32()}[dtype]


@dataclass
class ShardWriter:
    """Collects document rows for one split and writes a shard whenever `tokens_per_shard` fill up."""

    folder: Path
    tokens_per_shard: int
    dtype: str = "uint16"
    shards: list[dict] = field(default_factory=list)  # {"file", "docs", "rows", "tokens"} per shard written
    _rows: list[np.ndarray] = field(default_factory=list)
    _row: list[np.ndarray] = field(default_factory=list)  # pieces of the document in progress
    _tokens: int = 0
    _docs: int = 0  # documents that end in the shard being filled

    def add(self, ids: np.ndarray, ends_document: bool) -> None:
        """Append a piece of the current document; `ends_document` closes its row."""
        while self._tokens + len(ids) >= self.tokens_per_shard:
            room = self.tokens_per_shard - self._tokens
            self._row.append(ids[:room])
            self._tokens += room
            ids = ids[room:]
            self._close_row()
            self._flush()
        if len(ids):
            self._row.append(ids)
            self._tokens += len(ids)
        if ends_document:
            self._close_row()
            self._docs += 1

    def close(self) -> list[dict]:
        self._close_row()
        if self._rows:
            self._flush()
        return self.shards

    def _close_row(self) -> None:
        if self._row:
            self._rows.append(np.concatenate(self._row) if len(self._row) > 1 else self._row[0])
            self._row = []

    def _flush(self) -> None:
        name = f"{len(self.shards):06d}.arrow"
        lengths = np.fromiter((len(r) for r in self._rows), dtype=np.int32, count=len(self._rows))
        offsets = np.zeros(len(self._rows) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = pa.array(np.concatenate(self._rows).astype(self.dtype, copy=False), type=_arrow_type(self.dtype))
        column = pa.ListArray.from_arrays(pa.array(offsets), values)
        batch = pa.record_batch([column], names=[COLUMN])
        with atomic_path(self.folder / name) as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
                writer.write_batch(batch)
            faults.pause_point("shard.write")
        self.shards.append({"file": f"{self.folder.name}/{name}", "docs": self._docs, "rows": len(self._rows),
                            "tokens": self._tokens})
        self._rows, self._tokens, self._docs = [], 0, 0


# ---------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class Shard:
    path: Path
    tokens: np.ndarray  # the flat token stream, memory-mapped
    offsets: np.ndarray  # row i is tokens[offsets[i]:offsets[i + 1]]

    def document(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1


def open_shard(path: str | Path, dtype: str | None = None) -> Shard:
    """Map a shard without copying it; a truncated or foreign file raises ShardError naming it."""
    path = Path(path)
    fix = "rebuild it with `dvc repro tokenize` (or restore it with `dvc checkout`)"
    if not path.is_file():
        raise ShardError(f"{path}: shard not found; {fix}")
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        kind = reader.schema.field(0).type if reader.schema.names == [COLUMN] else pa.null()
        if (reader.num_record_batches != 1 or not pa.types.is_list(kind)
                or kind.value_type not in (pa.uint16(), pa.uint32())):
            raise ShardError(f"{path}: not a token shard (one batch with column {COLUMN!r} of type list<uint16> "
                             f"or list<uint32>); {fix}")
        column = reader.get_batch(0).column(0)
        # Damaged offsets would serve windows from outside the file; checking them reads no tokens.
        column.validate(full=True)
        tokens = column.values.to_numpy(zero_copy_only=True)
        offsets = column.offsets.to_numpy(zero_copy_only=True)
    except (pa.ArrowException, OSError) as exc:  # any Arrow error: a damaged footer can raise ArrowNotImplementedError
        raise ShardError(f"{path}: corrupt or truncated shard ({exc}); {fix}") from None
    if dtype is not None and tokens.dtype != np.dtype(dtype):
        raise ShardError(f"{path}: holds {tokens.dtype} ids, the manifest says {dtype}; {fix}")
    return Shard(path, tokens, offsets)


MANIFEST_KEYS = ("tokenizer", "vocab_size", "dtype", "splits")  # what the readers of the shards rely on


def read_manifest(shards_dir: str | Path) -> dict:
    """The tokenize stage's manifest.json, checked for what the readers use: a damaged one raises ShardError."""
    path = Path(shards_dir) / "manifest.json"
    if not path.is_file():
        raise ShardError(f"{path} not found: run the tokenize stage first (`dvc repro tokenize`)")
    fix = f"rerun `dvc repro tokenize` (or restore it with `dvc checkout {path}`)"
    try:
        manifest = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ShardError(f"{path} is damaged: it is not valid JSON ({exc}); {fix}") from None
    problems = _manifest_problems(manifest)
    if problems:
        raise ShardError(f"{path} is not a shards manifest this code can read (damaged, or written by another "
                         f"version of the tokenize stage?); {fix}:{bulleted(problems, limit=10)}")
    return manifest


def _manifest_problems(manifest: Any) -> list[str]:
    """What is missing or of the wrong kind in a manifest, key by key."""
    if not isinstance(manifest, dict):
        return [f"must hold an object with keys {', '.join(MANIFEST_KEYS)}, got {type(manifest).__name__}"]
    problems = [f"{key}: missing" for key in MANIFEST_KEYS if key not in manifest]
    if "tokenizer" in manifest and not (isinstance(manifest["tokenizer"], str) and manifest["tokenizer"]):
        problems.append(f"tokenizer: must be a tokenizer name such as 'gpt2', got {manifest['tokenizer']!r}")
    if "vocab_size" in manifest and not _count(manifest["vocab_size"], low=1):
        problems.append(f"vocab_size: must be a positive integer, got {manifest['vocab_size']!r}")
    if "dtype" in manifest and manifest["dtype"] not in ("uint16", "uint32"):
        problems.append(f"dtype: must be 'uint16' or 'uint32', got {manifest['dtype']!r}")
    splits = manifest.get("splits", {})
    if not isinstance(splits, dict):
        return problems + [f"splits: must be an object of splits (train, val), got {type(splits).__name__}"]
    for split, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if shards is None:
            problems.append(f"splits.{split}.shards: missing")
            continue
        if not isinstance(shards, list):
            problems.append(f"splits.{split}.shards: must be a list of shards, got {shards!r}")
            continue
        for i, entry in enumerate(shards):
            where = f"splits.{split}.shards[{i}]"
            if not isinstance(entry, dict):
                problems.append(f"{where}: must be an object with file, rows and tokens, got {entry!r}")
                continue
            if not (isinstance(entry.get("file"), str) and entry["file"]):
                problems.append(f"{where}.file: must be the shard's path in the folder, got {entry.get('file')!r}")
            problems += [f"{where}.{key}: must be a whole number >= 0, got {entry.get(key)!r}"
                         for key in ("rows", "tokens") if not _count(entry.get(key), low=0)]
    return problems


def _count(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_shards_fit(shards_dir: str | Path, manifest: dict, checkpoint: str | Path, tokenizer: str,
                     vocab_size: int) -> None:
    """Refuse shards that a checkpoint's model cannot read, before any work is done with them: ids of another
    tokenizer would be measured as nonsense, and ids beyond the model's vocabulary fail deep in the embedding."""
    theirs, their_vocab = manifest["tokenizer"], manifest["vocab_size"]
    if theirs != tokenizer:
        raise ShardError(f"{shards_dir} holds tokens of tokenizer {theirs!r} (vocabulary of {their_vocab}), but "
                         f"{checkpoint} was trained with tokenizer {tokenizer!r} (vocab_size {vocab_size}); set "
                         f"tokenize.tokenizer: {tokenizer} and rerun `dvc repro tokenize`, or train the model on "
                         f"these shards (`dvc repro`)")
    if their_vocab > vocab_size:
        raise ShardError(f"{shards_dir} holds tokens of tokenizer {theirs!r}, a vocabulary of {their_vocab}, more "
                         f"than {checkpoint}'s vocab_size of {vocab_size} (tokenizer {tokenizer!r}) can read; set "
                         f"model.vocab_size to {their_vocab} or more and retrain it (`dvc repro`), or tokenize with "
                         f"the tokenizer the model was trained for (tokenize.tokenizer, then `dvc repro tokenize`)")


class TokenStream:
    """The concatenated token streams of a split's shards, addressable as one array."""

    def __init__(self, shards: list[Shard]):
        if not shards:
            raise ShardError("no shards to read")
        self.shards = shards
        self.starts = np.cumsum([0] + [len(s.tokens) for s in shards])

    @classmethod
    def from_manifest(cls, shards_dir: str | Path, split: str) -> TokenStream:
        """Open every shard of `split` and check it against the manifest (counts, dtype, id range)."""
        shards_dir = Path(shards_dir)
        manifest = read_manifest(shards_dir)
        if split not in manifest["splits"]:
            raise ShardError(f"{shards_dir}: no split {split!r}; the manifest has {', '.join(manifest['splits'])}")
        shards = []
        for entry in manifest["splits"][split]["shards"]:
            shard = open_shard(shards_dir / entry["file"], manifest["dtype"])
            if len(shard.tokens) != entry["tokens"] or len(shard) != entry["rows"]:
                raise ShardError(f"{shard.path}: holds {len(shard.tokens)} tokens in {len(shard)} rows, the "
                                 f"manifest says {entry['tokens']} in {entry['rows']}; rerun `dvc repro tokenize`")
            if len(shard.tokens) and int(shard.tokens.max()) >= manifest["vocab_size"]:
                raise ShardError(f"{shard.path}: holds ids beyond the vocabulary of {manifest['vocab_size']} "
                                 f"({manifest['tokenizer']}) that the manifest gives: the shard is damaged or of "
                                 f"another tokenizer; rerun `dvc repro tokenize`")
            shards.append(shard)
        return cls(shards)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """tokens[start:start + length], a view inside one shard, a copy across a shard boundary."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        local = start - int(self.starts[i])
        shard = self.shards[i].tokens
        if local + length <= len(shard):
            return shard[local:local + length]
        parts, need = [shard[local:]], length - (len(shard) - local)
        while need > 0:
            i += 1
            if i == len(self.shards):
                raise IndexError(f"window [{start}, {start + length}) runs past the end ({len(self)} tokens)")
            parts.append(self.shards[i].tokens[:need])
            need -= len(parts[-1])
        return np.concatenate(parts)


def to_batch(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # here, not at the top: the tokenize stage writes shards and needs no torch

    block = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
    return block[:, :-1], block[:, 1:]  # inputs and next-token targets, (B, T) each


def grid_starts(tokens: int, context_length: int, offset: int = 0) -> np.ndarray:
    """Where the windows of a split of `tokens` tokens start on the grid of stride `context_length` from
    `offset`: every whole window with its targets (context_length + 1 tokens). At offset 0 it is the book's
    DataLoader's grid (stride = max_length)."""
    return offset + context_length * np.arange((tokens - 1 - offset) // context_length)


class RandomWindows:
    """Training batches of `context_length`-token windows in a seeded random order, resumable.

    The windows lie on a grid of stride `context_length`. With `shift` (the default) each epoch moves the
    grid by a random offset, so every epoch cuts the text at new boundaries; without it the grid starts
    at the split's first token in every epoch, as the book's DataLoader cuts it (stride = max_length),
    and only the order changes. Either way each epoch shuffles its windows, and epochs run on across
    batches. Under DDP each rank takes its own rows of the same global batch, so the ranks together see
    exactly what one process would with the global batch size.
    """

    def __init__(self, stream: TokenStream, context_length: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, *, shift: bool = True):
        if len(stream) < context_length + 2:
            raise ShardError(f"the split holds {len(stream)} tokens, too few for one window of "
                             f"context_length {context_length}; use a shorter context or more text")
        self.stream, self.context_length, self.batch_size = stream, context_length, batch_size
        self.seed, self.rank, self.world_size, self.shift = seed, rank, world_size, shift
        self.epoch, self.position = 0, 0
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            offset = int(rng.integers(self.context_length)) if self.shift else 0
            starts = grid_starts(len(self.stream), self.context_length, offset)
            if not len(starts):  # the offset leaves no whole window: the grid from the first token
                starts = grid_starts(len(self.stream), self.context_length)
            self._order = rng.permutation(starts)
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets), each (batch_size, context_length) int64."""
        starts: list[int] = []
        global_batch = self.batch_size * self.world_size
        while len(starts) < global_batch:
            order = self._epoch_order()
            take = order[self.position:self.position + global_batch - len(starts)]
            starts.extend(int(s) for s in take)
            self.position += len(take)
            if self.position == len(order):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        mine = starts[self.rank::self.world_size]
        return to_batch([self.stream.window(s, self.context_length + 1) for s in mine])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed, self._order = state["epoch"], state["position"], state["seed"], None


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    shards_dir = Path(args[0] if args else "data/shards")
    manifest = read_manifest(shards_dir)
    print(f"{shards_dir}: tokenizer {manifest['tokenizer']} (vocab {manifest['vocab_size']}), {manifest['dtype']}")
    for split, info in manifest["splits"].items():
        stream = TokenStream.from_manifest(shards_dir, split)
        print(f"  {split}: {info['docs']:,} docs, {len(stream):,} tokens in {len(info['shards'])} shard(s): ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
