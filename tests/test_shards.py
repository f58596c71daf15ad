"""Shards: atomic writes, zero-copy reads, windows across shard and document boundaries, corruption."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from llm.files import write_json_atomic
from llm.shards import (RandomWindows, ShardError, ShardWriter, TokenStream, check_shards_fit, open_shard,
                        read_manifest)
from tests.data import make_shards


def write_split(root, docs: list[np.ndarray], tokens_per_shard: int, vocab_size: int = 1000):
    (root / "train").mkdir(parents=True)
    writer = ShardWriter(root / "train", tokens_per_shard)
    for doc in docs:
        writer.add(doc.astype(np.uint16), ends_document=True)
    shards = writer.close()
    write_json_atomic(root / "manifest.json", {"tokenizer": "gpt2", "dtype": "uint16", "vocab_size": vocab_size,
                                               "splits": {"train": {"docs": len(docs), "shards": shards,
                                                                    "tokens": sum(s["tokens"] for s in shards)}}})
    return shards


@pytest.fixture
def stream(tmp_path):
    rng = np.random.default_rng()
    docs = [rng.integers(0, 999, size=rng.integers(1, 60)) for _ in range(40)]
    write_split(tmp_path, docs, tokens_per_shard=97)
    flat = np.concatenate(docs)
    return TokenStream.from_manifest(tmp_path, "train"), flat


def test_reads_are_zero_copy_memory_maps(tmp_path):
    write_split(tmp_path, [np.arange(10)], tokens_per_shard=100)
    shard = open_shard(tmp_path / "train" / "000000.arrow")
    assert not shard.tokens.flags.owndata and not shard.tokens.flags.writeable
    assert shard.document(0).tolist() == list(range(10))


def test_documents_continue_across_shards(tmp_path):
    shards = write_split(tmp_path, [np.arange(250), np.arange(5)], tokens_per_shard=100)
    assert [(s["rows"], s["docs"], s["tokens"]) for s in shards] == [(1, 0, 100), (1, 0, 100), (2, 2, 55)]


def test_windows_are_exact_at_shard_and_document_boundaries(stream):
    tokens, flat = stream
    assert len(tokens.shards) > 5 and len(tokens) == len(flat)
    for start in range(0, len(flat) - 33):  # every start, so every boundary is crossed
        assert np.array_equal(tokens.window(start, 33), flat[start:start + 33])
    with pytest.raises(IndexError, match="runs past the end"):
        tokens.window(len(flat) - 3, 5)


def test_random_windows_are_shifted_targets_deterministic_and_resumable(stream):
    tokens, flat = stream
    loader = RandomWindows(tokens, context_length=16, batch_size=4, seed=11)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row in range(4):  # every window is a real slice of the stream
        start = next(s for s in range(len(flat)) if np.array_equal(flat[s:s + 16], x[row].numpy()))
        assert np.array_equal(flat[start + 1:start + 17], y[row].numpy())
    for _ in range(30):  # through several epochs
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(5)]
    resumed = RandomWindows(tokens, context_length=16, batch_size=4, seed=11)
    resumed.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(expected, (resumed.next_batch() for _ in range(5))))
    assert state["epoch"] >= 1


def epoch_starts(loader: RandomWindows, epochs: int, windows_per_epoch: int) -> list[list[int]]:
    """The window starts of each epoch, read off a stream whose token at each position is the position."""
    starts = [int(s) for _ in range(epochs * windows_per_epoch // loader.batch_size)
              for s in loader.next_batch()[0][:, 0]]
    return [starts[i:i + windows_per_epoch] for i in range(0, len(starts), windows_per_epoch)]


def test_fixed_windows_are_the_books_in_a_new_order_each_epoch_and_shifted_ones_move(tmp_path):
    length = int(np.random.default_rng().integers(321, 337))  # 20 windows of 16 (and their targets)
    write_split(tmp_path, [np.arange(length)], tokens_per_shard=1000, vocab_size=1000)
    tokens = TokenStream.from_manifest(tmp_path, "train")
    fixed = epoch_starts(RandomWindows(tokens, 16, batch_size=4, seed=7, shift=False), 3, 20)
    grid = list(range(0, 20 * 16, 16))  # the book's: stride 16 from the first token
    assert all(sorted(epoch) == grid for epoch in fixed)
    assert fixed[0] != fixed[1] != fixed[2]  # reshuffled
    shifted = RandomWindows(tokens, 16, batch_size=1, seed=7)
    offsets = {shifted.next_batch()[0][0, 0].item() % 16 for _ in range(200)}
    assert len(offsets) > 1  # the grid moves from epoch to epoch



def test_val_windows_follow_the_grid(tmp_path):
    from llm.pretrain import fixed_val_batches

    length = int(np.random.default_rng().integers(100, 140))
    write_split(tmp_path, [np.arange(length)], tokens_per_shard=1000, vocab_size=1000)
    tokens = TokenStream.from_manifest(tmp_path, "train")
    starts = {grid: [x[0, 0].item() for x, _ in fixed_val_batches(tokens, 16, batch_size=1, batches=5, grid=grid)]
              for grid in ("shifted", "fixed")}
    assert starts["fixed"] == [0, 16, 32, 48, 64]  # the book's val loader: stride 16 from the first token
    assert starts["shifted"][0] == 0 and starts["shifted"][-1] == length - 17  # spread to the split's end
    for x, y in fixed_val_batches(tokens, 16, batch_size=2, batches=2, grid="fixed"):
        assert torch.equal(y, x + 1)  # each window's targets, one token on

def test_ranks_split_the_global_batch(stream):
    tokens, _ = stream
    single = RandomWindows(tokens, 8, batch_size=6, seed=5).next_batch()[0]
    ranks = [RandomWindows(tokens, 8, batch_size=3, seed=5, rank=r, world_size=2).next_batch()[0] for r in (0, 1)]
    assert torch.equal(torch.stack([ranks[0], ranks[1]], 1).reshape(6, 8), single)


def test_truncated_and_foreign_shards_are_named(tmp_path):
    shards = write_split(tmp_path, [np.arange(500)], tokens_per_shard=1000)
    path = tmp_path / shards[0]["file"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=rf"{path}: corrupt or truncated shard .*dvc repro tokenize"):
        TokenStream.from_manifest(tmp_path, "train")
    path.write_bytes(b"not arrow at all")
    with pytest.raises(ShardError, match="corrupt or truncated"):
        open_shard(path)
    path.unlink()
    with pytest.raises(ShardError, match="shard not found"):
        TokenStream.from_manifest(tmp_path, "train")


def test_ids_beyond_the_vocabulary_are_refused(tmp_path):
    write_split(tmp_path, [np.array([1, 2, 999])], tokens_per_shard=100, vocab_size=500)
    with pytest.raises(ShardError, match=r"ids beyond the vocabulary of 500 \(gpt2\) that the manifest gives: the "
                                         "shard is damaged or of another tokenizer; rerun `dvc repro tokenize`"):
        TokenStream.from_manifest(tmp_path, "train")


def test_missing_manifest_says_to_run_tokenize(tmp_path):
    with pytest.raises(ShardError, match=r"run the tokenize stage first \(`dvc repro tokenize`\)"):
        TokenStream.from_manifest(tmp_path, "train")


def test_damaged_shards_of_every_kind_are_named(tmp_path):
    shards = write_split(tmp_path, [np.arange(500), np.arange(300)], tokens_per_shard=1000)
    path = tmp_path / shards[0]["file"]
    data = path.read_bytes()
    fix = "rebuild it with `dvc repro tokenize` (or restore it with `dvc checkout`)"
    flipped = bytearray(data)
    flipped[-12] ^= 0xFF  # inside the footer: Arrow raises NotImplementedError, not ArrowInvalid
    path.write_bytes(bytes(flipped))
    with pytest.raises(ShardError) as info:
        open_shard(path)
    assert str(info.value) == (f"{path}: corrupt or truncated shard (Integers with more than 64 bits not "
                               f"implemented); {fix}")
    path.write_bytes(b"")
    with pytest.raises(ShardError) as info:
        open_shard(path)
    assert str(info.value) == f"{path}: corrupt or truncated shard (File is too small: 0); {fix}"
    for column in (pa.array([1, 2, 3], type=pa.uint16()), pa.array([[1.5]], type=pa.list_(pa.float32()))):
        batch = pa.record_batch([column], names=["input_ids"])  # a real Arrow file, but not of token rows
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        with pytest.raises(ShardError) as info:
            open_shard(path)
        assert str(info.value) == (f"{path}: not a token shard (one batch with column 'input_ids' of type "
                                   f"list<uint16> or list<uint32>); {fix}")


def test_damaged_or_incomplete_manifests_say_to_rerun_tokenize(tmp_path):
    write_split(tmp_path, [np.arange(50)], tokens_per_shard=100)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    fix = f"rerun `dvc repro tokenize` (or restore it with `dvc checkout {path}`)"
    path.write_text(path.read_text()[:40])  # truncated
    with pytest.raises(ShardError) as info:
        TokenStream.from_manifest(tmp_path, "train")
    message = str(info.value)
    assert message.startswith(f"{path} is damaged: it is not valid JSON (Unterminated string") and message.endswith(
        f"); {fix}")
    header = (f"{path} is not a shards manifest this code can read (damaged, or written by another version of the "
              f"tokenize stage?); {fix}:")
    path.write_text(json.dumps({"splits": manifest["splits"]}))
    with pytest.raises(ShardError) as info:
        read_manifest(tmp_path)
    assert str(info.value).splitlines() == [header, "  tokenizer: missing", "  vocab_size: missing", "  dtype: missing"]
    entry = manifest["splits"]["train"]["shards"][0]
    path.write_text(json.dumps({**manifest, "vocab_size": "50257", "dtype": "int8", "splits": {
        "train": {"shards": [{"file": entry["file"], "rows": -1}]}, "val": {"docs": 0}}}))
    with pytest.raises(ShardError) as info:
        TokenStream.from_manifest(tmp_path, "train")
    assert str(info.value).splitlines() == [
        header,
        "  vocab_size: must be a positive integer, got '50257'",
        "  dtype: must be 'uint16' or 'uint32', got 'int8'",
        "  splits.train.shards[0].rows: must be a whole number >= 0, got -1",
        "  splits.train.shards[0].tokens: must be a whole number >= 0, got None",
        "  splits.val.shards: missing",
    ]
    path.write_text("[]")
    with pytest.raises(ShardError, match=r":\n  must hold an object with keys tokenizer, vocab_size, dtype, splits, "
                                         r"got list$"):
        read_manifest(tmp_path)


def test_shards_of_another_tokenizer_or_a_larger_vocabulary_do_not_fit_a_model(tmp_path):
    shards = make_shards(tmp_path / "shards", np.arange(10), np.arange(10), tokenizer="cl100k_base",
                         vocab_size=100277)
    manifest = read_manifest(shards)
    check_shards_fit(shards, manifest, tmp_path / "ckpt", "cl100k_base", 100277)  # fits: no error
    with pytest.raises(ShardError) as info:
        check_shards_fit(shards, manifest, tmp_path / "ckpt", "gpt2", 50257)
    assert str(info.value) == (
        f"{shards} holds tokens of tokenizer 'cl100k_base' (vocabulary of 100277), but {tmp_path / 'ckpt'} was "
        f"trained with tokenizer 'gpt2' (vocab_size 50257); set tokenize.tokenizer: gpt2 and rerun "
        f"`dvc repro tokenize`, or train the model on these shards (`dvc repro`)")
    with pytest.raises(ShardError) as info:
        check_shards_fit(shards, manifest, tmp_path / "ckpt", "cl100k_base", 50257)
    assert str(info.value) == (
        f"{shards} holds tokens of tokenizer 'cl100k_base', a vocabulary of 100277, more than {tmp_path / 'ckpt'}'s "
        f"vocab_size of 50257 (tokenizer 'cl100k_base') can read; set model.vocab_size to 100277 or more and retrain "
        f"it (`dvc repro`), or tokenize with the tokenizer the model was trained for (tokenize.tokenizer, then "
        f"`dvc repro tokenize`)")
