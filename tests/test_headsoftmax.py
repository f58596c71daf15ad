"""benchmarks/headsoftmax.py: both softmax paths run through the real loss, agree, and IN_PLACE_DTYPES is
left as found."""

import llm.loss
from benchmarks import headsoftmax


def test_each_shape_times_both_paths_and_leaves_the_setting_as_it_was(capsys):
    before = llm.loss.IN_PLACE_DTYPES
    assert headsoftmax.main(["--rows", "8,512", "--widths", "16,768", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("N ")]
    assert len(rows) == 4 and all("chunks/in place" in row for row in rows)
    assert out.splitlines()[-1].startswith("headsoftmax_book_shape=")
    assert llm.loss.IN_PLACE_DTYPES is before
