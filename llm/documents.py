"""Read corpus files as a stream of documents, in pieces small enough to encode in parallel.

A text file is one document, or several when a separator is given; each JSON / JSON Lines record or
Parquet row is one document (its text in a named field or column). Long documents arrive in pieces of
about `piece_chars` characters, so memory stays flat however large the corpus is.

Pieces are cut only at a *safe cut*: an ASCII space or newline that follows a printable ASCII character.
GPT-2's pre-tokenizer (and tiktoken's other encodings) never joins such a character with the whitespace
after it, and looks neither behind nor more than one character ahead, so encoding the pieces one by one
gives exactly the tokens of encoding the whole document at once (tests/test_tokenize.py checks it).

A JSON array is parsed whole; use JSON Lines or Parquet for corpora larger than memory.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PIECE_CHARS = 1 << 18  # large enough to amortise thread hand-offs, small enough to keep both cores busy
_READ_BYTES = 1 << 20


class CorpusError(ValueError):
    """A corpus file that cannot be read as its source says; the message names the file and the fix."""


@dataclass(frozen=True)
class Piece:
    text: str
    doc: int  # index of the document within its source
    last: bool  # the document ends with this piece
    after_cut: bool = False  # this piece lies after the requested split point (see read_text)


def last_safe_cut(text: str, limit: int) -> int | None:
    """The largest position p <= limit where text[:p] / text[p:] may be encoded separately, or None."""
    p = min(limit, len(text) - 1)
    while p > 0:
        p = max(text.rfind(" ", 0, p + 1), text.rfind("\n", 0, p + 1))
        if p <= 0:
            return None
        if "\x21" <= text[p - 1] <= "\x7e":
            return p
        p -= 1
    return None


def first_safe_cut(text: str, start: int) -> int | None:
    """The smallest position p >= start (and > 0) where the text may be cut, or None."""
    p = max(start, 1)
    while p < len(text):
        spaces = [i for i in (text.find(" ", p), text.find("\n", p)) if i != -1]
        if not spaces:
            return None
        p = min(spaces)
        if "\x21" <= text[p - 1] <= "\x7e":
            return p
        p += 1
    return None


def split_long(text: str, doc: int, piece_chars: int = PIECE_CHARS) -> Iterator[Piece]:
    """One document's text as pieces of about `piece_chars` (longer where no safe cut is near)."""
    start = 0
    while len(text) - start > piece_chars:
        cut = last_safe_cut(text, start + piece_chars)
        if cut is None or cut <= start:
            cut = first_safe_cut(text, start + piece_chars)
            if cut is None:
                break
        yield Piece(text[start:cut], doc, last=False)
        start = cut
    yield Piece(text[start:], doc, last=True)


