"""The LLM judge against a real HTTP server on 127.0.0.1 that speaks Ollama's /api/chat."""

import logging
import re
import socket
import time

import pytest

from llm.config import JudgeConfig
from llm.judge import JudgeResult, judge_prompt, judge_responses, parse_score
from llm.validation import ConfigError
from tests.fileserver import FileServer
from tests.ollama_server import OllamaServer

PROMPTS = ["### Instruction:\nName the capital of France.", "### Instruction:\nSay hi.",
           "### Instruction:\nSort 2, 1"]
REFERENCES = ["Paris.", "Hi!", "1, 2"]
RESPONSES = ["The capital of France is Paris.", "Hello there.", "2, 1"]


def settings(url: str | None, **overrides) -> JudgeConfig:
    return JudgeConfig(url=url, model="judge-model", **overrides)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_the_rubric_is_the_books_word_for_word():
    assert judge_prompt("P", "R", "M") == (
        "Given the input `P` and correct output `R`, score the model response `M` on a scale from 0 to 100, "
        "where 100 is the best score. Respond with the integer number only.")


def test_streamed_answers_are_parsed_and_averaged_with_the_books_request():
    with OllamaServer(answers=["85", "Score: 92/100", "40"]) as server:
        result = judge_responses(settings(server.url), PROMPTS, REFERENCES, RESPONSES)

    assert result == JudgeResult("scored", "judge-model", (85, 92, 40))
    assert (result.scored, result.unscored, result.average) == (3, 0, pytest.approx(217 / 3))
    assert result.summary() == "72.33 (3 of 3 scored)"
    assert server.requests[0] == {
        "path": "/api/chat",
        "model": "judge-model",
        "messages": [{"role": "user", "content": judge_prompt(PROMPTS[0], REFERENCES[0], RESPONSES[0])}],
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048},
    }


def test_a_non_streamed_answer_and_a_url_naming_the_chat_api_work_too():
    with OllamaServer(answers=["77"], stream=False) as server:
        result = judge_responses(settings(f"{server.url}/api/chat/"), PROMPTS[:1], REFERENCES[:1],
                                 RESPONSES[:1])
    assert result.scores == (77,)
    assert server.requests[0]["path"] == "/api/chat"


def test_garbled_answers_leave_their_records_unscored_and_counted():
    with OllamaServer(answers=["I cannot judge this response.", "120", "70"]) as server:
        result = judge_responses(settings(server.url), PROMPTS, REFERENCES, RESPONSES)
    assert result == JudgeResult("scored", "judge-model", (None, None, 70))
    assert (result.scored, result.unscored, result.average) == (1, 2, 70.0)
    assert result.summary() == "70.00 (1 of 3 scored)"


def test_an_empty_response_scores_zero_without_asking():
    with OllamaServer(answers=["90"]) as server:
        result = judge_responses(settings(server.url), PROMPTS[:2], REFERENCES[:2], ["", "Hello there."])
    assert result.scores == (0, 90)
    assert len(server.requests) == 1


@pytest.mark.parametrize("answer, score", [
    ("85", 85), (" 100\n", 100), ("0", 0), ("Score: 92/100", 92), ("I'd give it 7 out of 10", 7),
    ("101", None), ("-5", None), ("85.5", None), ("great answer", None), ("", None),
])
def test_the_score_is_the_first_whole_number_from_0_to_100(answer, score):
    assert parse_score(answer) == score


def test_a_server_slower_than_the_timeout_skips_the_judge_at_once(caplog):
    with OllamaServer(answers=["85"], delay_s=5) as server:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="llm.judge"):
            result = judge_responses(settings(server.url, timeout_s=0.3), PROMPTS, REFERENCES, RESPONSES)
        elapsed = time.monotonic() - start
    reason = (f"{server.url}/api/chat did not answer within 0.3 s; raise the judge's timeout_s if it is only "
              "slow (stopped at record 1 of 3)")
    assert result == JudgeResult("skipped", "judge-model", reason=reason)
    assert result.summary() == f"skipped: {reason}"
    assert len(server.requests) == 1  # the first timeout ends the judge: no waiting on every record
    assert elapsed < 2
    assert [r.getMessage() for r in caplog.records] == [f"LLM judge skipped: {reason}"]


