"""The evaluate stage: measure the base model and every instruction model, in numbers and in words.

    python -m flows.evaluate                                       (what `dvc repro evaluate` runs)

- Loss, perplexity and bits per byte of each model over the whole val split of the shards (every target
  once). A base
  model that is an encoder (model.objective: masked; the instruction models are GPTs, started from a GPT-2
  size say) has no perplexity: its masked-token loss and accuracies are measured instead
  (llm.masking.split_metrics), and it answers no prompts.
- Each instruction model (the finetune stage's SFT model, the preference stage's DPO model) answers every
  held-out test record (the finetune stage's `split.json`; the preference stage splits the same records
  the same way), decoded with the KV cache; the answers are saved in the book's shape, each record plus
  `model_response`.
- Exact match and ROUGE-L F1 against the reference outputs; optionally an LLM judge's 0-100 score.
- With `evaluate.hellaswag` set, every causal model's HellaSwag acc and acc_norm, scored as llm.c scores
  them (llm/hellaswag.py).
- A few test prompts answered by every model, base, SFT and DPO side by side, for the report.

All of it is computed in fp32 unless `evaluate.precision` asks for bf16, so that the figures and answers
are the same whichever machine runs the stage (llm/hardware.py has the rule).

`evaluate_models` only measures; `promote_best` applies the champion rule in the registry and
`write_evaluation` writes the answers and the report.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from llm.checkpoint import SPLIT_FILE, load_model, read_config, read_history
from llm.config import EvaluateConfig
from llm.generate import Sampling
from llm.hardware import inference_dtype, precision_name, resolve_device
from llm.hellaswag import HellaSwagResult, Item, hellaswag
from llm.instructions import TEMPLATES, prompt_text, read_split
from llm.judge import JudgeResult, judge_responses
from llm.masking import MaskedMetrics, split_metrics
from llm.perplexity import PerplexityResult, perplexity, token_byte_lengths
from llm.registry import CHAMPION, champion, record_scores, set_champion
from llm.report import Evaluation, Example, Tuned, write_report
from llm.responses import generate_responses, write_responses
from llm.scores import Scores, score_responses
from llm.shards import TokenStream, check_shards_fit, read_manifest
from llm.tokenizer import get_tokenizer

RESPONSES_FILE = "responses.json"  # the finetune model's answers; another stage's: responses_<stage>.json
# The stages that make instruction models, and their columns in the report.
INSTRUCTION_STAGES = {"finetune": "SFT", "preference": "DPO"}


# What the report shows as an encoder base model's answer.
ENCODER_ANSWER = "(an encoder, model.objective: masked: it fills in masks and writes no text)"


def responses_file(stage: str) -> str:
    return RESPONSES_FILE if stage == "finetune" else f"responses_{stage}.json"


def metric_key(name: str, stage: str) -> str:
    """A tuned model's metric in metrics/evaluate.json: the finetune model's keep the names they have always
    had (exact_match, rouge_l_f1, val_loss_finetuned, ...), so `dvc metrics diff` compares across commits;
    another stage's carry its name (rouge_l_f1_preference, val_loss_preference). A figure the base model has
    too (val_*, hellaswag_*) names the model it is of: val_loss_base, hellaswag_acc_finetuned."""
    if name.startswith(("val_", "hellaswag_")):
        return f"{name}_finetuned" if stage == "finetune" else f"{name}_{stage}"
    return name if stage == "finetune" else f"{name}_{stage}"


@dataclasses.dataclass(frozen=True)
class TunedMeasurements:
    loss: PerplexityResult
    responses: list[dict]  # test records with `model_response`
    scores: Scores
    judge: JudgeResult
    hellaswag: HellaSwagResult | None = None  # None: not scored (evaluate.hellaswag unset)

    def metrics(self) -> dict[str, float]:
        metrics = {"val_loss": self.loss.loss, "val_perplexity": self.loss.perplexity,
                   "val_bits_per_byte": self.loss.bits_per_byte,
                   "exact_match": self.scores.exact_match, "rouge_l_f1": self.scores.rouge_l_f1}
        if self.hellaswag is not None:
            metrics.update(hellaswag_acc=self.hellaswag.acc, hellaswag_acc_norm=self.hellaswag.acc_norm)
        if self.judge.status == "scored" and self.judge.average is not None:
            metrics.update(judge_score=self.judge.average, judge_scored=float(self.judge.scored),
                           judge_unscored=float(self.judge.unscored))
        return metrics


@dataclasses.dataclass(frozen=True)
class Measurements:
    base_loss: PerplexityResult | MaskedMetrics  # an encoder's (model.objective: masked): masked-token figures
    tuned: dict[str, TunedMeasurements]  # by stage, finetune first
    examples: list[Example]
    histories: dict[str, dict]
    precision: str  # what the losses and answers were computed in: fp32 or bf16
    base_hellaswag: HellaSwagResult | None = None  # None: not scored (evaluate.hellaswag unset, or an encoder)

    def metrics(self) -> dict[str, float]:
        """The headline numbers, for metrics/evaluate.json (`dvc metrics diff`) and MLflow."""
        first = next(iter(self.tuned.values()))
        base = self.base_loss
        metrics = ({f"val_masked_{name}_base": getattr(base, name) for name in ("loss", "accuracy", "top5_accuracy")}
                   if isinstance(base, MaskedMetrics) else
                   {"val_loss_base": base.loss, "val_perplexity_base": base.perplexity,
                    "val_bits_per_byte_base": base.bits_per_byte})
        metrics.update(eval_tokens_per_s=first.loss.tokens_per_s, test_records=float(first.scores.count))
        if self.base_hellaswag is not None:
            metrics.update(hellaswag_acc_base=self.base_hellaswag.acc,
                           hellaswag_acc_norm_base=self.base_hellaswag.acc_norm)
        scored = [r for r in (self.base_hellaswag, first.hellaswag) if r is not None]
        if scored:
            metrics.update(hellaswag_items=float(scored[0].count))  # every model scores the same items
        for stage, measured in self.tuned.items():
            metrics.update({metric_key(name, stage): value for name, value in measured.metrics().items()})
        return metrics


def evaluate_models(config: EvaluateConfig, base_dir: str | Path, tuned_dirs: Mapping[str, str | Path],
                    shards_dir: str | Path, hellaswag_items: Sequence[Item] | None = None) -> Measurements:
    """Measure the base model and each instruction model of `tuned_dirs` ({stage: folder}, finetune first:
    its `split.json` holds the test records every model answers); with `hellaswag_items`
    (llm.hellaswag.read_items), score each causal model on them too."""
    base_dir = Path(base_dir)
    tuned_dirs = {stage: Path(folder) for stage, folder in tuned_dirs.items()}
    finetuned_dir = next(iter(tuned_dirs.values()))
    device = resolve_device(config.device)
    dtype = inference_dtype(device, config.precision)  # fp32 unless asked: scores independent of the host
    autocast_dtype = None if dtype == torch.float32 else dtype
    manifest = read_manifest(shards_dir)
    folders = {"base": base_dir, **tuned_dirs}
    saved = {name: read_config(folder) for name, folder in folders.items()}
    for name, folder in folders.items():  # before loading anything: shards of another tokenizer measure nonsense
        check_shards_fit(shards_dir, manifest, folder, saved[name].tokenizer, saved[name].model.vocab_size)
    if not (finetuned_dir / SPLIT_FILE).is_file():
        raise FileNotFoundError(f"{finetuned_dir / SPLIT_FILE} not found: run the finetune stage first "
                                f"(`dvc repro finetune`)")
    tests = read_split(finetuned_dir / SPLIT_FILE).test[:config.test_records]
    records = [dataclasses.asdict(r) for r in tests]
    first = saved[next(iter(tuned_dirs))]
    tokenizer = get_tokenizer(first.tokenizer)
    style = first.extra.get("prompt_style", "alpaca")
    prompts = [prompt_text(r, style) for r in tests]
    references = [r.output for r in tests]
    # The judge reads the book's format_input: the prompt without its response header.
    judge_inputs = [p.removesuffix(TEMPLATES[style].response) for p in prompts]
    sampling = Sampling(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, seed=config.seed)
    answer = dict(max_new_tokens=config.max_new_tokens, sampling=sampling, batch_size=config.generate_batch_size)
    val = TokenStream.from_manifest(shards_dir, "val")
    token_bytes = token_byte_lengths(get_tokenizer(manifest["tokenizer"]))

    def measure(folder: Path, name: str) -> tuple[PerplexityResult, HellaSwagResult | None, torch.nn.Module]:
        model = load_model(folder, device)
        loss = perplexity(model, val, model.config.context_length, config.batch_size, device, autocast_dtype,
                          token_bytes=token_bytes)
        swag = None if hellaswag_items is None else hellaswag(
            model, hellaswag_items, get_tokenizer(saved[name].tokenizer), config.batch_size, autocast_dtype)
        # Decoding reads every weight for each token: bf16 weights (where asked for) halve the bytes, where
        # autocast would convert the fp32 ones at every step.
        return loss, swag, model.to(dtype)

    base_hellaswag: HellaSwagResult | None = None
    if saved["base"].model.is_encoder:  # no perplexity, no HellaSwag, no text: its masked-token figures instead
        encoder = load_model(base_dir, device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            base_loss: PerplexityResult | MaskedMetrics = split_metrics(encoder, val, config.batch_size, config.seed)
        shown = {"base": [ENCODER_ANSWER] * min(config.examples, len(prompts))}
        del encoder
    else:
        base_loss, base_hellaswag, base = measure(base_dir, "base")
        shown = {"base": [r["model_response"] for r in generate_responses(
            base, tokenizer, records[:config.examples], prompts[:config.examples], **answer)]}
        del base
    tuned: dict[str, TunedMeasurements] = {}
    for stage, folder in tuned_dirs.items():  # one model in memory at a time
        loss, swag, model = measure(folder, stage)
        responses = generate_responses(model, tokenizer, records, prompts, **answer)
        answers = [r["model_response"] for r in responses]
        tuned[stage] = TunedMeasurements(loss, responses, score_responses(answers, references),
                                         judge_responses(config.judge, judge_inputs, references, answers), swag)
        shown[INSTRUCTION_STAGES.get(stage, stage)] = answers[:config.examples]
    return Measurements(
        base_loss=base_loss, tuned=tuned,
        examples=[Example(prompt=p, expected=r.output, answers={label: shown[label][i] for label in shown})
                  for i, (p, r) in enumerate(zip(prompts[:config.examples], tests))],
        histories={"pretrain": read_history(base_dir), **{stage: read_history(f) for stage, f in tuned_dirs.items()}},
        precision=precision_name(dtype),
        base_hellaswag=base_hellaswag,
    )


# ---------------------------------------------------------------------------------------------------
# Which instruction model is the best


def primary_score(tuned: Mapping[str, TunedMeasurements]) -> str:
    """What decides the champion: the judge's score when it scored every model, else ROUGE-L F1."""
    scored = all("judge_score" in m.metrics() for m in tuned.values())
    return "judge_score" if scored else "rouge_l_f1"


