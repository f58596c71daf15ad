"""benchmarks/headgrad.py: both layouts run through the real loss, agree, and the threshold is left as found."""

import llm.loss
from benchmarks import headgrad


def test_each_shape_times_both_layouts_and_leaves_the_threshold_as_it_was(capsys):
    before = llm.loss.DIRECT_GRAD_WEIGHT_ROWS
    assert headgrad.main(["--rows", "8,2000", "--widths", "16", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("N ")]
    assert len(rows) == 2 and all("transposed/direct" in row for row in rows)
    assert "the threshold picks direct" in rows[0] and "the threshold picks transposed" in rows[1]
    assert llm.loss.DIRECT_GRAD_WEIGHT_ROWS == before
