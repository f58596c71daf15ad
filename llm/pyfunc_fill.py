"""The MLflow model of an encoder checkpoint (model.objective: masked): texts with [MASK] in, guesses out.

Logged by `llm.registry.log_gpt_model` like the text generator (llm/pyfunc.py), models from code with
the checkpoint as an artifact and the `llm` package as code:

    mlflow models serve -m "models:/encoder-base/latest" --env-manager local -p 5003
    curl -s 127.0.0.1:5003/invocations -H 'Content-Type: application/json' \
         -d '{"inputs": {"text": ["The capital of France is [MASK]."]}, "params": {"top_k": 3}}'

Input: a column `text` (strings, each with at least one [MASK]). Params: top_k (guesses per mask).
Output: one row per guess: `text` (the text's index in the request), `mask` (the mask's, from 1),
`rank` (from 1), `token` and `probability`; computed in fp32, the same on every machine. At most
`serving.max_prompts` texts per request, as for the other models.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from llm.pyfunc import check_request, serving_limits

DEFAULT_PARAMS = {"top_k": 5}
COLUMNS = ["text", "mask", "rank", "token", "probability"]


class MaskFiller(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from llm.checkpoint import read_config
        from llm.generate import load_for_inference
        from llm.tokenizer import get_tokenizer

        checkpoint = Path(context.artifacts["checkpoint"])
        self.model = load_for_inference(checkpoint)
        self.tokenizer = get_tokenizer(read_config(checkpoint).tokenizer)

    def predict(self, context, model_input, params: dict | None = None):
        import pandas as pd

        from llm.fill import fill

        texts = [str(t) for t in (model_input["text"] if hasattr(model_input, "columns") else model_input)]
        top_k = int({**DEFAULT_PARAMS, **(params or {})}["top_k"])
        check_request(serving_limits(getattr(context, "model_config", None)), len(texts), 0, what="texts")
        rows = []
        for i, text in enumerate(texts):
            try:
                fills = fill(self.model, self.tokenizer, text, top_k)
            except ValueError as exc:  # no mask, too long: the client's to fix
                raise MlflowException(f"text {i}: {exc}", error_code=INVALID_PARAMETER_VALUE) from exc
            rows += [(i, mask, rank, token, p) for mask, guesses in enumerate(fills, start=1)
                     for rank, (token, p) in enumerate(guesses, start=1)]
        return pd.DataFrame(rows, columns=COLUMNS)


set_model(MaskFiller())
