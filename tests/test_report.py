import re
from html.parser import HTMLParser

from markdown_it import MarkdownIt

from llm.judge import JudgeResult
from llm.perplexity import PerplexityResult
from llm.report import Evaluation, Example, Tuned, write_report
from llm.scores import score_responses

TRICKY = ("a | b \\| c `code` *not bold* <script>alert(1)</script> &amp; ~~kept~~ [link](x) trailing \\\n"
          "second line")
EXAMPLES = [
    Example(prompt="### Instruction:\nQuote this: ```python\nx = 1\n```", expected="x = 1",
            answers={"base": "", "SFT": TRICKY, "DPO": "x = 1"}),
    Example(prompt="### Instruction:\nName the capital of France.", expected="Paris.",
            answers={"base": "France France", "SFT": "The capital of France is Paris.", "DPO": "Paris."}),
]
HISTORIES = {
    "pretrain": {"train_loss": [(0, 10.9), (10, 7.5), (20, 6.1)], "val_loss": [(10, 7.8), (20, 6.6)]},
    "finetune": {"train_loss": [(0, 3.0), (5, 2.2)], "val_loss": [(5, 2.5)]},
}


def evaluation(judge: JudgeResult = JudgeResult("scored", "llama3", (85, 92, 40)), **changes) -> Evaluation:
    references = ["paris.", "Rome.", "the dog runs"]
    fields = dict(
        base_model="gpt-base version 3",
        base_loss=PerplexityResult(loss=3.412, perplexity=30.33, tokens=12345, tokens_per_s=1000.0,
                                   bits_per_byte=1.2345, bytes=50000),
        tuned=[Tuned("SFT", "gpt-instruct version 2",
                     PerplexityResult(loss=3.201, perplexity=24.558, tokens=12345, tokens_per_s=1000.0),
                     score_responses(["Paris.", "", "The dogs are running"], references), judge),
               Tuned("DPO", "gpt-instruct version 3",
                     PerplexityResult(loss=3.25, perplexity=25.79, tokens=12345, tokens_per_s=1000.0),
                     score_responses(["Paris.", "Rome.", "dogs"], references), judge)],
        champion="DPO",
        histories=HISTORIES,
        examples=EXAMPLES,
    )
    return Evaluation(**{**fields, **changes})


class Rendered(HTMLParser):
    """What a reader sees: the text of each table row's cells (<br> as a line break), and code blocks."""

    def __init__(self, markdown: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self.code: list[str] = []
        self._text: list[str] | None = None
        self.feed(MarkdownIt("commonmark").enable("table").render(markdown))

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th", "pre"):
            self._text = []
        elif tag == "br" and self._text is not None:
            self._text.append("\n")

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append("".join(self._text))
        elif tag == "pre":
            self.code.append("".join(self._text))

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)


def test_the_report_holds_the_models_the_metrics_table_and_the_curves(tmp_path):
    path = write_report(tmp_path / "eval", evaluation())

    text = path.read_text(encoding="utf-8")
    assert path == tmp_path / "eval" / "report.md"
    assert text.startswith("# Evaluation report\n\n- **Base model:** gpt-base version 3\n"
                           "- **SFT model:** gpt-instruct version 2\n"
                           "- **DPO model:** gpt-instruct version 3\n"
                           "- **Promoted to champion:** DPO (gpt-instruct version 3)\n")
    assert ("| metric | base | SFT | DPO |\n"
            "| --- | ---: | ---: | ---: |\n"
            "| val loss | 3.4120 | 3.2010 | 3.2500 |\n"
            "| val perplexity | 30.33 | 24.56 | 25.79 |\n"
            "| val bits per byte | 1.2345 | nan | nan |\n"
            "| exact match | – | 0.333 (1 of 3) | 0.667 (2 of 3) |\n"
            "| ROUGE-L F1 | – | 0.619 | 0.833 |\n"
            "| LLM judge (llama3), 0-100 | – | 72.33 (3 of 3 scored) | 72.33 (3 of 3 scored) |\n") in text
    assert "over all 12,345 next-token targets" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["losses.png"]
    assert (path.parent / links[0]).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert sorted(p.name for p in path.parent.iterdir()) == ["losses.png", "report.md"]  # no temporaries


def test_examples_appear_side_by_side_exactly_as_generated(tmp_path):
    rendered = Rendered(write_report(tmp_path, evaluation()).read_text(encoding="utf-8"))

    assert rendered.code == [EXAMPLES[0].prompt + "\n", EXAMPLES[1].prompt + "\n"]
    example_rows = rendered.rows[-4:]  # a header and a row per example
    assert example_rows == [
        ["expected", "base", "SFT", "DPO"], ["x = 1", "(empty)", TRICKY, "x = 1"],
        ["expected", "base", "SFT", "DPO"], ["Paris.", "France France", "The capital of France is Paris.", "Paris."],
    ]
    assert all(len(row) == 4 for row in rendered.rows)  # no stray pipe split a table


def test_a_skipped_judge_and_a_missing_history_say_so(tmp_path):
    reason = "http://127.0.0.1:9/api/chat is not reachable; start the server (`ollama serve`) | or fix it"
    report = write_report(tmp_path, evaluation(judge=JudgeResult("skipped", "llama3", reason=reason),
                                               histories={"pretrain": {}}, champion=None))

    text = report.read_text(encoding="utf-8")
    assert "- **Promoted to champion:** none (the holder stays champion)\n" in text
    assert ["LLM judge (llama3), 0-100", "–", f"skipped: {reason}", f"skipped: {reason}"] in Rendered(text).rows
    assert "## Loss curves\n\nNo loss history was recorded.\n" in text
    assert not (tmp_path / "losses.png").exists()


def test_hellaswag_rows_show_each_scored_model_and_a_dash_for_one_not_scored(tmp_path):
    import dataclasses

    from llm.hellaswag import HellaSwagResult

    base = evaluation()
    sft, dpo = base.tuned
    text = write_report(tmp_path, dataclasses.replace(
        base, base_hellaswag=HellaSwagResult(acc=0.2859, acc_norm=0.2955, count=10042),
        tuned=[dataclasses.replace(sft, hellaswag=HellaSwagResult(0.3, 0.31, 10042)), dpo])).read_text()

    rows = Rendered(text).rows
    assert ["HellaSwag acc", "0.2859", "0.3000", "–"] in rows
    assert ["HellaSwag acc_norm", "0.2955", "0.3100", "–"] in rows
    assert "HellaSwag over 10,042 items, as llm.c scores it" in text
    assert "HellaSwag" not in write_report(tmp_path / "none", base).read_text()  # not scored: no rows
