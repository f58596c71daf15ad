"""The GPU recipes are complete params files that load without a problem."""

from pathlib import Path

import pytest

from llm.config import load_params, read_yaml
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.stem for p in RECIPES} >= {"gpt2-124m", "gpt2-medium-instruct", "gpt2-continue"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_is_a_whole_valid_params_file(path: Path):
    params = load_params(path)
    assert set(read_yaml(path)) == set(read_yaml(ROOT / "params.yaml"))  # no section left out
    assert params.model.build().vocab_size == 50257
