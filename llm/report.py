"""The evaluation report: one Markdown file with the numbers, the loss curves and examples side by side.

    write_report("data/eval", Evaluation(
        base_model="gpt-base version 3", base_loss=base_ppl,
        tuned=[Tuned("SFT", "gpt-instruct version 2", sft_ppl, sft_scores, sft_judge),
               Tuned("DPO", "gpt-instruct version 3", dpo_ppl, dpo_scores, dpo_judge)],
        champion="DPO",
        histories={"pretrain": pretrain_history, "finetune": finetune_history, "preference": ...},
        examples=[Example(prompt, expected, {"base": ..., "SFT": ..., "DPO": ...}), ...]))

writes `report.md` and the `losses.png` it links to by a relative path, so the folder reads the same as a
DVC output, an MLflow artifact or a checkout on GitHub.

Model output is untrusted text. Prompts go into fenced code blocks, whose fence is longer than any run
of backticks in them. In table cells, each character that Markdown or HTML could read as markup
(\\ ` * _ [ ] < > & | ~) is backslash-escaped, which CommonMark defines to mean the character itself, and
line breaks become <br>: a response can neither break a table nor inject HTML.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llm.files import write_text_atomic
from llm.hellaswag import GPT2_124M, HellaSwagResult
from llm.judge import JudgeResult
from llm.masking import MaskedMetrics
from llm.perplexity import PerplexityResult
from llm.plots import History, plot_curves
from llm.scores import Scores

REPORT_FILE = "report.md"
LOSS_PLOT_FILE = "losses.png"
_MARKUP = re.compile(r"([\\`*_\[\]<>&|~])")


@dataclass(frozen=True)
class Example:
    prompt: str  # what every model was given (shown as is, in a code block)
    expected: str  # the reference answer
    answers: Mapping[str, str]  # each model's response, by column label: {"base": ..., "SFT": ..., "DPO": ...}


@dataclass(frozen=True)
class Tuned:
    """One instruction model's figures: its val loss and its test responses' scores."""

    label: str  # its column: "SFT" (the finetune stage's), "DPO" (the preference stage's)
    model: str  # e.g. "gpt-instruct version 2"
    loss: PerplexityResult  # on the val split
    scores: Scores  # its test responses against the references
    judge: JudgeResult
    hellaswag: HellaSwagResult | None = None  # None: not scored


@dataclass(frozen=True)
class Evaluation:
    """What the evaluate stage found, as the report shows it."""

    base_model: str  # e.g. "gpt-base version 3"
    base_loss: PerplexityResult | MaskedMetrics  # on the val split (an encoder's: its masked-token figures)
    tuned: Sequence[Tuned]  # the instruction models, in column order
    champion: str | None  # the label of the model given the champion alias; None: the holder stays
    histories: Mapping[str, History] = field(default_factory=dict)  # {"pretrain": ..., "finetune": ...}
    examples: Sequence[Example] = ()
    base_hellaswag: HellaSwagResult | None = None  # None: not scored (or an encoder, which cannot be)


def cell(text: str) -> str:
    """`text` as the content of one Markdown table cell: markup escaped, line breaks as <br>."""
    escaped = _MARKUP.sub(r"\\\1", text.strip())
    return "<br>".join(escaped.splitlines()) if escaped else "*(empty)*"


def code_block(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> str:
    """A Markdown table of already-escaped cells; `align` holds "---" or "---:" per column."""
    lines = [header, align or ["---"] * len(header), *rows]
    return "\n".join(f"| {' | '.join(line)} |" for line in lines)


def write_report(folder: str | Path, evaluation: Evaluation, title: str = "Evaluation report") -> Path:
    """Write `report.md` (and `losses.png` when there are loss histories) into `folder`; the report's path."""
    folder = Path(folder)
    curves = {label: history for label, history in evaluation.histories.items() if any(history.values())}
    if curves:
        plot_curves(folder / LOSS_PLOT_FILE, curves)
    sections = [
        f"# {cell(title)}",
        _models(evaluation),
        "## Metrics\n\n" + _metrics(evaluation),
        "## Loss curves\n\n" + (f"![{' and '.join(curves)} loss curves]({LOSS_PLOT_FILE})" if curves
                                else "No loss history was recorded."),
        "## Examples\n\n" + _examples(evaluation.examples),
    ]
    path = folder / REPORT_FILE
    write_text_atomic(path, "\n\n".join(sections) + "\n")
    return path


