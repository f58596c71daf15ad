"""The recipes are complete params files that load without a problem."""

import dataclasses
from pathlib import Path

import pytest

from llm.config import load_params, read_yaml
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.stem for p in RECIPES} >= {"gpt2-124m", "gpt2-medium-instruct", "gpt2-continue", "book-ch05"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_is_a_whole_valid_params_file(path: Path):
    params = load_params(path)
    assert set(read_yaml(path)) == set(read_yaml(ROOT / "params.yaml"))  # no section left out
    assert params.model.build().vocab_size == 50257


def test_the_book_recipe_is_the_books_chapter_5_run():
    import tiktoken

    from benchmarks.book import check_recipe
    from benchmarks.book_ch05 import book_loaders
    from tests.conftest import shared_file

    text = shared_file("the-verdict.txt").read_text(encoding="utf-8")
    train_loader, val_loader = book_loaders(text, tiktoken.get_encoding("gpt2"))
    assert (len(train_loader.dataset), len(train_loader), len(val_loader.dataset)) == (18, 9, 2)
    params = load_params(ROOT / "recipes" / "book-ch05.yaml")
    check_recipe(params, len(train_loader))
    changed = dataclasses.replace(params, pretrain=dataclasses.replace(params.pretrain, lr=0.001, max_steps=100))
    with pytest.raises(SystemExit, match=r"pretrain.lr is 0.001, the book's 0.0004\n  pretrain.max_steps is 100, "
                                         r"the book's 90$"):
        check_recipe(changed, len(train_loader))


def test_the_book_recipe_trains_and_validates_on_the_books_windows(tmp_path):
    """Through the pipeline's own data path (download, tokenize, the pretrain stage's batches), the recipe
    cuts the-verdict as the book's loaders do: the same 18 train windows, and val windows on the book's grid
    over the same held-out text, so that its val curve is measured where the book measures its own. The one
    difference is where the text is split: the book cuts at 90% of the characters, inside a word
    ("techniq|ue'"), the stage at the end of that word (llm/documents.py), so the book's val tokens begin
    with the word's last tokens and its val windows start that many tokens earlier."""
    import tiktoken

    from benchmarks.book import fetch_corpus
    from benchmarks.book_ch05 import TRAIN_RATIO, book_loaders
    from llm.pretrain import fixed_val_batches
    from llm.shards import RandomWindows, TokenStream
    from llm.tokenize import tokenize_corpus

    params = load_params(ROOT / "recipes" / "book-ch05.yaml")
    text = fetch_corpus(params, tmp_path / "raw").read_text(encoding="utf-8")
    tokenizer = tiktoken.get_encoding("gpt2")
    train_loader, val_loader = book_loaders(text, tokenizer)
    tokenize_corpus(tmp_path / "raw", tmp_path / "shards", params.tokenize)
    config, T = params.pretrain, params.model.build().context_length

    windows = RandomWindows(TokenStream.from_manifest(tmp_path / "shards", "train"), T, config.batch_size,
                            config.seed, shift=config.windows == "shifted")
    epoch = [windows.next_batch() for _ in range(len(train_loader))]
    ours = sorted(tuple(row.tolist()) for x, _ in epoch for row in x)
    books = sorted(tuple(row.tolist()) for x, _ in train_loader for row in x)
    assert ours == books

    val = fixed_val_batches(TokenStream.from_manifest(tmp_path / "shards", "val"), T, config.batch_size,
                            config.eval_batches, config.windows)
    held_out = text[int(TRAIN_RATIO * len(text)):]
    fragment = len(tokenizer.encode(held_out.split(" ", 1)[0]))  # the cut word's end, in the book's val
    assert fragment == 2
    books_val = tokenizer.encode(held_out)
    assert [len(x) for x, _ in val] == [len(x) for x, _ in val_loader] == [2]
    for (x, y), (book_x, _) in zip(val, val_loader):
        for k in range(len(x)):
            start = fragment + k * T  # the book's grid, k * T, less the fragment it starts with
            assert x[k].tolist() == books_val[start:start + T] and y[k].tolist() == books_val[start + 1:start + T + 1]
            assert book_x[k].tolist() == books_val[k * T:k * T + T]
