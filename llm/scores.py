"""Scores of responses against reference answers: exact match and ROUGE-L F1, per record and averaged.

    scores = score_responses([r["model_response"] for r in answered], [r["output"] for r in answered])
    scores.exact_match, scores.rouge_l_f1     # means over the records, each in [0, 1]
    scores.per_record[i]                       # RecordScore(exact_match=1.0, rouge_l_f1=1.0)

Exact match compares the texts after `normalise`: Unicode case folding (`str.casefold`, so "STRASSE"
matches "Straße") and every run of whitespace (spaces, tabs, newlines) made one space, none at either
end. Nothing else is forgiven: punctuation counts, so "Paris" does not match "Paris.".

ROUGE-L F1 is rouge-score's, Google's reimplementation of the original ROUGE script: the longest
common subsequence of the two token lists, F1 = 2PR / (P + R). Its tokenizer lowercases and keeps runs
of ASCII letters and digits only (anything else separates tokens; text in other scripts has none), and
the Porter stemmer is on, as in most reported ROUGE numbers, so "runs" and "running" are one word. A text
without tokens, an empty response say, scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rouge_score.rouge_scorer import RougeScorer

_ROUGE = RougeScorer(["rougeL"], use_stemmer=True)


@dataclass(frozen=True)
class RecordScore:
    exact_match: float  # 1.0 or 0.0
    rouge_l_f1: float


@dataclass(frozen=True)
class Scores:
    per_record: tuple[RecordScore, ...]
    exact_match: float  # the fraction of records that match exactly
    rouge_l_f1: float  # the mean over the records

    @property
    def count(self) -> int:
        return len(self.per_record)


def normalise(text: str) -> str:
    """Case-folded, with each run of whitespace one space and none at the ends."""
    return " ".join(text.casefold().split())


def exact_match(response: str, reference: str) -> float:
    return float(normalise(response) == normalise(reference))


def rouge_l_f1(response: str, reference: str) -> float:
    return _ROUGE.score(target=reference, prediction=response)["rougeL"].fmeasure


def score_responses(responses: Sequence[str], references: Sequence[str]) -> Scores:
    """Each response scored against the reference at the same index, and the means."""
    if len(responses) != len(references):
        raise ValueError(f"got {len(responses)} responses but {len(references)} references: "
                         "give one reference per response")
    if not responses:
        raise ValueError("no responses to score: the test split is empty")
    per_record = tuple(RecordScore(exact_match(response, reference), rouge_l_f1(response, reference))
                       for response, reference in zip(responses, references))
    return Scores(
        per_record=per_record,
        exact_match=sum(s.exact_match for s in per_record) / len(per_record),
        rouge_l_f1=sum(s.rouge_l_f1 for s in per_record) / len(per_record),
    )
