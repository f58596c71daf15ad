"""Tokenize: exact round trips, the book's counts, a deterministic disjoint split, and clear errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from llm.config import TokenizeConfig
from llm.documents import CorpusError, read_records, read_text, split_long
from llm.download import write_manifests
from llm.shards import TokenStream, open_shard, read_manifest
from llm.tokenize import tokenize_corpus
from llm.tokenizer import TokenizerError, get_tokenizer
from tests.conftest import shared_file

ENC = get_tokenizer("gpt2")
EOT = ENC.eot_token


def make_raw(root: Path, files: dict[str, tuple[bytes, str, str | None]]) -> Path:
    """A data/raw folder as the download stage leaves it: name -> (content, kind, text_field)."""
    raw = root / "raw"
    (raw / "corpus").mkdir(parents=True)
    entries = []
    for name, (content, kind, field) in files.items():
        (raw / "corpus" / name).write_bytes(content)
        entries.append({"name": name.rsplit(".", 1)[0], "role": "corpus", "kind": kind, "text_field": field,
                        "file": f"corpus/{name}", "url": f"/src/{name}", "sha256": "0" * 64, "bytes": len(content)})
    write_manifests(raw, entries)
    return raw


def rows(shards_dir: Path, split: str) -> list[list[int]]:
    manifest = read_manifest(shards_dir)
    out = []
    for entry in manifest["splits"][split]["shards"]:
        shard = open_shard(shards_dir / entry["file"])
        out.extend(shard.document(i).tolist() for i in range(len(shard)))
    return out


TRICKY = [
    "Plain ASCII text, with punctuation!",
    "Accents: déjà vu, naïve café, Ångström, Straße.",
    "Emoji 🦙🚀 and CJK 中文字符, mixed.",
    "A literal <|endoftext|> in a corpus is text, not the special token.",
    "  leading spaces, trailing newline\n\n",
]


def test_records_round_trip_exactly_with_end_of_text(tmp_path):
    records = [{"text": t, "id": i} for i, t in enumerate(TRICKY * 8)]
    raw = make_raw(tmp_path, {"docs.jsonl": ("\n".join(json.dumps(r) for r in records).encode(), "jsonl", "text")})
    result = tokenize_corpus(raw, tmp_path / "shards", TokenizeConfig(val_fraction=0.3, seed=7))
    texts = {r["text"] for r in records}
    decoded = [ENC.decode(row[:-1]) for split in ("train", "val") for row in rows(tmp_path / "shards", split)]
    assert all(row[-1] == EOT for split in ("train", "val") for row in rows(tmp_path / "shards", split))
    assert sorted(decoded) == sorted(r["text"] for r in records)
    assert EOT not in [t for row in rows(tmp_path / "shards", "train") for t in row[:-1]]  # literal stays text
    assert result.metrics["docs"] == len(records) and set(decoded) == texts


def test_the_verdict_gives_the_books_5145_tokens_split_inside_its_stream(tmp_path):
    raw = make_raw(tmp_path, {"the-verdict.txt": (shared_file("the-verdict.txt").read_bytes(), "text", None)})
    result = tokenize_corpus(raw, tmp_path / "shards", TokenizeConfig(val_fraction=0.1))
    train, val = rows(tmp_path / "shards", "train"), rows(tmp_path / "shards", "val")
    assert len(train) == len(val) == 1
    assert train[0][-1] != EOT and val[0][-1] == EOT  # one document: only its end is marked
    assert len(train[0]) + len(val[0]) - 1 == 5145
    text = shared_file("the-verdict.txt").read_text()
    assert ENC.decode(train[0]) + ENC.decode(val[0][:-1]) == text  # disjoint, and together the whole
    assert 0.08 < len(val[0]) / 5145 < 0.12
    assert result.manifest["sources"] == [{"name": "the-verdict", "sha256": "0" * 64, "docs": 1, "tokens": 5146}]


def test_split_is_deterministic_and_disjoint(tmp_path):
    text = "\n=====\n".join(f"Document number {i} says {'hello ' * (i % 7)}" for i in range(300))
    raw = make_raw(tmp_path, {"many.txt": (text.encode(), "text", None)})
    config = TokenizeConfig(doc_separator="\n=====\n", val_fraction=0.2, seed=3)
    tokenize_corpus(raw, tmp_path / "a", config)
    tokenize_corpus(raw, tmp_path / "b", config)
    train_a, val_a = rows(tmp_path / "a", "train"), rows(tmp_path / "a", "val")
    assert (train_a, val_a) == (rows(tmp_path / "b", "train"), rows(tmp_path / "b", "val"))
    train_docs = {ENC.decode(r[:-1]) for r in train_a}
    val_docs = {ENC.decode(r[:-1]) for r in val_a}
    assert not train_docs & val_docs
    assert len(train_docs) + len(val_docs) == 300
    assert 40 <= len(val_docs) <= 80
    other_seed = TokenizeConfig(doc_separator="\n=====\n", val_fraction=0.2, seed=4)
    tokenize_corpus(raw, tmp_path / "c", other_seed)
    assert rows(tmp_path / "c", "val") != val_a


def test_manifest_counts_match_the_shards_and_shards_respect_their_size(tmp_path):
    corpus = shared_file("tinyshakespeare.txt").read_bytes()
    raw = make_raw(tmp_path, {"shakespeare.txt": (corpus, "text", None)})
    result = tokenize_corpus(raw, tmp_path / "shards", TokenizeConfig(tokens_per_shard=50_000))
    manifest = read_manifest(tmp_path / "shards")
    assert manifest == result.manifest
    assert (manifest["tokenizer"], manifest["vocab_size"], manifest["dtype"]) == ("gpt2", 50257, "uint16")
    for split in ("train", "val"):
        info = manifest["splits"][split]
        stream = TokenStream.from_manifest(tmp_path / "shards", split)
        assert len(stream) == info["tokens"] == sum(s["tokens"] for s in info["shards"])
        assert all(s["tokens"] <= 50_000 for s in info["shards"])
        assert all(open_shard(tmp_path / "shards" / s["file"]).tokens.dtype == np.uint16 for s in info["shards"])
    assert len(manifest["splits"]["train"]["shards"]) == 7  # the document continues across shards
    whole = ENC.encode_ordinary(corpus.decode())
    train = TokenStream.from_manifest(tmp_path / "shards", "train")
    val = TokenStream.from_manifest(tmp_path / "shards", "val")
    joined = np.concatenate([train.window(0, len(train)), val.window(0, len(val))])
    assert joined[:-1].tolist() == whole and joined[-1] == EOT


def test_pieces_encode_exactly_like_the_whole_text():
    rng = random.Random(0)
    alphabet = list("ab  \n\n\t,.'é🦙0") + ["'s", "<|endoftext|>", "\r\n"]
    text = "".join(rng.choice(alphabet) for _ in range(20_000))
    pieces = list(split_long(text, 0, piece_chars=97))
    assert len(pieces) > 50 and "".join(p.text for p in pieces) == text
    assert [t for p in pieces for t in ENC.encode_ordinary(p.text)] == ENC.encode_ordinary(text)


def test_text_reader_streams_pieces_with_separators(tmp_path):
    path = tmp_path / "t.txt"
    docs = [f"doc {i} " + "word " * rng for i, rng in enumerate([3, 900, 1, 2000, 5])]
    path.write_text("##".join(docs) + "##")
    pieces = list(read_text(path, separator="##", piece_chars=256))
    assert max(len(p.text) for p in pieces) < 3 * 256
    rebuilt: dict[int, str] = {}
    for p in pieces:
        rebuilt[p.doc] = rebuilt.get(p.doc, "") + p.text
    assert list(rebuilt.values()) == docs
    assert [p.doc for p in pieces if p.last] == list(range(len(docs)))


def test_not_utf8_names_file_and_byte_or_is_replaced(tmp_path):
    bad = "héllo wörld ".encode() * 100 + b"\xff\xfe" + b" tail"
    raw = make_raw(tmp_path, {"bad.txt": (bad, "text", None)})
    with pytest.raises(CorpusError) as info:
        tokenize_corpus(raw, tmp_path / "shards", TokenizeConfig())
    assert str(info.value).startswith(f"{raw / 'corpus' / 'bad.txt'}: byte 1400 is not valid UTF-8")
    assert "tokenize.encoding_errors: replace" in str(info.value)
    assert not (tmp_path / "shards").exists()  # nothing half-written
    tokenize_corpus(raw, tmp_path / "shards", TokenizeConfig(encoding_errors="replace"))
    decoded = "".join(ENC.decode(r) for s in ("train", "val") for r in rows(tmp_path / "shards", s))
    assert "\ufffd\ufffd tail" in decoded


def test_empty_corpus_is_refused(tmp_path):
    raw = make_raw(tmp_path, {"empty.txt": (b"", "text", None)})
    with pytest.raises(CorpusError, match="the corpus is empty: the sources empty hold no text"):
        tokenize_corpus(raw, tmp_path / "shards", TokenizeConfig())


def test_missing_raw_data_says_to_run_download(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run the download stage first \(`dvc repro download`\)"):
        tokenize_corpus(tmp_path / "raw", tmp_path / "shards", TokenizeConfig())


def test_unknown_tokenizer_lists_the_known_ones():
    with pytest.raises(TokenizerError, match="unknown tokenizer 'gpt3': tokenize.tokenizer must be one of gpt2, "):
        get_tokenizer("gpt3")


def test_bad_records_name_their_index_and_field(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"text": "ok"}, {"body": "no text field"}]))
    with pytest.raises(CorpusError, match=r"record 1 has no field 'text' \(the source's text_field\)"):
        list(read_records(path, "json", "text"))
    path.write_text(json.dumps({"text": "not a list"}))
    with pytest.raises(CorpusError, match="must hold a list of records, got dict"):
        list(read_records(path, "json", "text"))


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": TRICKY, "n": list(range(len(TRICKY)))}), tmp_path / "c.parquet")
    assert [p.text for p in read_records(tmp_path / "c.parquet", "parquet", "content")] == TRICKY
    with pytest.raises(CorpusError, match="no column 'text' .* columns: content, n"):
        list(read_records(tmp_path / "c.parquet", "parquet", "text"))


def test_killed_run_leaves_the_previous_shards_untouched(tmp_path):
    raw = make_raw(tmp_path, {"a.txt": (b"some words here " * 100, "text", None)})
    tokenize_corpus(raw, tmp_path / "shards", TokenizeConfig())
    before = read_manifest(tmp_path / "shards")
    shutil.copy(raw / "corpus" / "a.txt", raw / "corpus" / "a.bak")
    (raw / "corpus" / "a.txt").write_bytes(b"\xff broken")
    with pytest.raises(CorpusError):
        tokenize_corpus(raw, tmp_path / "shards", TokenizeConfig())
    assert read_manifest(tmp_path / "shards") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "shards"]  # no temporary folder left
