"""The MLflow model of a GPT checkpoint: a pyfunc that takes prompts and returns completions.

MLflow loads this file itself ("models from code"): `llm.tracking.log_gpt_model` logs it with the
checkpoint folder as an artifact and the `llm` package as code, so the logged model needs nothing else
from this repository:

    mlflow models serve -m "models:/gpt-instruct@champion" --env-manager local -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
         -d '{"inputs": {"prompt": ["Every effort moves you"]}, "params": {"max_new_tokens": 20}}'

Input: a column `prompt` (strings). Params: max_new_tokens, temperature (0: greedy), top_k, top_p, seed.
Output: the completions, prompt not included. tiktoken needs its BPE files: with no network, set
TIKTOKEN_CACHE_DIR in the serving environment.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.models import set_model

DEFAULT_PARAMS = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}


class TextGenerator(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from llm.checkpoint import load_model, read_config
        from llm.hardware import inference_dtype
        from llm.tokenizer import get_tokenizer

        checkpoint = Path(context.artifacts["checkpoint"])
        self.model = load_model(checkpoint)
        self.model.to(inference_dtype(torch.device("cpu")))  # bf16 where the CPU runs it fast
        self.tokenizer = get_tokenizer(read_config(checkpoint).tokenizer)

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        from llm.generate import Sampling, generate

        settings = {**DEFAULT_PARAMS, **(params or {})}
        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        sampling = Sampling(temperature=float(settings["temperature"]), top_k=int(settings["top_k"]) or None,
                            top_p=float(settings["top_p"]) if float(settings["top_p"]) < 1 else None,
                            seed=int(settings["seed"]))
        ids = [self.tokenizer.encode_ordinary(str(p)) for p in prompts]
        outputs = generate(self.model, ids, int(settings["max_new_tokens"]), sampling,
                           eos_id=self.tokenizer.eot_token)
        return [self.tokenizer.decode(out) for out in outputs]


set_model(TextGenerator())
