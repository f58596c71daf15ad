"""benchmarks/book.py's arguments: one seed or several (the whole run is the suite's, minutes long)."""

import argparse

import pytest

from benchmarks.book import seed_list


def test_one_seed_or_several_comma_separated():
    assert seed_list("123") == [123]
    assert seed_list("123,124,125") == [123, 124, 125]


@pytest.mark.parametrize(("text", "message"), [("12a", "seeds are integers, comma-separated"),
                                               ("123,,124", "seeds are integers, comma-separated"),
                                               ("123,123", "each seed once")])
def test_a_seed_that_is_not_an_integer_or_repeats_is_refused_naming_the_value(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message) as error:
        seed_list(text)
    assert repr(text) in str(error.value)