def test_an_answer_still_streaming_at_the_timeout_is_cut_off():
    with OllamaServer(answers=["8" * 30], line_delay_s=0.2) as server:  # 11 lines, 2.2 s
        start = time.monotonic()
        result = judge_responses(settings(server.url, timeout_s=0.5), PROMPTS[:1], REFERENCES[:1],
                                 RESPONSES[:1])
        elapsed = time.monotonic() - start
    assert result.status == "skipped"
    assert result.reason.startswith(f"{server.url}/api/chat did not answer within 0.5 s")
    assert elapsed < 1.5


def test_an_unreachable_server_is_skipped_with_one_clear_line(caplog):
    url = closed_port_url()
    with caplog.at_level(logging.WARNING, logger="llm.judge"):
        result = judge_responses(settings(url), PROMPTS, REFERENCES, RESPONSES)
    assert result.status == "skipped" and result.scores == () and result.average is None
    assert re.fullmatch(
        rf"{url}/api/chat is not reachable \(\[Errno 111\] Connection refused\); start the server "
        r"\(`ollama serve`\) or fix the judge's url \(stopped at record 1 of 3\)", result.reason)
    assert [r.getMessage() for r in caplog.records] == [f"LLM judge skipped: {result.reason}"]


def test_an_unknown_host_is_skipped_like_an_unreachable_one(monkeypatch):
    def no_such_host(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    result = judge_responses(settings("http://judge.invalid:11434"), PROMPTS, REFERENCES, RESPONSES)
    assert result.reason == ("http://judge.invalid:11434/api/chat is not reachable ([Errno -2] Name or service "
                             "not known); start the server (`ollama serve`) or fix the judge's url "
                             "(stopped at record 1 of 3)")


def test_a_server_that_is_not_ollama_is_skipped_with_its_http_status():
    with FileServer() as server:  # answers GET only
        result = judge_responses(settings(server.url("")), PROMPTS, REFERENCES, RESPONSES)
    assert result.reason == (f"{server.url('')}/api/chat answered HTTP 501: Unsupported method ('POST') "
                             "(stopped at record 1 of 3)")


def test_a_model_the_server_lacks_is_skipped_with_ollamas_message():
    missing = 'model "judge-model" not found, try pulling it first'
    with OllamaServer(error=(404, missing)) as server:
        result = judge_responses(settings(server.url), PROMPTS, REFERENCES, RESPONSES)
    assert result.reason == f"{server.url}/api/chat answered HTTP 404: {missing} (stopped at record 1 of 3)"


def test_no_url_means_no_judge():
    result = judge_responses(JudgeConfig(), PROMPTS, REFERENCES, RESPONSES)
    assert result.summary() == ("skipped: no judge configured; set its url to an Ollama server, e.g. "
                                "http://127.0.0.1:11434, to score responses with an LLM")


def test_bad_settings_are_named():
    with pytest.raises(ConfigError) as raised:
        judge_responses(JudgeConfig(url="127.0.0.1:11434", model=" ", timeout_s=0), ["p"], ["r"], ["m"])
    assert raised.value.problems == [
        ("url", "must be an http(s) URL of an Ollama server, e.g. http://127.0.0.1:11434, "
                "got '127.0.0.1:11434'"),
        ("model", "must name a model the judge server has, e.g. llama3"),
        ("timeout_s", "must be > 0, got 0"),
    ]


def test_an_error_inside_the_answer_stream_skips_the_judge():
    with OllamaServer(error=(200, "model runner has\nunexpectedly stopped")) as server:
        result = judge_responses(settings(server.url), PROMPTS, REFERENCES, RESPONSES)
    assert result.reason == (f"{server.url}/api/chat answered with an error: model runner has unexpectedly "
                             "stopped (stopped at record 1 of 3)")
