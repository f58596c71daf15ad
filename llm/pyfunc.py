"""The MLflow model of a base GPT checkpoint: a pyfunc that takes prompts and returns completions.

MLflow loads this file itself ("models from code"): `llm.registry.log_gpt_model` logs it with the
checkpoint folder as an artifact and the `llm` package as code, so the logged model needs nothing else
from this repository:

    mlflow models serve -m "models:/gpt-base/latest" --env-manager local -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
         -d '{"inputs": {"prompt": ["Every effort moves you"]}, "params": {"max_new_tokens": 20}}'

An instruction-tuned checkpoint (one whose config names a prompt format) is logged as a chat model
instead, llm/pyfunc_chat.py, which also says why.

Input: a column `prompt` (strings). Params: max_new_tokens (default 64, or the cap if lower), temperature
(0: greedy), top_k, top_p, seed.
Output: the completions, prompt not included, computed in fp32 on the CPU, so that they do not depend on
the machine that serves them (llm/hardware.py has the precision rule). tiktoken needs its BPE files: with
no network, set TIKTOKEN_CACHE_DIR in the serving environment.

A request may ask for at most `max_prompts` prompts and `max_new_tokens` tokens, the `serving` section
of params.yaml as it was when the model was logged (its `model_config`); above either the model raises
an INVALID_PARAMETER_VALUE error, which the scoring server answers with HTTP 400.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

DEFAULT_MAX_NEW_TOKENS = 64  # per prompt, for a request that does not say, where the cap allows


def default_max_new_tokens(limits: Mapping[str, int]) -> int:
    """The tokens per prompt of a request that does not say: within the model's cap, so that such a request
    is never refused for asking too many (the text generator's max_new_tokens, the chat model's max_tokens)."""
    return min(DEFAULT_MAX_NEW_TOKENS, limits["max_new_tokens"])


def default_params(limits: Mapping[str, int]) -> dict[str, Any]:
    """The params a request gets for those it leaves out (the logged signature's defaults)."""
    return {"max_new_tokens": default_max_new_tokens(limits), "temperature": 0.0, "top_k": 0, "top_p": 1.0,
            "seed": 0}


def serving_limits(model_config: Mapping[str, Any] | None) -> dict[str, int]:
    """The caps a logged model enforces; a model logged before it had any gets the defaults."""
    from llm.config import ServingConfig

    defaults = dataclasses.asdict(ServingConfig())
    return {key: int((model_config or {}).get(key, value)) for key, value in defaults.items()}


def check_request(limits: Mapping[str, int], prompts: int, max_new_tokens: int, what: str = "prompts",
                  tokens_param: str = "max_new_tokens") -> None:
    """Refuse (HTTP 400 when served) a request above `limits`: `prompts` counts `what` the request asks
    for, `max_new_tokens` the tokens per prompt, which the request names `tokens_param`."""
    if prompts > limits["max_prompts"]:
        raise MlflowException(f"{prompts} {what} is above this model's limit of {limits['max_prompts']} {what} "
                              f"per request (serving.max_prompts in params.yaml)", error_code=INVALID_PARAMETER_VALUE)
    if max_new_tokens > limits["max_new_tokens"]:
        raise MlflowException(f"{tokens_param} {max_new_tokens} is above this model's limit of "
                              f"{limits['max_new_tokens']} (serving.max_new_tokens in params.yaml)",
                              error_code=INVALID_PARAMETER_VALUE)


class TextGenerator(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from llm.checkpoint import read_config
        from llm.generate import load_for_inference
        from llm.tokenizer import get_tokenizer

        checkpoint = Path(context.artifacts["checkpoint"])
        self.model = load_for_inference(checkpoint)  # in fp32: the same completions on whichever CPU serves it
        self.tokenizer = get_tokenizer(read_config(checkpoint).tokenizer)

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        from llm.generate import Sampling, generate

        limits = serving_limits(getattr(context, "model_config", None))
        settings = {**default_params(limits), **(params or {})}
        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        check_request(limits, len(prompts), int(settings["max_new_tokens"]))
        sampling = Sampling(temperature=float(settings["temperature"]), top_k=int(settings["top_k"]) or None,
                            top_p=float(settings["top_p"]) if float(settings["top_p"]) < 1 else None,
                            seed=int(settings["seed"]))
        ids = [self.tokenizer.encode_ordinary(str(p)) for p in prompts]
        outputs = generate(self.model, ids, int(settings["max_new_tokens"]), sampling,
                           eos_id=self.tokenizer.eot_token)
        return [self.tokenizer.decode(out) for out in outputs]


set_model(TextGenerator())