def best_stage(tuned: Mapping[str, TunedMeasurements]) -> str:
    """The stage whose model scores highest by `primary_score`; on a tie the earlier stage (finetune's
    model, the simpler one)."""
    key = primary_score(tuned)
    return max(tuned, key=lambda stage: (tuned[stage].metrics()[key], -list(tuned).index(stage)))


def promote_if_better(name: str, version: str, scores: Mapping[str, float],
                      alias: str = CHAMPION) -> tuple[bool, str | None]:
    """Record `scores` on the version (tags `eval.<name>`), and move `alias` to it when every score it
    shares with the alias holder is at least as high, or when no version holds the alias.
    Returns (promoted, the version that held the alias before, if any)."""
    record_scores(name, version, scores)
    holder = champion(name, alias)
    if holder is not None and holder[0] != str(version):
        theirs = holder[1]
        if any(scores[key] < theirs[key] for key in scores if key in theirs):
            return False, holder[0]
    set_champion(name, version, alias)
    return True, None if holder is None else holder[0]


SCORES = ("exact_match", "rouge_l_f1", "judge_score")  # recorded on each version; losses are not scores


@dataclasses.dataclass(frozen=True)
class Promotion:
    best: str  # the stage whose model scored highest by `key`
    key: str  # the primary score
    promoted: bool  # whether that model now holds the champion alias
    previous: str | None  # the version that held it before, if any


