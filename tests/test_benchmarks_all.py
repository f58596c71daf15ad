"""benchmarks/all.py: real benchmark processes, one that fails and one past its time, filed with the host
and the code; the summary and the logs whole on disk."""

from __future__ import annotations

import json

import pytest

from benchmarks import all as suite
from llm.lineage import code_version

BOOK_SHAPE = ("--rows", "512", "--widths", "768", "--repeats", "1")  # headgrad's headline needs that shape


@pytest.mark.slow
def test_each_benchmark_is_filed_and_a_failure_or_a_timeout_leaves_the_rest_running(tmp_path, capsys):
    entries = [
        suite.Entry("broken", "headgrad", ("--rows", "many")),
        suite.Entry("too-slow", "headgrad", (*BOOK_SHAPE[:4], "--repeats", "100000")),
        suite.Entry("headgrad", "headgrad", BOOK_SHAPE),
    ]
    assert suite.main(["--out", str(tmp_path), "--timeout-s", "15"], suite=entries) == 1

    assert capsys.readouterr().out.splitlines()[-1] == "benchmarks_failed=2"
    [summary_file] = tmp_path.glob("*.json")
    summary = json.loads(summary_file.read_text())
    commit, uncommitted = code_version()
    assert summary["code"] == {"commit": commit, "uncommitted_changes": uncommitted}
    assert summary_file.stem.endswith(f"-{summary['host']['class']}-{commit[:7]}")
    assert summary["host"]["torch_threads"] >= 1 and summary["host"]["torch"]
    records = summary["benchmarks"]
    assert list(records) == ["broken", "too-slow", "headgrad"]  # in the suite's order

    assert records["broken"]["exit_code"] != 0 and records["broken"]["headline"] is None
    assert records["too-slow"]["timed_out"] and records["too-slow"]["exit_code"] is None
    assert 15 <= records["too-slow"]["wall_s"] < 45
    good = records["headgrad"]
    assert good["exit_code"] == 0 and good["headline"]["name"] == "headgrad_book_shape"
    assert good["headline"]["value"] > 0
    assert good["command"] == "python -m benchmarks.headgrad " + " ".join(BOOK_SHAPE)
    assert len(good["load_average_before"]) == len(good["load_average_after"]) == 3
    assert good["cpu_steal_percent"] is None or 0 <= good["cpu_steal_percent"] <= 100

    logs = summary_file.with_suffix("")
    assert sorted(p.name for p in logs.iterdir()) == ["broken.log", "headgrad.log", "too-slow.log"]  # no temporaries
    assert "invalid literal for int()" in (logs / "broken.log").read_text()
    headline = suite.last_headline((logs / "headgrad.log").read_text())
    assert headline == ("headgrad_book_shape", good["headline"]["value"])
    assert set(tmp_path.iterdir()) == {logs, summary_file}


@pytest.mark.parametrize("output, expected", [
    ("a line\nspeedup=1.27\n\n", ("speedup", 1.27)),
    ("train_vs_nanogpt=1.15", ("train_vs_nanogpt", 1.15)),
    ("speedup=1.27\nTraceback: it went on", None),  # not the last line
    ("speedup=fast", None),
    ("", None),
])
def test_the_headline_is_the_last_line_name_equals_a_number(output, expected):
    assert suite.last_headline(output) == expected


@pytest.mark.parametrize("capabilities, name", [
    ({"amx_bf16": True, "avx512_bf16": True, "avx512": True, "avx2": True}, "AMX"),
    ({"avx512_bf16": True, "avx512": True, "avx2": True}, "AVX512-BF16"),
    ({"avx512": True, "avx2": True}, "AVX-512"),
    ({"avx2": True}, "AVX2"),
])
def test_a_host_is_named_by_what_computes_bf16_on_it(capabilities, name):
    assert suite.host_class(capabilities) == name


def test_an_unknown_name_in_only_or_skip_is_refused_with_the_names_there_are():
    entries = [suite.Entry("train", "train"), suite.Entry("book", "book")]
    assert [e.name for e in suite.select(entries, None, "book")] == ["train"]
    assert [e.name for e in suite.select(entries, "book,train", None)] == ["train", "book"]
    with pytest.raises(SystemExit, match="^--only: no benchmark named bok in the suite; the names are train, book$"):
        suite.select(entries, "bok", None)


def test_the_list_names_every_entry_of_the_suite_with_its_command(capsys):
    assert suite.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(suite.SUITE)
    assert lines[2].split(None, 1) == ["book", "python -m benchmarks.book --seed 123,124,125"]
    assert lines[3].split(None, 1) == ["book-fp32", "python -m benchmarks.book --precision fp32"]


@pytest.mark.slow
def test_a_second_run_of_the_same_day_host_and_commit_is_filed_beside_the_first(tmp_path, capsys):
    entries = [suite.Entry("broken", "headgrad", ("--rows", "many"))]
    for _ in range(2):
        suite.main(["--out", str(tmp_path)], suite=entries)
    first, second = sorted(tmp_path.glob("*.json"), key=lambda p: len(p.name))
    assert second.stem == first.stem + "-2" and second.with_suffix("").is_dir()


def test_steal_is_the_share_of_elapsed_cpu_time_the_hypervisor_took():
    # user nice system idle iowait irq softirq steal guest guest_nice
    before = [100, 0, 50, 800, 10, 0, 5, 35, 0, 0]
    after = [400, 0, 150, 1300, 10, 0, 15, 125, 40, 0]  # 1,000 ticks passed, 90 of them stolen
    assert suite.steal_percent(before, after) == 9.0
    assert suite.steal_percent(before, before) is None  # no time passed
    assert suite.steal_percent(None, after) is None
    assert suite.steal_percent([1, 2, 3, 4], [5, 6, 7, 8]) is None  # a kernel without the steal field
