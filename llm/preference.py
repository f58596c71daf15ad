"""Preference tuning with DPO (the book's chapter 7 bonus): pairs, their split, batches, the loss, the stage.

    python -m flows.preference                                    (what `dvc repro preference` runs)

A record is `{"instruction", "input", "output", "chosen", "rejected"}` (the book's
instruction-data-with-preference.json): a prompt, and two responses of which people (or a judge model)
prefer `chosen`. The policy starts from the instruction-tuned model and so does the reference, a frozen
copy of it; Direct Preference Optimization (Rafailov et al., 2023) raises the policy's log-probability of
the chosen response relative to the reference's, and lowers the rejected one's:

    loss = -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))))

A response's log-probability covers its own tokens and the end-of-text after it, never the prompt or the
padding; it is the mean over those tokens (`logprob: mean`, the book's compute_logprobs) or their sum
(`logprob: sum`, the paper's). The implicit rewards are `beta * (log pi - log ref)` of each response (as the
paper and TRL define them; the book's plots leave out beta), their difference is the reward margin, and
preference accuracy is the share of pairs whose margin is positive, a tie counting half: the starting
model, its own reference, scores exactly 50% and 0.

The split is finetune's (its settings, 85 / 10 / 5 by default, over the same records in the same order),
taken before invalid records are left out, so that the test prompts are those the evaluate stage answers.
Batches hold the chosen responses of B pairs, then their rejected ones, (2B, T), for one forward pass
through the training loop's model (llm.train.Trainer, with `DPOObjective` as its objective); tokens/s
counts both sequences of each pair, and MFU the policy's forward and backward but not the reference's
forward.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.checkpoint import SPLIT_FILE, read_config
from llm.config import FinetuneConfig, LogProb, Params, PreferenceConfig, weight_settings
from llm.distributed import Dist
from llm.download import downloaded_source
from llm.files import sha256_file
from llm.imports import code_fingerprint
from llm.generate import prompt_sampler
from llm.instructions import (Example, InstructionDataError, PromptStyle, Record, Split, collate, count_truncated,
                              encode_records, json_values, learnable, prompt_text, read_split,
                              split_records, string_fields, write_split)
from llm.lora import apply_lora, merge_lora, trainable_parameters
from llm.model import GPT, IGNORE_INDEX, eval_mode
from llm.sampler import EpochBatches, steps_for_epochs
from llm.starting import start_folder, starting_model, starting_weights
from llm.tokenizer import get_tokenizer
from llm.train import Trainer, TrainResult

if TYPE_CHECKING:
    from llm.tracking import Tracker

log = logging.getLogger(__name__)

FIELDS = ("instruction", "input", "output", "chosen", "rejected")
FIGURES = ("chosen_reward", "rejected_reward", "reward_margin", "preference_accuracy")


class PreferenceDataError(InstructionDataError):
    """Preference data that cannot be used; the message names the file, the record and the reason."""


# ---------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class PreferencePair:
    instruction: str
    input: str
    output: str  # the reference answer the instruction data gives (what evaluate scores against)
    chosen: str
    rejected: str

    @property
    def record(self) -> Record:
        return Record(self.instruction, self.input, self.output)


def parse_pair(value: Any, where: str) -> PreferencePair:
    """A pair from one parsed JSON value; PreferenceDataError naming `where` and the reason otherwise."""
    pair = PreferencePair(*string_fields(value, where, FIELDS, PreferenceDataError))
    if pair.chosen == pair.rejected:
        raise PreferenceDataError(f"{where}: its chosen and rejected responses are equal, which teaches no "
                                  f"preference")
    return pair


@dataclass(frozen=True)
class LoadedPairs:
    pairs: list[PreferencePair | None]  # one per record of the file, in its order; None where left out
    skipped: dict[int, str]  # the records left out (skip_invalid), by index: why


def load_pairs(path: str | Path, *, skip_invalid: bool = False) -> LoadedPairs:
    """Every record of a JSON list or JSON Lines file (`.jsonl`) as a pair. An invalid record raises
    PreferenceDataError with its index and the fix, or with `skip_invalid` is left out and counted."""
    path = Path(path)
    kind = "jsonl" if path.suffix == ".jsonl" else "json"
    pairs: list[PreferencePair | None] = []
    skipped: dict[int, str] = {}
    for index, (where, value) in enumerate(json_values(path, kind)):
        try:
            pairs.append(parse_pair(value, f"{path}: {where}"))
        except PreferenceDataError as exc:
            if not skip_invalid:
                raise PreferenceDataError(f"{exc}; fix the record, or set preference.skip_invalid: true to "
                                          f"leave such records out") from None
            pairs.append(None)
            skipped[index] = str(exc)
    if not any(pairs):
        raise PreferenceDataError(f"{path}: holds no usable records")
    return LoadedPairs(pairs, skipped)


def split_pairs(loaded: LoadedPairs, finetune: FinetuneConfig) -> Split[PreferencePair]:
    """The records split by finetune's settings, as finetune splits its records (by position in the file),
    then the left-out ones dropped."""
    split = split_records(loaded.pairs, train=finetune.train_fraction, test=finetune.test_fraction,
                          seed=finetune.split_seed)
    return Split(**{name: [p for p in getattr(split, name) if p is not None] for name in ("train", "val", "test")})


def read_pairs_split(path: str | Path) -> Split[PreferencePair]:
    """The split the preference stage saved beside its model."""
    return read_split(path, parse_pair, stage="preference")


# ---------------------------------------------------------------------------------------------------
# Tokens and batches


@dataclass(frozen=True)
class PairExample:
    """A pair's two token sequences: the same prompt, then each response and end-of-text."""

    chosen: Example
    rejected: Example


