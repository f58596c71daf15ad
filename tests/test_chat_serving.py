"""The instruction model's chat interface (llm/pyfunc_chat.py): OpenAI-style chat requests in, chat
completions out, in the checkpoint's prompt format; served by `mlflow models serve` on 127.0.0.1 and
asked with the official openai client and with curl (one server for the module's slow tests)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import types
from collections.abc import Iterator

import pytest
import torch
from mlflow.types.llm import ChatMessage, ChatParams

import llm.pyfunc_chat as pyfunc_chat
from llm.checkpoint import save_model
from llm.config import ServingConfig
from llm.generate import Sampling, generate, load_for_inference
from llm.instructions import Record, prompt_text
from llm.model import GPT, model_config
from llm.pyfunc_chat import ChatGenerator
from llm.registry import log_gpt_model
from llm.tokenizer import get_tokenizer
from llm.tracking import MLflowTracker
from tests.test_serving import served

# Made here directly, the ChatModel warns as MLflow 3 deprecates it (llm/pyfunc_chat.py: why it is used).
pytestmark = pytest.mark.filterwarnings("ignore:.*ChatModel.* is deprecated:FutureWarning")

LIMITS = ServingConfig(max_new_tokens=16, max_prompts=3)
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Name another."}]
QUESTION = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random instruction model (its config names the Alpaca format, as the finetune stage's does)."""
    folder = tmp_path_factory.mktemp("chat") / "ckpt"
    torch.manual_seed(0)
    save_model(GPT(model_config("tiny", context_length=128)).eval(), folder,
               extra={"stage": "finetune", "prompt_style": "alpaca"})
    return folder


@pytest.fixture(scope="module")
def chat_model(checkpoint) -> ChatGenerator:
    """The ChatModel as MLflow loads it, without MLflow."""
    model = ChatGenerator()
    model.load_context(types.SimpleNamespace(artifacts={"checkpoint": str(checkpoint)},
                                             model_config=dataclasses.asdict(LIMITS)))
    return model


def greedy(checkpoint, prompt: str, max_new_tokens: int) -> tuple[int, str]:
    """(the prompt's tokens, the answer) as llm.generate gives them for `prompt`, greedily in fp32."""
    enc = get_tokenizer()
    ids = enc.encode_ordinary(prompt)
    new = generate(load_for_inference(checkpoint), [ids], max_new_tokens, Sampling(), eos_id=enc.eot_token)[0]
    assert len(new) == max_new_tokens  # a random model: no end-of-text, so these answers end at "length"
    return len(ids), enc.decode(new)


def ask(model: ChatGenerator, messages: list[dict], **params) -> dict:
    params = {"temperature": 0.0, **params}
    return model.predict(None, [ChatMessage.from_dict(m) for m in messages], ChatParams(**params)).to_dict()


def streamed(model: ChatGenerator, messages: list[dict], **params) -> list[dict]:
    params = {"temperature": 0.0, **params}
    return [chunk.to_dict() for chunk in
            model.predict_stream(None, [ChatMessage.from_dict(m) for m in messages], ChatParams(**params))]


def test_a_chat_is_answered_as_generate_answers_its_alpaca_prompt(chat_model, checkpoint):
    prompt = prompt_text(Record("Name another.", "", ""), "alpaca", system="Answer briefly.",
                         history=[Record("Name a color.", "", "Blue.")])
    prompt_tokens, expected = greedy(checkpoint, prompt, 12)
    answer = ask(chat_model, CHAT, max_tokens=12)
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert answer["choices"] == [{"index": 0, "message": {"role": "assistant", "content": expected},
                                  "finish_reason": "length"}]
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 12,
                               "total_tokens": prompt_tokens + 12}
    chunks = streamed(chat_model, CHAT, max_tokens=12)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == answer["usage"]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1


def scripted(monkeypatch: pytest.MonkeyPatch, *rows: list[int]) -> None:
    """Make the model 'generate' `rows` (one per choice), to see where answers end."""
    def steps(model, prompts, max_new_tokens, sampling) -> Iterator[torch.Tensor]:
        assert len(prompts) == len(rows)
        for column in list(zip(*rows))[:max_new_tokens]:
            yield torch.tensor(column)

    monkeypatch.setattr(pyfunc_chat, "generate_steps", steps)


def test_an_answer_ends_at_end_of_text_at_a_stop_text_or_where_the_format_goes_on(chat_model, monkeypatch):
    enc = chat_model.tokenizer
    width = 16
    ended = (enc.encode_ordinary("Blue.") + [enc.eot_token] + enc.encode_ordinary(" never" * width))[:width]
    runs_on = (enc.encode_ordinary("Green.\n\n### Instruction:\nName" + " more" * width))[:width]
    stopped = enc.encode_ordinary("Red, then" + " more" * width)[:width]
    scripted(monkeypatch, ended, runs_on, stopped)
    answer = ask(chat_model, QUESTION, max_tokens=width, n=3, stop=[", then"])
    by_format = next(k for k in range(1, width) if "\n\n### Instruction:" in enc.decode(runs_on[:k]))
    by_stop = next(k for k in range(1, width) if ", then" in enc.decode(stopped[:k]))
    assert [(c["message"]["content"], c["finish_reason"]) for c in answer["choices"]] == [
        ("Blue.", "stop"), ("Green.", "stop"), ("Red", "stop")]
    tokens = len(enc.encode_ordinary("Blue.")) + 1 + by_format + by_stop  # end-of-text and stop texts count
    assert answer["usage"]["completion_tokens"] == tokens
    chunks = streamed(chat_model, QUESTION, max_tokens=width, n=3, stop=[", then"])
    texts = [""] * 3
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"]["content"]
    assert texts == ["Blue.", "Green.", "Red"]
    assert [c["finish_reason"] for c in chunks[-1]["choices"]] == ["stop"] * 3
    short = ask(chat_model, QUESTION, max_tokens=2, n=3)
    assert [c["finish_reason"] for c in short["choices"]] == ["length"] * 3
    assert short["usage"]["completion_tokens"] == 6


