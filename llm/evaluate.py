"""The evaluate stage: measure the base and the fine-tuned model, in numbers and in words.

    python -m flows.evaluate                                       (what `dvc repro evaluate` runs)

- Loss and perplexity of both models over the whole val split of the shards (every target once).
- The fine-tuned model answers every held-out test record (the finetune stage's `split.json`), decoded
  with the KV cache; the answers are saved in the book's shape, each record plus `model_response`.
- Exact match and ROUGE-L F1 against the reference outputs; optionally an LLM judge's 0-100 score.
- A few test prompts answered by both models, side by side, for the report.

All of it is computed in fp32 unless `evaluate.precision` asks for bf16, so that the figures and answers
are the same whichever machine runs the stage (llm/hardware.py has the rule).

`evaluate_models` only measures; the flow decides on promotion in the registry and writes the report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from llm.checkpoint import SPLIT_FILE, load_model, read_config, read_history
from llm.config import EvaluateConfig
from llm.generate import Sampling
from llm.hardware import inference_dtype, precision_name, resolve_device
from llm.instructions import TEMPLATES, prompt_text, read_split
from llm.judge import JudgeResult, judge_responses
from llm.perplexity import PerplexityResult, perplexity
from llm.report import Example
from llm.responses import generate_responses
from llm.scores import Scores, score_responses
from llm.shards import TokenStream, check_shards_fit, read_manifest
from llm.tokenizer import get_tokenizer

RESPONSES_FILE = "responses.json"


@dataclasses.dataclass(frozen=True)
class Measurements:
    base_loss: PerplexityResult
    finetuned_loss: PerplexityResult
    responses: list[dict]  # test records with `model_response`
    scores: Scores
    judge: JudgeResult
    examples: list[Example]
    histories: dict[str, dict]
    precision: str  # what the losses and answers were computed in: fp32 or bf16

    def metrics(self) -> dict[str, float]:
        """The headline numbers, for metrics/evaluate.json (`dvc metrics diff`) and MLflow."""
        metrics = {
            "val_loss_base": self.base_loss.loss, "val_perplexity_base": self.base_loss.perplexity,
            "val_loss_finetuned": self.finetuned_loss.loss,
            "val_perplexity_finetuned": self.finetuned_loss.perplexity,
            "eval_tokens_per_s": self.finetuned_loss.tokens_per_s,
            "exact_match": self.scores.exact_match, "rouge_l_f1": self.scores.rouge_l_f1,
            "test_records": float(self.scores.count),
        }
        if self.judge.status == "scored" and self.judge.average is not None:
            metrics.update(judge_score=self.judge.average, judge_scored=float(self.judge.scored),
                           judge_unscored=float(self.judge.unscored))
        return metrics


def evaluate_models(config: EvaluateConfig, base_dir: str | Path, finetuned_dir: str | Path,
                    shards_dir: str | Path) -> Measurements:
    base_dir, finetuned_dir = Path(base_dir), Path(finetuned_dir)
    device = resolve_device(config.device)
    dtype = inference_dtype(device, config.precision)  # fp32 unless asked: scores independent of the host
    autocast_dtype = None if dtype == torch.float32 else dtype
    manifest = read_manifest(shards_dir)
    saved = {folder: read_config(folder) for folder in (base_dir, finetuned_dir)}
    for folder, config_of in saved.items():  # before loading anything: shards of another tokenizer measure nonsense
        check_shards_fit(shards_dir, manifest, folder, config_of.tokenizer, config_of.model.vocab_size)
    base, finetuned = load_model(base_dir, device), load_model(finetuned_dir, device)
    tuned = saved[finetuned_dir]
    tokenizer = get_tokenizer(tuned.tokenizer)
    style = tuned.extra.get("prompt_style", "alpaca")

    val = TokenStream.from_manifest(shards_dir, "val")
    losses = [perplexity(model, val, model.config.context_length, config.batch_size, device, autocast_dtype)
              for model in (base, finetuned)]
    # Decoding reads every weight for each token: bf16 weights (where asked for) halve the bytes, where
    # autocast would convert the fp32 ones at every step.
    for model in (base, finetuned):
        model.to(dtype)

    if not (finetuned_dir / SPLIT_FILE).is_file():
        raise FileNotFoundError(f"{finetuned_dir / SPLIT_FILE} not found: run the finetune stage first "
                                f"(`dvc repro finetune`)")
    tests = read_split(finetuned_dir / SPLIT_FILE).test[:config.test_records]
    records = [dataclasses.asdict(r) for r in tests]
    prompts = [prompt_text(r, style) for r in tests]
    sampling = Sampling(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, seed=config.seed)
    answer = dict(max_new_tokens=config.max_new_tokens, sampling=sampling, batch_size=config.generate_batch_size)
    responses = generate_responses(finetuned, tokenizer, records, prompts, **answer)
    shown = generate_responses(base, tokenizer, records[:config.examples], prompts[:config.examples], **answer)

    references = [r.output for r in tests]
    answers = [r["model_response"] for r in responses]
    # The judge reads the book's format_input: the prompt without its response header.
    judge_inputs = [p.removesuffix(TEMPLATES[style].response) for p in prompts]
    return Measurements(
        base_loss=losses[0], finetuned_loss=losses[1], responses=responses,
        scores=score_responses(answers, references),
        judge=judge_responses(config.judge, judge_inputs, references, answers),
        examples=[Example(prompt=p, expected=r.output, base=b["model_response"], finetuned=f["model_response"])
                  for p, r, b, f in zip(prompts, tests, shown, responses)],
        histories={"pretrain": read_history(base_dir), "finetune": read_history(finetuned_dir)},
        precision=precision_name(dtype),
    )