def encode_pairs(pairs: Sequence[PreferencePair], style: PromptStyle, tokenizer: str = "gpt2") -> list[PairExample]:
    chosen = encode_records([dataclasses.replace(p.record, output=p.chosen) for p in pairs], style, tokenizer)
    rejected = encode_records([dataclasses.replace(p.record, output=p.rejected) for p in pairs], style, tokenizer)
    return [PairExample(c, r) for c, r in zip(chosen, rejected)]


def learnable_pairs(examples: Sequence[PairExample], max_length: int) -> list[PairExample]:
    """The pairs both of whose responses keep a token within `max_length` (a prompt that fills it leaves
    no response to compare)."""
    return [p for p in examples if len(learnable([p.chosen, p.rejected], mask_prompt=True, max_length=max_length)) == 2]


def collate_pairs(pairs: Sequence[PairExample], pad_id: int, max_length: int | None = None) -> tuple[Tensor, Tensor]:
    """Inputs and targets (2B, T): the B chosen sequences, then the B rejected ones, padded together;
    targets only on the responses and their end-of-text (the prompt and the padding are IGNORE_INDEX)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, mask_prompt=True,
                   max_length=max_length)


class PairBatches(EpochBatches[PairExample]):
    """Training batches of pairs (`collate_pairs`) in epochs of a seeded shuffle, resumable: see
    llm.sampler.EpochBatches."""

    def __init__(self, examples: Sequence[PairExample], batch_size: int, seed: int, pad_id: int, *,
                 max_length: int | None = None, global_batch_size: int | None = None, rank: int = 0,
                 world_size: int = 1):
        batch = functools.partial(collate_pairs, pad_id=pad_id, max_length=max_length)
        super().__init__(examples, batch, batch_size, seed, global_batch_size=global_batch_size, rank=rank,
                         world_size=world_size)


def pair_batches(examples: Sequence[PairExample], batch_size: int, pad_id: int,
                 max_length: int | None = None) -> list[tuple[Tensor, Tensor]]:
    """Every pair once, in order, `batch_size` pairs to a batch: the same batches at every evaluation."""
    if not examples:
        raise ValueError("no pairs to evaluate: the split is empty")
    return [collate_pairs(examples[i:i + batch_size], pad_id, max_length) for i in range(0, len(examples), batch_size)]


# ---------------------------------------------------------------------------------------------------
# The loss


def sequence_logprobs(model: nn.Module, x: Tensor, y: Tensor, logprob: LogProb = "mean") -> Tensor:
    """Each row's log-probability of its targets (B,): summed over the targets that are not IGNORE_INDEX,
    or their mean. Through `model(x, y, reduction="none")`, so that DDP and compile see a forward pass."""
    nll = model(x, y, reduction="none")  # (B, T), 0 where ignored
    total = -nll.sum(dim=1)
    if logprob == "sum":
        return total
    return total / (y != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def dpo_loss(policy: Tensor, reference: Tensor, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean DPO loss of B pairs from the log-probabilities (2B,) of their chosen responses then their
    rejected ones, under the policy and the reference; and the mean rewards, margin and accuracy."""
    policy_chosen, policy_rejected = policy.float().chunk(2)
    reference_chosen, reference_rejected = reference.float().chunk(2)
    chosen_reward = beta * (policy_chosen - reference_chosen)  # (B,)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    wins = (margin > 0).float() + 0.5 * (margin == 0).float()
    return loss, {"chosen_reward": chosen_reward.detach().mean(), "rejected_reward": rejected_reward.detach().mean(),
                  "reward_margin": margin.detach().mean(), "preference_accuracy": wins.mean()}