@pytest.mark.parametrize("messages, params, message", [
    (QUESTION, {"max_tokens": 17},
     "max_tokens 17 is above this model's limit of 16 (serving.max_new_tokens in params.yaml)"),
    (QUESTION, {"n": 4}, "4 choices is above this model's limit of 3 choices per request (serving.max_prompts in"),
    (QUESTION, {"stream": True}, '"stream": true is not served here'),
    (QUESTION, {"temperature": -1.0}, "the request has 1 problem; fix it and rerun:\n  temperature: must be in"),
    ([], {}, 'a chat request needs "messages"'),
    (CHAT[:3], {}, "the chat has no user message to answer at its end"),
    (CHAT[1:3] + CHAT[:1], {}, "messages[2] has role 'system' where a user message belongs"),
    ([{"role": "user", "content": "word " * 200}], {},
     "the conversation's prompt is 231 tokens, above this model's context of 128: send fewer or shorter messages"),
])
def test_requests_beyond_the_model_or_its_caps_are_refused(chat_model, messages, params, message):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as refused:
        ask(chat_model, messages, **params)
    assert message in refused.value.message
    assert refused.value.get_http_status_code() == 400


# ---------------------------------------------------------------------------------------------------
# Served: `mlflow models serve`, the openai client, curl


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """The checkpoint logged and registered as the finetune stage does it, served; (port, model URI)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('chat-store') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        with MLflowTracker("serving", "finetune"):
            version = log_gpt_model(checkpoint, "served-chat", serving=LIMITS)
        model_uri = f"models:/served-chat/{version}"
        with served(model_uri, uri) as port:
            yield port, model_uri


def openai_client(port: int):
    """The official client, its POSTs to {base_url}/chat/completions sent to /invocations, the one route of
    MLflow's scoring server: by a transport of its own, an option the client documents."""
    import httpx2
    import openai

    class Invocations(httpx2.HTTPTransport):
        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            request.url = request.url.copy_with(path="/invocations")
            return super().handle_request(request)

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}", api_key="unused", max_retries=0,
                         http_client=openai.DefaultHttpx2Client(transport=Invocations()))


def curl(port: int, body: dict) -> tuple[int, dict]:
    done = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}/invocations",
                           "-H", "Content-Type: application/json", "-d", json.dumps(body)],
                          capture_output=True, text=True, timeout=60, check=True)
    text, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(text)


@pytest.mark.slow
def test_the_openai_client_and_curl_get_the_answer_generate_gives(server, checkpoint):
    port, _ = server
    prompt_tokens, expected = greedy(checkpoint, prompt_text(Record("Name a color.", "", ""), "alpaca"), 8)
    completion = openai_client(port).chat.completions.create(model="gpt-instruct", messages=QUESTION,
                                                             max_tokens=8, temperature=0)
    assert completion.object == "chat.completion"
    assert [(c.message.role, c.message.content, c.finish_reason) for c in completion.choices] == [
        ("assistant", expected, "length")]
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt_tokens, 8)
    status, answer = curl(port, {"messages": QUESTION, "max_tokens": 8, "temperature": 0})
    assert status == 200
    assert answer.keys() == {"id", "object", "created", "model", "choices", "usage"}
    assert answer["choices"] == [{"index": 0, "message": {"role": "assistant", "content": expected},
                                  "finish_reason": "length"}]
    assert answer["usage"] == completion.usage.model_dump(exclude_none=True)


@pytest.mark.slow
def test_above_the_caps_or_streaming_the_server_answers_400_and_python_streams(server, checkpoint):
    import mlflow
    import openai

    port, model_uri = server
    client = openai_client(port)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt-instruct", messages=QUESTION, max_tokens=5000, temperature=0)
    assert refused.value.status_code == 400
    assert "max_tokens 5000 is above this model's limit of 16 (serving.max_new_tokens in params.yaml)" in str(
        refused.value)
    status, answer = curl(port, {"messages": QUESTION, "max_tokens": 8, "n": 4})
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "4 choices is above this model's limit of 3 choices per request" in answer["message"]
    # The scoring server cannot stream: a clear 400, not a JSON body the client would read as no events.
    with pytest.raises(openai.BadRequestError, match='"stream": true is not served here'):
        client.chat.completions.create(model="gpt-instruct", messages=QUESTION, max_tokens=8, temperature=0,
                                       stream=True)
    # From Python the logged model streams (MLflow's predict_stream): its pieces make the served answer.
    request = {"messages": QUESTION, "max_tokens": 8, "temperature": 0.0}
    chunks = list(mlflow.pyfunc.load_model(model_uri).predict_stream(request))
    _, expected = greedy(checkpoint, prompt_text(Record("Name a color.", "", ""), "alpaca"), 8)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected


@pytest.mark.slow
def test_a_prompt_in_request_is_refused_by_name_as_the_readme_migration_says(server):
    # Instruction models took {"inputs": {"prompt": [...]}} before they chatted; base models still do
    # (tests/test_serving.py), and the README shows the request that replaces it.
    port, _ = server
    status, answer = curl(port, {"inputs": {"prompt": ["Name a color."]}, "params": {"max_new_tokens": 8}})
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "'messages'" in answer["message"] and "required" in answer["message"]
