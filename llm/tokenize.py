"""The tokenize stage: corpus files -> GPT-2 token ids -> Arrow shards for train and val.

    python -m flows.tokenize            (what `dvc repro tokenize` runs)

Each corpus source is read as a stream of document pieces (`llm.documents`), encoded as ordinary text
(a literal `<|endoftext|>` in a corpus is text, not the special token) on a pool of threads (tiktoken
releases the GIL, so every core encodes), and appended in order to the shard writers, each document
closed with the end-of-text token. Memory stays flat: at most a few pieces are in flight and one shard
is buffered per split.

The split is deterministic: a source of many documents sends each to val by a seeded coin flip; a text
source that is one document holds out its last `val_fraction` of characters, as the book does, so val is
never empty. Everything is written into a temporary folder that replaces `data/shards` only when whole.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from llm import faults
from llm.config import TokenizeConfig
from llm.documents import CorpusError, Piece, in_validation, read_records, read_text
from llm.download import read_sources_manifest
from llm.files import atomic_dir, write_json_atomic
from llm.shards import ShardWriter
from llm.tokenizer import get_tokenizer, token_dtype

SPLITS = ("train", "val")


@dataclass(frozen=True)
class TokenizeResult:
    manifest: dict
    seconds: float

    @property
    def metrics(self) -> dict:
        splits = self.manifest["splits"]
        tokens = sum(s["tokens"] for s in splits.values())
        return {
            "docs": sum(s["docs"] for s in self.manifest["sources"]),
            "tokens": tokens,
            "train_tokens": splits["train"]["tokens"],
            "val_tokens": splits["val"]["tokens"],
            "tokens_per_s": round(tokens / max(self.seconds, 1e-9)),
        }


def source_pieces(path: Path, entry: dict, config: TokenizeConfig) -> Iterator[tuple[str, Piece]]:
    """(split, piece) for every piece of one corpus source, in order."""
    name, kind = entry["name"], entry["kind"]
    if kind == "text" and config.doc_separator is None:
        for piece in read_text(path, val_fraction=config.val_fraction, errors=config.encoding_errors):
            yield ("val" if piece.after_cut else "train"), piece
        return
    if kind == "text":
        pieces = read_text(path, separator=config.doc_separator, errors=config.encoding_errors)
    else:
        pieces = read_records(path, kind, entry["text_field"], errors=config.encoding_errors)
    for piece in pieces:
        yield ("val" if in_validation(config.seed, name, piece.doc, config.val_fraction) else "train"), piece


def _bounded_map(pool: ThreadPoolExecutor, fn, items, in_flight: int) -> Iterator[tuple[object, object]]:
    """(item, fn(item)) in order, with at most `in_flight` calls pending: memory stays flat."""
    pending: collections.deque[tuple[object, Future]] = collections.deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= in_flight:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def tokenize_corpus(raw_dir: str | Path, shards_dir: str | Path, config: TokenizeConfig) -> TokenizeResult:
    """Tokenize every corpus source under `raw_dir` into shards under `shards_dir` (replaced whole)."""
    raw_dir, shards_dir = Path(raw_dir), Path(shards_dir)
    entries = read_sources_manifest(raw_dir, "corpus")
    paths = [raw_dir / entry["file"] for entry in entries]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the download stage first (`dvc repro download`)")
    enc = get_tokenizer(config.tokenizer)
    dtype = token_dtype(enc.n_vocab)
    threads = config.num_threads or os.cpu_count() or 1

    def encode(item: tuple[str, Piece]) -> np.ndarray:
        return np.array(enc.encode_ordinary(item[1].text), dtype=dtype)

    started = time.perf_counter()
    sources = []
    with atomic_dir(shards_dir) as tmp, ThreadPoolExecutor(threads, thread_name_prefix="encode") as pool:
        writers = {split: ShardWriter(tmp / split, config.tokens_per_shard, dtype) for split in SPLITS}
        for split in SPLITS:
            (tmp / split).mkdir()
        total_bytes = sum(p.stat().st_size for p in paths)
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=None) as bar:
            for entry, path in zip(entries, paths):
                docs = tokens = 0
                pieces = source_pieces(path, entry, config)
                for (split, piece), ids in _bounded_map(pool, encode, pieces, in_flight=2 * threads):
                    if piece.last:
                        ids = np.append(ids, np.array(enc.eot_token, dtype=dtype))
                        docs += 1
                    writers[split].add(ids, ends_document=piece.last)
                    tokens += len(ids)
                    bar.update(len(piece.text))  # characters, close enough to bytes for a progress bar
                sources.append({"name": entry["name"], "sha256": entry["sha256"], "docs": docs, "tokens": tokens})
        splits = {}
        for split, writer in writers.items():
            shards = writer.close()
            splits[split] = {"docs": sum(s["docs"] for s in shards), "tokens": sum(s["tokens"] for s in shards),
                             "shards": shards}
        _check_not_empty(splits, entries, config)
        manifest = {
            "tokenizer": config.tokenizer,
            "vocab_size": enc.n_vocab,
            "eot_token": enc.eot_token,
            "dtype": dtype,
            "format": "arrow-ipc",
            "column": "input_ids",
            "val_fraction": config.val_fraction,
            "seed": config.seed,
            "sources": sources,
            "splits": splits,
        }
        write_json_atomic(tmp / "manifest.json", manifest)
        faults.pause_point("shards.replace")
    return TokenizeResult(manifest, time.perf_counter() - started)


def _check_not_empty(splits: dict, entries: list[dict], config: TokenizeConfig) -> None:
    names = ", ".join(e["name"] for e in entries)
    if splits["train"]["tokens"] + splits["val"]["tokens"] == 0:
        raise CorpusError(f"the corpus is empty: the sources {names} hold no text; check download.sources")
    for split in SPLITS:
        if splits[split]["tokens"] == 0:
            raise CorpusError(
                f"the {split} split is empty: the sources {names} hold too few documents for "
                f"tokenize.val_fraction {config.val_fraction} (seed {config.seed}); change val_fraction, or "
                f"set tokenize.doc_separator: null to split text files inside their text"
            )