class DPOObjective:
    """llm.train.Objective for pair batches: the DPO loss of the model against `reference`, which is
    frozen, in eval mode, and moved to each batch's device."""

    def __init__(self, reference: GPT, beta: float, logprob: LogProb = "mean"):
        self.reference, self.beta, self.logprob = reference.eval().requires_grad_(False), beta, logprob

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.reference.lm_head.weight.device != x.device:  # once: the batches stay on one device
            self.reference.to(x.device)
        with torch.no_grad():
            reference_logprobs = sequence_logprobs(self.reference, x, y, self.logprob)
        return dpo_loss(sequence_logprobs(model, x, y, self.logprob), reference_logprobs, self.beta)


@torch.no_grad()
def score_pairs(policy: GPT, reference: GPT, batches: Sequence[tuple[Tensor, Tensor]], beta: float,
                logprob: LogProb = "mean") -> dict[str, float]:
    """The DPO loss, rewards, margin and accuracy over every pair of `batches` (each pair counts once),
    both models in eval mode on their own device and dtype."""
    objective, device = DPOObjective(reference, beta, logprob), next(policy.parameters()).device
    sums: dict[str, float] = {}
    pairs = 0
    with eval_mode(policy):
        for x, y in batches:
            loss, figures = objective(policy, x.to(device), y.to(device))
            n = x.shape[0] // 2
            for name, value in {"loss": loss, **figures}.items():
                sums[name] = sums.get(name, 0.0) + value.item() * n
            pairs += n
    return {name: total / pairs for name, total in sums.items()}


# ---------------------------------------------------------------------------------------------------
# The stage


def preference_file(raw_dir: str | Path, source: str) -> Path:
    """The downloaded file of preference source `source`."""
    return downloaded_source(raw_dir, "preference", source, "preference.data")[0]


def run_settings(params: Params, raw_dir: str | Path, finetune_dir: str | Path) -> dict[str, Any]:
    """The settings, starting weights, data and code that shape the weights: what a resumable checkpoint
    must match."""
    config = params.preference
    split = {key: getattr(params.finetune, key) for key in ("train_fraction", "test_fraction", "split_seed")}
    return {"preference": weight_settings(config), "split": split,
            "start": starting_weights(config.init_from, finetune_dir, "preference", stage="finetune"),
            "data": sha256_file(preference_file(raw_dir, config.data)), "code": code_fingerprint(__name__)}


def prompt_style_of(config: PreferenceConfig, finetune_dir: str | Path) -> PromptStyle:
    """The prompt style to train with: the setting, else the one the starting model was tuned with."""
    if config.prompt_style is not None:
        return config.prompt_style
    from llm.gpt2_weights import SIZES

    if config.init_from in SIZES:
        return "alpaca"
    folder = start_folder(config.init_from, finetune_dir, "preference", stage="finetune")
    return read_config(folder).extra.get("prompt_style", "alpaca")