def promote_best(measured: Measurements, names: Mapping[str, str], versions: Mapping[str, str]) -> Promotion:
    """Record each instruction model's scores on its registered version (`names[stage]`, `versions[stage]`),
    and promote the best by the primary score when it is at least the current champion's."""
    for stage, version in versions.items():
        record_scores(names[stage], version, {k: v for k, v in measured.tuned[stage].metrics().items() if k in SCORES})
    best, key = best_stage(measured.tuned), primary_score(measured.tuned)
    promoted, previous = promote_if_better(names[best], versions[best], {key: measured.tuned[best].metrics()[key]})
    return Promotion(best, key, promoted, previous)


def write_evaluation(folder: Path, measured: Measurements, base_model: str, models: Mapping[str, str],
                     promotion: Promotion) -> Path:
    """Each instruction model's responses (`responses_file`) and the report into `folder`; the report's path.
    `base_model` and `models` ({stage: ...}) name the registered versions, e.g. "gpt-instruct version 2"."""
    for stage, tuned in measured.tuned.items():
        write_responses(folder / responses_file(stage), tuned.responses)
    label = {stage: INSTRUCTION_STAGES.get(stage, stage) for stage in measured.tuned}
    return write_report(folder, Evaluation(
        base_model=base_model, base_loss=measured.base_loss,
        tuned=[Tuned(label[stage], models[stage], m.loss, m.scores, m.judge, m.hellaswag)
               for stage, m in measured.tuned.items()],
        champion=label[promotion.best] if promotion.promoted else None,
        histories=measured.histories, examples=measured.examples, base_hellaswag=measured.base_hellaswag))
