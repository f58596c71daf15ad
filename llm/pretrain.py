"""The pretrain stage: train the GPT on the token shards, from scratch or from a checkpoint.

    python -m flows.pretrain                                          (what `dvc repro pretrain` runs)
    torchrun --standalone --nproc_per_node=8 -m flows.pretrain        (data-parallel, one GPU a process)

The model comes from params.yaml's `model` section (a preset and overrides) and `pretrain.init_from`:
`scratch`, a GPT-2 size (OpenAI's weights, downloaded through llm.download), or a checkpoint folder. A
starting checkpoint must use the shards' tokenizer and have the architecture the `model` section
describes; dropout and the attention implementation are taken from params.

`model.objective: masked` pretrains an encoder on the same shards instead: each batch's windows are
corrupted as BERT's are (llm/masking.py, `pretrain.mask_rate` and the fractions), the loss and the val
figures (`val_loss`, `val_accuracy`, `val_top5_accuracy`) are on the masked tokens, and the samples are
the model's guesses for a masked prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llm.config import MASKING_SETTINGS, Params, WindowGrid, weight_settings
from llm.fill import fill_sampler
from llm.distributed import Dist
from llm.generate import prompt_sampler
from llm.masking import Masking, MaskedBatches, masked_token_metrics, masked_val_batches
from llm.model import GPT, ModelConfig
from llm.starting import starting_model, starting_weights
from llm.shards import RandomWindows, ShardError, TokenStream, grid_starts, to_batch, read_manifest
from llm.files import sha256_file
from llm.imports import code_fingerprint
from llm.train import Batch, Trainer, TrainResult

if TYPE_CHECKING:
    from llm.tracking import Tracker

ARCHITECTURE = ("vocab_size", "context_length", "n_embd", "n_head", "n_layer", "qkv_bias", "tie_weights", "objective",
                "num_classes")


class CheckpointMismatch(ValueError):
    """A starting checkpoint that does not fit the shards or the params."""


def fixed_val_batches(stream: TokenStream, context_length: int, batch_size: int, batches: int,
                      grid: WindowGrid = "shifted") -> list[Batch]:
    """The same `batches` batches at every evaluation. With the `shifted` grid, windows spread evenly over
    the whole val split; with the `fixed` grid, its first windows, every context_length tokens from the
    split's start, as the book's val loader cuts them (so that a run of the book's recipe is measured on
    the book's val windows)."""
    if len(stream) < context_length + 1:
        raise ShardError(f"the val split holds {len(stream)} tokens, fewer than one window of context_length "
                         f"{context_length} + 1; raise tokenize.val_fraction or use a shorter context")
    count = min(batches * batch_size, (len(stream) - 1) // context_length)
    if grid == "fixed":
        starts = grid_starts(len(stream), context_length)[:count]
    else:
        starts = np.linspace(0, len(stream) - context_length - 1, count).astype(np.int64)
    windows = [stream.window(int(s), context_length + 1) for s in starts]
    return [to_batch(windows[i:i + batch_size]) for i in range(0, len(windows), batch_size)]


def check_compatible(source: str, found: ModelConfig, tokenizer: str, wanted: ModelConfig, manifest: dict) -> None:
    """Refuse a starting model whose tokenizer or architecture does not match, naming both sides."""
    if tokenizer != manifest["tokenizer"]:
        raise CheckpointMismatch(
            f"{source} was trained with tokenizer {tokenizer!r}, but the shards use {manifest['tokenizer']!r}; "
            f"set tokenize.tokenizer: {tokenizer} and rerun tokenize, or start from another checkpoint")
    differ = [k for k in ARCHITECTURE if getattr(found, k) != getattr(wanted, k)]
    if differ:
        ours = ", ".join(f"{k}={getattr(wanted, k)}" for k in differ)
        theirs = ", ".join(f"{k}={getattr(found, k)}" for k in differ)
        raise CheckpointMismatch(
            f"{source} has {theirs}, but params.yaml's model section says {ours}; set the model section to "
            f"match the checkpoint (e.g. model.preset), or start from scratch (pretrain.init_from: scratch)")


def initial_model(params: Params, manifest: dict) -> GPT:
    """The model training starts from, with the params' dropout and attention."""
    wanted: ModelConfig = params.model.build()
    if wanted.vocab_size < manifest["vocab_size"]:
        raise CheckpointMismatch(f"model.vocab_size {wanted.vocab_size} is smaller than the shards' vocabulary "
                                 f"of {manifest['vocab_size']} ({manifest['tokenizer']}); raise it")
    init = params.pretrain.init_from
    if init == "scratch":
        torch.manual_seed(params.pretrain.seed)
        return GPT(wanted)
    from llm.gpt2_weights import SIZES

    if init not in SIZES and not Path(init).is_dir():
        raise CheckpointMismatch(f"pretrain.init_from: {init!r} is neither scratch, a GPT-2 size "
                                 f"({', '.join(SIZES)}) nor a checkpoint folder")
    start, tokenizer = starting_model(init, init, section="pretrain", dropout=wanted.dropout,
                                      attention=wanted.attention)
    check_compatible(init, start.config, tokenizer, wanted, manifest)
    return start.train()


def run_settings(params: Params, shards_dir: str | Path) -> dict[str, Any]:
    """Everything that shapes the weights (model, settings, data, starting weights, code): a checkpoint
    of other settings is not resumed. Logging, sampling and checkpoint settings may change."""
    model = params.model.build()
    settings = weight_settings(params.pretrain)
    if not model.is_encoder:  # a GPT's weights do not depend on them: changing them resumes its run
        settings = {k: v for k, v in settings.items() if k not in MASKING_SETTINGS}
    return {"model": model.to_dict(), "pretrain": settings,
            "shards": sha256_file(Path(shards_dir) / "manifest.json"),
            "start": starting_weights(params.pretrain.init_from), "code": code_fingerprint(__name__)}


def run_pretrain(params: Params, shards_dir: str | Path, out_dir: str | Path, *, tracker: Tracker,
                 dist: Dist = Dist(), run_id: str | None = None,
                 settings: dict[str, Any] | None = None) -> TrainResult:
    """Train on `shards_dir`, resuming from `out_dir`'s latest matching checkpoint; the model ends there."""
    manifest = read_manifest(shards_dir)
    config = params.pretrain
    model = initial_model(params, manifest)
    T = model.config.context_length
    train = TokenStream.from_manifest(shards_dir, "train")
    batches = RandomWindows(train, T, config.batch_size, config.seed, dist.rank, dist.world_size,
                            shift=config.windows == "shifted")
    val = fixed_val_batches(TokenStream.from_manifest(shards_dir, "val"), T, config.batch_size, config.eval_batches,
                            config.windows)
    sampler = (prompt_sampler(manifest["tokenizer"], config.sample_prompt, config.sample_tokens, config.seed)
               if config.sample_interval else None)
    evaluator = None
    if model.config.is_encoder:  # the same windows, corrupted as they are drawn (llm/masking.py)
        masking = Masking(config.mask_rate, config.mask_token_fraction, config.random_token_fraction)
        batches = MaskedBatches(batches, masking, model.config, config.seed, dist.rank)
        val = masked_val_batches(val, masking, model.config, config.seed)
        sampler = fill_sampler(manifest["tokenizer"], config.sample_prompt) if config.sample_interval else None

        def evaluator(model: torch.nn.Module) -> dict[str, float]:
            measured = masked_token_metrics(model, val)
            return {"val_accuracy": measured.accuracy, "val_top5_accuracy": measured.top5_accuracy}

    trainer = Trainer(
        model, batches, val, config, out_dir, settings=settings or run_settings(params, shards_dir),
        tracker=tracker, tokenizer=manifest["tokenizer"], sampler=sampler, run_id=run_id, dist=dist,
        evaluator=evaluator,
        checkpoint_extra={"stage": "pretrain", "init_from": config.init_from,
                          "shards_manifest_sha256": sha256_file(Path(shards_dir) / "manifest.json")})
    return trainer.fit()