@dataclass(frozen=True)
class Prepared:
    split: Split[PreferencePair]
    examples: dict[str, list[PairExample]]  # train, val and test, those with a response within max_length
    style: PromptStyle
    pad_id: int
    max_length: int
    report: dict[str, Any]  # for config.json: what was left out and why

    def batches(self, name: str, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        return pair_batches(self.examples[name], batch_size, self.pad_id, self.max_length)


def prepare(raw_dir: str | Path, params: Params, out_dir: Path, finetune_dir: str | Path,
            tokenizer: str, context_length: int, *, warn: bool = True) -> Prepared:
    """Load, split (written to `out_dir/split.json`) and encode the pairs; warn about what is left out or cut."""
    config = params.preference
    path = preference_file(raw_dir, config.data)
    loaded = load_pairs(path, skip_invalid=config.skip_invalid)
    if loaded.skipped and warn:
        log.warning("preference: %d of %d records of %s are left out (skip_invalid), e.g. %s", len(loaded.skipped),
                    len(loaded.pairs), path, next(iter(loaded.skipped.values())))
    split = split_pairs(loaded, params.finetune)
    for name in ("train", "val", "test"):
        if not getattr(split, name):
            raise ValueError(f"{path}: the {name} split is empty; add records or change finetune.*_fraction")
    write_split(out_dir / SPLIT_FILE, split)
    style = prompt_style_of(config, finetune_dir)
    max_length = min(config.max_length or context_length, context_length)
    examples, cut, dropped = {}, {}, {}
    for name in ("train", "val", "test"):
        encoded = encode_pairs(getattr(split, name), style, tokenizer)
        examples[name] = learnable_pairs(encoded, max_length)
        dropped[name] = len(encoded) - len(examples[name])
        cut[name] = sum(count_truncated([p.chosen, p.rejected], max_length)[0] > 0 for p in examples[name])
        if (cut[name] or dropped[name]) and warn:
            log.warning("preference: of %d %s pairs, %d are cut at max_length %d tokens and %d left out (their "
                        "prompt fills it); raise preference.max_length (up to context_length %d) or shorten them",
                        len(encoded), name, cut[name], max_length, dropped[name], context_length)
    if not examples["val"]:
        raise ValueError(f"{path}: no val pair has a response within max_length {max_length}; raise it")
    report = {"max_length": max_length, "skipped_records": len(loaded.skipped), "truncated_pairs": cut,
              "dropped_pairs": dropped}
    return Prepared(split, examples, style, get_tokenizer(tokenizer).eot_token, max_length, report)


def run_preference(params: Params, raw_dir: str | Path, finetune_dir: str | Path, out_dir: str | Path, *,
                   tracker: Tracker, dist: Dist = Dist(), run_id: str | None = None,
                   settings: dict[str, Any] | None = None) -> TrainResult:
    """Train the policy with DPO and leave it (LoRA merged), its history and `split.json` in `out_dir`."""
    config, out_dir = params.preference, Path(out_dir)
    model, tokenizer = starting_model(config.init_from, finetune_dir, section="preference", stage="finetune",
                                      causal_for="preference tuning", dropout=config.dropout)
    if model.config.is_classifier:
        raise ValueError(f"preference.init_from: {config.init_from} is a classifier; start from an instruction "
                         f"model (the finetune stage's, by default)")
    reference = copy.deepcopy(model)  # before any adapter: the starting weights, frozen
    data = prepare(raw_dir, params, out_dir, finetune_dir, tokenizer, model.config.context_length,
                   warn=dist.is_main)
    config = steps_for_epochs(config, len(data.examples["train"]))  # epochs, where set, decide the length of the run
    if config.lora_rank:
        torch.manual_seed(config.seed)  # the adapters' initialisation
        apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
    batches = PairBatches(data.examples["train"], config.batch_size, config.seed, data.pad_id,
                          max_length=data.max_length, global_batch_size=config.global_batch_size, rank=dist.rank,
                          world_size=dist.world_size)
    sampler = (prompt_sampler(tokenizer, prompt_text(data.split.val[0].record, data.style), config.sample_tokens,
                              config.seed) if config.sample_interval else None)
    extra = {"stage": "preference", "init_from": config.init_from, "prompt_style": data.style,
             "beta": config.beta, "logprob": config.logprob, "lora_rank": config.lora_rank,
             "trainable_parameters": trainable_parameters(model), **data.report}
    trainer = Trainer(model, batches, data.batches("val", config.batch_size)[:config.eval_batches], config, out_dir,
                      settings=settings or run_settings(params, raw_dir, finetune_dir), tracker=tracker,
                      tokenizer=tokenizer, sampler=sampler, run_id=run_id, dist=dist, checkpoint_extra=extra,
                      export=merge_lora if config.lora_rank else None,
                      objective=DPOObjective(reference, config.beta, config.logprob))
    return trainer.fit()


def final_scores(model: GPT, config: PreferenceConfig, finetune_dir: str | Path,
                 out_dir: str | Path) -> dict[str, float]:
    """The trained model's DPO figures against its starting model on every val and test pair of the saved
    split, in fp32 (the same on any machine): `test_preference_accuracy`, `test_reward_margin`, ... The
    starting model scores 50% and 0 against itself, by definition."""
    out_dir = Path(out_dir)
    saved = read_config(out_dir)
    split = read_pairs_split(out_dir / SPLIT_FILE)
    reference, _ = starting_model(config.init_from, finetune_dir, section="preference", stage="finetune")
    policy = model.float()
    reference = reference.to(next(policy.parameters()).device).float()
    pad_id, max_length = get_tokenizer(saved.tokenizer).eot_token, saved.extra["max_length"]
    metrics: dict[str, float] = {}
    for name in ("val", "test"):
        examples = learnable_pairs(encode_pairs(getattr(split, name), saved.extra["prompt_style"], saved.tokenizer),
                                   max_length)
        scored = score_pairs(policy, reference, pair_batches(examples, config.batch_size, pad_id, max_length),
                             config.beta, config.logprob)
        metrics.update({f"{name}_{key}": value for key, value in scored.items()})
    return metrics