def _models(e: Evaluation) -> str:
    champion = next((t for t in e.tuned if t.label == e.champion), None)
    return "\n".join([
        f"- **Base model:** {cell(e.base_model)}",
        *(f"- **{cell(t.label)} model:** {cell(t.model)}" for t in e.tuned),
        "- **Promoted to champion:** "
        + (f"{cell(champion.label)} ({cell(champion.model)})" if champion else "none (the holder stays champion)"),
    ])


def _metrics(e: Evaluation) -> str:
    none = "–"
    judge_model = e.tuned[0].judge.model if e.tuned else ""
    base = e.base_loss
    masked = isinstance(base, MaskedMetrics)  # an encoder: no perplexity, its masked-token figures instead
    rows = [
        ["val loss", f"{base.loss:.4f}" + (" (masked tokens)" if masked else ""),
         *(f"{t.loss.loss:.4f}" for t in e.tuned)],
        ["val perplexity", none if masked else _number(base.perplexity),
         *(_number(t.loss.perplexity) for t in e.tuned)],
        ["val bits per byte", none if masked else _number(base.bits_per_byte, 4),
         *(_number(t.loss.bits_per_byte, 4) for t in e.tuned)],
        *([["val masked-token accuracy (top-5)", f"{base.accuracy:.3f} ({base.top5_accuracy:.3f})",
            *(none for _ in e.tuned)]] if masked else []),
        ["exact match", none, *(f"{t.scores.exact_match:.3f} ({round(t.scores.exact_match * t.scores.count)} of "
                                f"{t.scores.count})" for t in e.tuned)],
        ["ROUGE-L F1", none, *(f"{t.scores.rouge_l_f1:.3f}" for t in e.tuned)],
        [cell(f"LLM judge ({judge_model}), 0-100"), none, *(cell(t.judge.summary()) for t in e.tuned)],
    ]
    swags = [e.base_hellaswag, *(t.hellaswag for t in e.tuned)]
    scored = next((r for r in swags if r is not None), None)
    if scored is not None:
        rows += [[f"HellaSwag {cell(name)}", *(none if r is None else f"{getattr(r, name):.4f}" for r in swags)]
                 for name in ("acc", "acc_norm")]
    count = e.tuned[0].scores.count if e.tuned else 0
    loss_note = (f"the base model's over its {base.targets:,} masked tokens of the val split (an encoder), "
                 f"the others' over every next-token target" if masked else
                 f"mean cross-entropy over all {base.tokens:,} next-token targets of the val split")
    notes = (f"Val loss: {loss_note}; bits per byte: the same loss in bits over the UTF-8 bytes of those "
             f"targets (end-of-text left out), which compares across tokenizers. Exact match (ignoring case and "
             f"whitespace) and ROUGE-L F1 (stemmed) over the {count:,} test responses.")
    if scored is not None:
        notes += (f" HellaSwag over {scored.count:,} items, as llm.c scores it: each ending's loss after the "
                  f"context, acc by the summed loss, acc_norm by the mean per token (GPT-2 124M in llm.c: "
                  f"{GPT2_124M['acc']:.4f} and {GPT2_124M['acc_norm']:.4f} on the 10,042 validation items).")
    header = ["metric", "base", *(cell(t.label) for t in e.tuned)]
    return table(header, rows, ["---"] + ["---:"] * (len(header) - 1)) + "\n\n" + notes


def _number(value: float, digits: int = 2) -> str:
    return f"{value:,.{digits}f}" if math.isfinite(value) else str(value)


def _examples(examples: Sequence[Example]) -> str:
    if not examples:
        return "No examples were given."
    parts = []
    for i, example in enumerate(examples, 1):
        row = [cell(example.expected), *(cell(answer) for answer in example.answers.values())]
        parts.append(f"### Example {i}\n\n{code_block(example.prompt)}\n\n"
                     + table(["expected", *(cell(label) for label in example.answers)], [row]))
    return "\n\n".join(parts)
