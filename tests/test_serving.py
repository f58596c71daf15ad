"""The registered model served by `mlflow models serve` answers POST /invocations on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from llm.checkpoint import save_model
from llm.generate import Sampling, generate
from llm.hardware import inference_dtype
from llm.model import GPT, model_config
from llm.tokenizer import get_tokenizer
from llm.tracking import MLflowTracker, log_gpt_model, promote_if_better


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_champion_is_served_and_answers_like_the_model(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    torch.manual_seed(0)
    model = GPT(model_config("tiny")).eval()
    save_model(model, tmp_path / "ckpt")
    with MLflowTracker("serving", "finetune"):
        version = log_gpt_model(tmp_path / "ckpt", "served-model")
    promote_if_better("served-model", version, {"rouge_l_f1": 0.5})

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/served-model@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
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
        body = {"inputs": {"prompt": ["Every effort moves you", "What is the capital of France?"]},
                "params": {"max_new_tokens": 8}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answers = json.loads(response.read())["predictions"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    enc = get_tokenizer()
    model.to(inference_dtype(torch.device("cpu")))  # as the served model generates
    expected = [enc.decode(ids) for ids in generate(
        model, [enc.encode_ordinary(p) for p in body["inputs"]["prompt"]], 8, Sampling(), eos_id=enc.eot_token)]
    assert answers == expected
