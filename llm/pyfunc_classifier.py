"""The MLflow model of a classifier checkpoint: a pyfunc that takes texts and returns their labels.

Logged by `llm.registry.log_gpt_model` like the text generator (llm/pyfunc.py), models from code with
the checkpoint as an artifact and the `llm` package as code:

    mlflow models serve -m "models:/gpt-classifier/latest" --env-manager local -p 5002
    curl -s 127.0.0.1:5002/invocations -H 'Content-Type: application/json' \
         -d '{"inputs": {"text": ["You won a free cruise, call now", "See you at lunch?"]}}'

Input: a column `text` (strings). Output: one row per text, `label` (the most probable class),
`probability` (its probability) and `p_<class>` for every class. At most `serving.max_prompts` texts
per request (the model's `model_config`); above it the server answers HTTP 400. Scores are computed in
fp32, the same on every machine.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.models import set_model

from llm.pyfunc import check_request, serving_limits


class TextClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from llm.classify import Classifier

        self.classifier = Classifier(Path(context.artifacts["checkpoint"]))

    def predict(self, context, model_input, params: dict | None = None):
        import pandas as pd

        texts = [str(t) for t in (model_input["text"] if hasattr(model_input, "columns") else model_input)]
        check_request(serving_limits(getattr(context, "model_config", None)), len(texts), 0, what="texts")
        rows = [{"label": label, "probability": probs[label], **{f"p_{k}": v for k, v in probs.items()}}
                for label, probs in self.classifier(texts)]
        return pd.DataFrame(rows, columns=["label", "probability", *(f"p_{k}" for k in self.classifier.labels)])


set_model(TextClassifier())
