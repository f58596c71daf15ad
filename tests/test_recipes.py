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
