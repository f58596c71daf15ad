"""The registered model served by `mlflow models serve` answers POST /invocations on 127.0.0.1, and
refuses with HTTP 400 a request above the serving caps it was logged with."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flows.server import free_port
from llm.checkpoint import save_model
from llm.config import ServingConfig
from llm.generate import Sampling, generate
from llm.hardware import inference_dtype
from llm.model import GPT, model_config
from llm.tokenizer import get_tokenizer
from llm.evaluate import promote_if_better
from llm.registry import log_gpt_model
from llm.tracking import MLflowTracker


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str) -> Iterator[int]:
    """`mlflow models serve` of `model_uri` on a free port of 127.0.0.1, up and answering /ping; yields the port."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the model server did not come up in 120 s"
                time.sleep(0.5)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def invoke(port: int, body: dict) -> tuple[int, dict]:
    """POST /invocations: (HTTP status, the JSON answer), for errors too."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_the_champion_is_served_and_answers_like_the_model(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    torch.manual_seed(0)
    model = GPT(model_config("tiny")).eval()
    save_model(model, tmp_path / "ckpt")
    with MLflowTracker("serving", "finetune"):
        version = log_gpt_model(tmp_path / "ckpt", "served-model", serving=ServingConfig(max_new_tokens=16,
                                                                                          max_prompts=3))
    promote_if_better("served-model", version, {"rouge_l_f1": 0.5})

    with served("models:/served-model@champion", uri) as port:
        body = {"inputs": {"prompt": ["Every effort moves you", "What is the capital of France?"]},
                "params": {"max_new_tokens": 8}}
        status, answer = invoke(port, body)
        assert status == 200, answer
        answers = answer["predictions"]
        status, refused = invoke(port, {**body, "params": {"max_new_tokens": 5000}})
        assert status == 400 and refused["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "max_new_tokens 5000 is above this model's limit of 16 (serving.max_new_tokens" in refused["message"]
        status, refused = invoke(port, {"inputs": {"prompt": ["hi"] * 4}, "params": {"max_new_tokens": 8}})
        assert status == 400 and refused["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "4 prompts is above this model's limit of 3 prompts per request" in refused["message"]
        assert invoke(port, {"inputs": {"prompt": ["hi"] * 3}, "params": {"max_new_tokens": 16}})[0] == 200
        # No params: the signature's defaults, whose token count stays within the cap (16, below the usual 64).
        status, defaulted = invoke(port, {"inputs": body["inputs"]})
        assert status == 200, defaulted
    enc = get_tokenizer()
    model.to(inference_dtype(torch.device("cpu")))  # as the served model generates
    ids = [enc.encode_ordinary(p) for p in body["inputs"]["prompt"]]
    assert answers == [enc.decode(out) for out in generate(model, ids, 8, Sampling(), eos_id=enc.eot_token)]
    assert defaulted["predictions"] == [enc.decode(out) for out in generate(model, ids, 16, Sampling(),
                                                                            eos_id=enc.eot_token)]


@pytest.mark.slow
def test_a_registered_classifier_is_served_texts_in_labels_and_probabilities_out(tmp_path, monkeypatch):
    from llm.classify import Classifier, classifier_from

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    torch.manual_seed(0)
    model = classifier_from(GPT(model_config("tiny")), num_classes=2, pooling="last", seed=0)
    save_model(model, tmp_path / "ckpt", extra={"labels": ["ham", "spam"], "max_length": 16})
    with MLflowTracker("serving", "classify"):
        version = log_gpt_model(tmp_path / "ckpt", "served-classifier", serving=ServingConfig(max_prompts=2))
    texts = ["You won a free cruise, call now", "See you at lunch?"]
    with served(f"models:/served-classifier/{version}", uri) as port:
        status, answer = invoke(port, {"inputs": {"text": texts}})
        status_over, refused = invoke(port, {"inputs": {"text": texts * 2}})
    assert status == 200, answer
    expected = Classifier(tmp_path / "ckpt")(texts)
    assert [row["label"] for row in answer["predictions"]] == [label for label, _ in expected]
    for row, (label, probs) in zip(answer["predictions"], expected):
        assert row["probability"] == pytest.approx(probs[label], abs=1e-6)
        assert (row["p_ham"], row["p_spam"]) == pytest.approx((probs["ham"], probs["spam"]), abs=1e-6)
    assert status_over == 400 and "4 texts is above this model's limit of 2 texts per request" in refused["message"]
