"""benchmarks/headblocks.py: one product and the blocks run through the real loss, agree, and VOCAB_BLOCK is
left as found."""

import pytest

import llm.loss
from benchmarks import headblocks


def test_each_shape_times_one_product_and_the_blocks_and_leaves_the_block_as_it_was(capsys):
    before = llm.loss.VOCAB_BLOCK
    assert headblocks.main(["--rows", "8,2048", "--widths", "16,256", "--repeats", "1", "--block", "20000"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("N ")]
    assert len(rows) == 4 and all("one/blocks" in row for row in rows)
    assert out.splitlines()[-1].startswith("headblocks_train_shape=")
    assert llm.loss.VOCAB_BLOCK == before


def test_a_block_below_one_row_is_refused():
    with pytest.raises(SystemExit):
        headblocks.main(["--block", "0"])