def _decoded_blocks(path: Path, errors: str) -> Iterator[str]:
    """The file's text block by block, ending with ""; invalid UTF-8 under errors='strict' names its byte."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(_READ_BYTES)
            pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
            try:
                yield decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise CorpusError(
                    f"{path}: byte {offset - pending + exc.start} is not valid UTF-8 ({exc.reason}); fix the "
                    f"file, or set tokenize.encoding_errors: replace to read it with U+FFFD for bad bytes"
                ) from None
            if not block:
                return
            offset += len(block)


def read_text(
    path: str | Path,
    *,
    separator: str | None = None,
    val_fraction: float | None = None,
    errors: str = "strict",
    piece_chars: int = PIECE_CHARS,
) -> Iterator[Piece]:
    """Stream a text file as pieces of documents split on `separator` (None: the file is one document).

    With `val_fraction`, the file is one document whose last `val_fraction` of characters (to the next
    safe cut) is held out for validation, as the book does: those pieces have `after_cut=True`.
    """
    path = Path(path)
    if separator and val_fraction is not None:
        raise ValueError("a validation cut applies to one-document files only, not with a separator")
    cut = None
    if val_fraction is not None:
        cut = round(sum(len(text) for text in _decoded_blocks(path, errors)) * (1 - val_fraction))
    tail = len(separator) - 1 if separator else 0  # may hold the start of a separator still to come
    buffer, start, doc, after = "", 0, 0, False  # start: position of buffer[0] in the file, in characters
    open_doc = False  # pieces of the current document were yielded, its last one not yet
    for text in _decoded_blocks(path, errors):
        buffer += text
        while separator and (end := buffer.find(separator)) != -1:
            if end or open_doc:  # empty documents (separators in a row) carry no text to learn from
                yield from split_long(buffer[:end], doc, piece_chars)
                doc, open_doc = doc + 1, False
            buffer, start = buffer[end + len(separator):], start + end + len(separator)
        if cut is not None and not after and (not text or start + len(buffer) - cut > piece_chars):
            at = first_safe_cut(buffer, cut - start) or last_safe_cut(buffer, cut - start)
            if at is None and not text:
                at = len(buffer)  # no place to cut at all: all is training text, and val stays empty
            if at is not None:
                for piece in split_long(buffer[:at], doc, piece_chars):
                    yield Piece(piece.text, doc, last=False)
                buffer, start, after, open_doc = buffer[at:], start + at, True, at > 0 or open_doc
        room = len(buffer) - tail if cut is None or after else min(len(buffer), cut - start)
        while room > 2 * piece_chars:
            at = last_safe_cut(buffer, piece_chars) or first_safe_cut(buffer, piece_chars)
            if at is None or at > room:
                break
            yield Piece(buffer[:at], doc, last=False, after_cut=after)
            buffer, start, room, open_doc = buffer[at:], start + at, room - at, True
    if buffer or open_doc:
        for piece in split_long(buffer, doc, piece_chars):
            yield Piece(piece.text, doc, piece.last, after_cut=after)


def _records(path: Path, kind: str, errors: str) -> Iterator[tuple[int, object]]:
    if kind == "jsonl":
        with open(path, encoding="utf-8", errors=errors) as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield line_number - 1, json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise CorpusError(f"{path}: line {line_number} is not valid JSON: {exc.msg}") from None
        return
    try:
        data = json.loads(path.read_bytes().decode("utf-8", errors=errors))
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: byte {exc.start} is not valid UTF-8 ({exc.reason}); fix the file, or set "
                          f"tokenize.encoding_errors: replace") from None
    if not isinstance(data, list):
        raise CorpusError(f"{path}: a json source must hold a list of records, got {type(data).__name__}")
    yield from enumerate(data)


def read_records(path: str | Path, kind: str, text_field: str, *, errors: str = "strict",
                 piece_chars: int = PIECE_CHARS) -> Iterator[Piece]:
    """One document per JSON / JSON Lines record or Parquet row: the text in `text_field`."""
    path = Path(path)
    if kind == "parquet":
        yield from _read_parquet(path, text_field, piece_chars)
        return
    for index, record in _records(path, kind, errors):
        if not isinstance(record, dict):
            raise CorpusError(f"{path}: record {index} is a {type(record).__name__}, not an object")
        text = record.get(text_field)
        if not isinstance(text, str):
            problem = "has no field" if text_field not in record else "has a non-string field"
            raise CorpusError(f"{path}: record {index} {problem} {text_field!r} (the source's text_field)")
        yield from split_long(text, index, piece_chars)


def _read_parquet(path: Path, column: str, piece_chars: int) -> Iterator[Piece]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:
        raise CorpusError(f"{path}: not a readable Parquet file: {exc}") from None
    if column not in parquet.schema_arrow.names:
        raise CorpusError(f"{path}: no column {column!r} (the source's text_field); columns: "
                          f"{', '.join(parquet.schema_arrow.names)}")
    index = 0
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            yield from split_long(text or "", index, piece_chars)
            index += 1


def in_validation(seed: int, source: str, doc: int, val_fraction: float) -> bool:
    """A stable, seeded coin flip per document: the same documents are held out on every run."""
    digest = hashlib.blake2b(f"{seed}/{source}/{doc}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction
