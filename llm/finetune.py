"""The finetune stage: teach a pretrained GPT to follow instructions (the book's chapter 7).

    python -m flows.finetune                                       (what `dvc repro finetune` runs)

Starts from the pretrain stage's model (or OpenAI's GPT-2 weights, or any checkpoint folder), splits
the instruction records into train / val / test (written to `split.json` beside the model, so that the
evaluate stage answers exactly the held-out test records), and trains with the same Trainer as
pretraining: full fine-tuning, or LoRA adapters (merged into the saved model, so that generation needs
nothing special). The book's recipe, GPT-2 medium for 2 epochs at lr 5e-5, is `init_from: gpt2-medium`,
`epochs: 2`, `lr: 5e-5`, `min_lr: 5e-5` (see the README's GPU recipes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llm.checkpoint import SPLIT_FILE
from llm.config import FinetuneConfig, Params, weight_settings
from llm.distributed import Dist
from llm.download import downloaded_source
from llm.generate import prompt_sampler
from llm.instructions import (Example, InstructionBatches, Split, count_truncated, encode_records, learnable,
                              load_records, prompt_text, split_records, validation_batches, write_split)
from llm.lora import apply_lora, merge_lora, trainable_parameters
from llm.sampler import steps_for_epochs
from llm.starting import starting_model, starting_weights
from llm.tokenizer import get_tokenizer
from llm.files import sha256_file
from llm.imports import code_fingerprint
from llm.train import Trainer, TrainResult

if TYPE_CHECKING:
    from llm.tracking import Tracker

log = logging.getLogger(__name__)


def instruction_file(raw_dir: str | Path, source: str) -> Path:
    """The downloaded file of instruction source `source`."""
    return downloaded_source(raw_dir, "instructions", source, "finetune.instructions")[0]


def run_settings(params: Params, raw_dir: str | Path, pretrain_dir: str | Path) -> dict[str, Any]:
    """The settings, starting weights, data and code that shape the weights: what a resumable
    checkpoint must match. Logging, sampling and checkpoint settings may change."""
    config = params.finetune
    return {"finetune": weight_settings(config), "start": starting_weights(config.init_from, pretrain_dir, "finetune"),
            "data": sha256_file(instruction_file(raw_dir, config.instructions)), "code": code_fingerprint(__name__)}


def prepare_split(path: Path, config: FinetuneConfig, out_dir: Path) -> Split:
    split = split_records(load_records(path), train=config.train_fraction, test=config.test_fraction,
                          seed=config.split_seed)
    for name in ("train", "val", "test"):
        if not getattr(split, name):
            raise ValueError(f"{path}: the {name} split is empty; add records or change finetune.*_fraction")
    write_split(out_dir / SPLIT_FILE, split)
    return split


def fitting_report(encoded: dict[str, list[Example]], kept: dict[str, list[Example]], max_length: int,
                   context_length: int, *, warn: bool = True) -> dict[str, Any]:
    """Per split, the examples cut at max_length and those left out, warned about and returned for config.json.

    `encoded` are a split's examples, `kept` those that `learnable` keeps. Batching cuts a long example without
    a word, and with mask_prompt leaves out one whose prompt alone fills max_length: a user whose data is long
    would never know that part of the responses was not learned.
    """
    if max_length < context_length:
        fix = f"raise finetune.max_length (up to the model's context_length {context_length}) or shorten them"
    else:
        fix = (f"max_length is the model's context_length {context_length}: shorten them, or start from a model "
               f"with a longer context")
    report: dict[str, Any] = {"max_length": max_length, "truncated_examples": {}, "longest_example": {},
                              "dropped_examples": {}}
    for name, examples in encoded.items():
        count = count_truncated(kept[name], max_length)[0]  # a left-out example is told apart, not counted twice
        longest = count_truncated(examples, max_length)[1]
        dropped = len(examples) - len(kept[name])
        report["truncated_examples"][name], report["longest_example"][name] = count, longest
        report["dropped_examples"][name] = dropped
        if count and warn:
            log.warning("finetune: %d of %d %s examples are longer than max_length %d tokens (longest %d) and are "
                        "cut to it; %s", count, len(examples), name, max_length, longest, fix)
        if dropped and warn:
            log.warning("finetune: %d of %d %s examples are left out: with finetune.mask_prompt their prompt alone "
                        "fills max_length %d, which leaves nothing to learn; %s", dropped, len(examples), name,
                        max_length, fix)
    return report


def run_finetune(params: Params, raw_dir: str | Path, pretrain_dir: str | Path, out_dir: str | Path, *,
                 tracker: Tracker, dist: Dist = Dist(), run_id: str | None = None,
                 settings: dict[str, Any] | None = None) -> TrainResult:
    """Fine-tune and leave the model (LoRA merged), its history and `split.json` in `out_dir`."""
    config, out_dir = params.finetune, Path(out_dir)
    model, tokenizer = starting_model(config.init_from, pretrain_dir, section="finetune",
                                      causal_for="instruction tuning", dropout=config.dropout)
    data = instruction_file(raw_dir, config.instructions)
    split = prepare_split(data, config, out_dir)
    pad_id = get_tokenizer(tokenizer).eot_token
    max_length = min(config.max_length or model.config.context_length, model.config.context_length)
    shape = {"mask_prompt": config.mask_prompt, "max_length": max_length}
    encoded = {name: encode_records(getattr(split, name), config.prompt_style, tokenizer) for name in ("train", "val")}
    train, val = (learnable(encoded[name], **shape) for name in ("train", "val"))
    cut = fitting_report(encoded, {"train": train, "val": val}, max_length, model.config.context_length,
                         warn=dist.is_main)
    config = steps_for_epochs(config, len(train))  # epochs, where set, decide the length of the run
    if config.lora_rank:
        torch.manual_seed(config.seed)  # the adapters' initialisation
        apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
    batches = InstructionBatches(train, config.batch_size, config.seed, pad_id, **shape,
                                 global_batch_size=config.global_batch_size, rank=dist.rank,
                                 world_size=dist.world_size)
    val_batches = validation_batches(val, config.batch_size, pad_id, **shape)[:config.eval_batches]
    sampler = (prompt_sampler(tokenizer, prompt_text(split.val[0], config.prompt_style), config.sample_tokens,
                              config.seed) if config.sample_interval else None)
    extra = {"stage": "finetune", "init_from": config.init_from, "prompt_style": config.prompt_style,
             "lora_rank": config.lora_rank, "trainable_parameters": trainable_parameters(model), **cut}
    trainer = Trainer(model, batches, val_batches, config, out_dir,
                      settings=settings or run_settings(params, raw_dir, pretrain_dir), tracker=tracker,
                      tokenizer=tokenizer, sampler=sampler, run_id=run_id, dist=dist, checkpoint_extra=extra,
                      export=merge_lora if config.lora_rank else None)
    return trainer.fit()
