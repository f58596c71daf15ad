"""An optional LLM judge, as in the book's chapter 7: a model served by Ollama scores each response 0-100.

    settings = JudgeConfig(url="http://127.0.0.1:11434", model="llama3")
    result = judge_responses(settings, prompts, references, responses)
    result.summary()        # "46.83 (108 of 110 scored)", or "skipped: <why, in one line>"

Each response is sent as the book's ollama_evaluate.py sends it: POST <url>/api/chat with
{"model", "messages": [{"role": "user", "content": <the rubric>}], "options": {"seed": 123,
"temperature": 0, "num_ctx": 2048}}. Ollama streams the answer back as JSON lines, each holding a piece
of `message.content`, the last one "done": true; a non-streamed answer is that one line.

What can go wrong, and what happens:
- No url configured, the server unreachable (connection refused, unknown host), an HTTP error (404 for
  a model that was never pulled), an answer that is not Ollama's, or a request that runs past
  `timeout_s`: the judge stops at that record and the result is "skipped" with one line saying why,
  logged once as a warning. Nothing is raised: the judge is optional, the evaluation goes on without
  it. Stopping at the first failure bounds what a stuck server costs at one timeout; no average is kept
  from the records before it, as it would not compare with a whole test set's.
- An answer without a whole number from 0 to 100 leaves its record unscored, and counted; the average is
  over the scored records.
- An empty response scores 0 without asking the judge, as the book's script does.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from llm.config import JudgeConfig
from llm.validation import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeResult:
    status: Literal["scored", "skipped"]
    model: str
    scores: tuple[int | None, ...] = ()  # per record; None: the answer held no score from 0 to 100
    reason: str | None = None  # why the judge was skipped, in one line

    @property
    def scored(self) -> int:
        return sum(score is not None for score in self.scores)

    @property
    def unscored(self) -> int:
        return len(self.scores) - self.scored

    @property
    def average(self) -> float | None:
        """The mean over the scored records; None when skipped or none was scored."""
        scored = [score for score in self.scores if score is not None]
        return sum(scored) / len(scored) if scored else None

    def summary(self) -> str:
        if self.status == "skipped":
            return f"skipped: {self.reason}"
        average = "no score" if self.average is None else f"{self.average:.2f}"
        return f"{average} ({self.scored} of {len(self.scores)} scored)"


class JudgeUnavailable(RuntimeError):
    """The judge server could not answer a request; the message says why in one line."""


def judge_prompt(prompt: str, reference: str, response: str) -> str:
    """The book's rubric, word for word: generate_model_scores() in rasbt/LLMs-from-scratch,
    ch07/01_main-chapter-code/ollama_evaluate.py (and section 7.8 of the chapter's notebook), where the
    input is format_input(entry), the Alpaca prompt without its "### Response:" header."""
    return (
        f"Given the input `{prompt}` "
        f"and correct output `{reference}`, "
        f"score the model response `{response}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(answer: str) -> int | None:
    """The first number in `answer` if it is a whole number from 0 to 100 ("Score: 85/100" -> 85), else
    None (no number, "-5", "101", "85.5")."""
    match = _NUMBER.search(answer)
    if match is None or "." in match.group():
        return None
    score = int(match.group())
    return score if 0 <= score <= 100 else None


def ask(settings: JudgeConfig, content: str) -> str:
    """The judge's whole answer to one user message; JudgeUnavailable says why there is none."""
    endpoint = settings.endpoint
    options = {"seed": settings.seed, "temperature": settings.temperature, "num_ctx": settings.num_ctx}
    messages = [{"role": "user", "content": content}]
    body = json.dumps({"model": settings.model, "messages": messages, "options": options}).encode("utf-8")
    request = urllib.request.Request(endpoint, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    too_slow = (f"{endpoint} did not answer within {settings.timeout_s:g} s; raise the judge's timeout_s "
                "if it is only slow")
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout_s) as response:
            return _read_answer(response, endpoint, deadline=time.monotonic() + settings.timeout_s)
    except urllib.error.HTTPError as exc:
        raise JudgeUnavailable(f"{endpoint} answered HTTP {exc.code}: {_error_text(exc)}") from None
    except urllib.error.URLError as exc:  # raised while connecting
        if isinstance(exc.reason, TimeoutError):
            raise JudgeUnavailable(too_slow) from None
        raise JudgeUnavailable(f"{endpoint} is not reachable ({exc.reason}); start the server "
                               "(`ollama serve`) or fix the judge's url") from None
    except TimeoutError:  # raised while waiting for the answer or a line of it
        raise JudgeUnavailable(too_slow) from None
    except (OSError, http.client.HTTPException) as exc:
        raise JudgeUnavailable(f"{endpoint}: the connection broke ({type(exc).__name__}: {exc})") from None


def _read_answer(response: http.client.HTTPResponse, endpoint: str, deadline: float) -> str:
    """The message content of Ollama's JSON lines, up to the one that says "done": true."""
    pieces = []
    for line in response:
        if time.monotonic() > deadline:
            raise TimeoutError  # a server that keeps streaming is cut off too
        if not line.strip():
            continue
        try:
            part = json.loads(line)
        except json.JSONDecodeError:
            part = None
        if not isinstance(part, dict):
            raise JudgeUnavailable(f"{endpoint} sent something other than an Ollama chat answer: "
                                   f"{line[:80].decode('utf-8', 'replace')!r}")
        if "error" in part:
            raise JudgeUnavailable(f"{endpoint} answered with an error: {part['error']}")
        pieces.append(str((part.get("message") or {}).get("content", "")))
        if part.get("done"):
            return "".join(pieces)
    raise JudgeUnavailable(f'{endpoint} ended its answer before a line with "done": true')


def _error_text(exc: urllib.error.HTTPError) -> str:
    """Ollama's {"error": "..."} body, else the HTTP reason."""
    try:
        return str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)


def judge_responses(
    settings: JudgeConfig, prompts: Sequence[str], references: Sequence[str], responses: Sequence[str]
) -> JudgeResult:
    """Score each response against its reference and prompt; see the module doc for what can go wrong."""
    if not len(prompts) == len(references) == len(responses):
        raise ValueError(f"got {len(prompts)} prompts, {len(references)} references and {len(responses)} "
                         "responses: give one of each per record")
    problems = list(settings.problems())
    if problems:
        raise ConfigError(problems, source="judge settings")
    if settings.url is None:
        return _skipped(settings, "no judge configured; set its url to an Ollama server, e.g. "
                                  "http://127.0.0.1:11434, to score responses with an LLM")
    scores: list[int | None] = []
    for i, (prompt, reference, response) in enumerate(zip(prompts, references, responses)):
        if not response.strip():
            scores.append(0)  # as the book's ollama_evaluate.py: nothing to judge, nothing right
            continue
        try:
            answer = ask(settings, judge_prompt(prompt, reference, response))
        except JudgeUnavailable as exc:
            return _skipped(settings, f"{exc} (stopped at record {i + 1} of {len(prompts)})")
        score = parse_score(answer)
        if score is None:
            log.info("judge answer for record %d holds no score from 0 to 100: %.200r", i + 1, answer)
        scores.append(score)
    return JudgeResult("scored", settings.model, tuple(scores))


def _skipped(settings: JudgeConfig, reason: str) -> JudgeResult:
    reason = " ".join(reason.split())  # one line, whatever a server's error message holds
    log.warning("LLM judge skipped: %s", reason)
    return JudgeResult("skipped", settings.model, reason=reason)
