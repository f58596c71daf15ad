"""The sections of `params.yaml`, as frozen dataclasses: one per stage, with their defaults and checks.

`params.yaml` is the single source of settings, one section per stage. `load_params()` turns it into a
`Params` object through llm.validation's loader: every problem in the file (an unknown key, a wrong type,
a value out of range) is collected and raised together as one `ConfigError` whose lines name the key path:

    tokenize.val_fraction: must be in (0, 1), got 1.5
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from llm.files import TMP_PREFIX
from llm.model_config import ModelConfig, Objective, Pooling, model_config
from llm.sampler import global_batch_problem
from llm.validation import ConfigError, Problem, check_fractions, check_positive, check_range, from_mapping

# The instruction prompt formats (llm/instructions.py's TEMPLATES): the book's Alpaca style, and Phi-3's.
PromptStyle = Literal["alpaca", "phi3"]


# ---------------------------------------------------------------------------------------------------
# Sections of params.yaml

_SHA256 = re.compile(r"[0-9a-f]{64}")
SourceKind = Literal["text", "json", "jsonl", "parquet", "csv", "tsv"]
# hellaswag: the HellaSwag file the evaluate stage scores every model on (evaluate.hellaswag names the source)
SourceRole = Literal["corpus", "instructions", "classification", "preference", "hellaswag"]
SOURCE_ROLES: tuple[str, ...] = typing.get_args(SourceRole)  # one folder under data/raw/ each
_DELIMITED = ("csv", "tsv")


def url_file_name(url: str) -> str:
    """The last part of `url`'s path: a URL's query and fragment (often a signed token) are no part of it, a
    local path's '?' or '#' is."""
    path = urlparse(url).path if "://" in url else url
    return path.rstrip("/").rsplit("/", 1)[-1]


def member_problem(member: str) -> str | None:
    """Why `member` cannot name a file inside a zip archive, or None. A name that is absolute or climbs out
    with '..' is how an archive writes outside its folder; zip names use '/', so a backslash is a mistake."""
    if not member or member.endswith("/"):
        return f"must name a file inside the archive, got {member!r}"
    if "\\" in member or member.startswith("/") or re.match(r"[A-Za-z]:", member) or ".." in member.split("/"):
        return (f"must be a relative path inside the archive, with '/' between folders and no '..' parts, got "
                f"{member!r}; write it as the archive lists it (python -m zipfile -l ARCHIVE), e.g. data/file.csv")
    return None


def _either(words: list[str]) -> str:
    return f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]


@dataclass(frozen=True)
class SourceConfig:
    """One file to fetch: where from, what it must hash to, how to read it, and what it is for."""

    name: str
    url: str  # https://, http://, file:// or a local path
    sha256: str | None = None  # None: fetched unpinned, with a warning that prints the hash to pin
    kind: SourceKind = "text"
    role: SourceRole = "corpus"
    text_field: str | None = None  # the record field (json, jsonl) or column (parquet, csv, tsv) holding the text
    filename: str | None = None  # name under data/raw/<role>/ and in the mirror; default: the URL's (member's)
    member: str | None = None  # the file to keep from the .zip archive at url; sha256 then pins the archive
    member_sha256: str | None = None  # pins the member
    label_field: str | None = None  # the record field or column holding a classification source's label
    columns: list[str] | None = None  # a headerless csv/tsv file's column names, in order; None: row 1 names them

    @property
    def file_name(self) -> str:
        if self.filename:
            return self.filename
        return self.member.rsplit("/", 1)[-1] if self.member is not None else url_file_name(self.url)

    def problems(self) -> Iterator[Problem]:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            yield "name", f"must be letters, digits, '.', '_' or '-', got {self.name!r}"
        for key in ("sha256", "member_sha256"):
            value = getattr(self, key)
            if value is not None and not _SHA256.fullmatch(value):
                yield key, f"must be 64 lowercase hex digits, got {value!r}"
        if "://" in self.url and self.url.split("://", 1)[0] not in ("http", "https", "file"):
            yield "url", f"must be http(s)://, file:// or a local path, got {self.url!r}"
        bad_member = self.member is not None and member_problem(self.member)
        if bad_member:
            yield "member", bad_member
        if self.member is None and self.member_sha256 is not None:
            yield "member_sha256", ("pins a file inside a .zip archive, but member is not set: set member: to the "
                                    "file's name in the archive, or remove member_sha256 (sha256 pins the file)")
        yield from self._reading_problems()
        if bad_member and not self.filename:
            return  # the file's name is taken from the member: one problem, not two
        name = self.file_name
        if not name or name in (".", "..") or "/" in name or name == "manifest.json":
            yield "filename", f"must be a plain file name other than manifest.json, got {name!r}"
        elif name.startswith(TMP_PREFIX):
            what = "" if self.filename else f"{name!r}, the name taken from {'member' if self.member else 'url'}, "
            yield "filename", (f"{what}must not start with {TMP_PREFIX!r} (the prefix of temporary files, which "
                               f"cleanup deletes); set filename: to another name")

    def _reading_problems(self) -> Iterator[Problem]:
        """What keeps the next stage from reading the file: its kind, fields and columns for its role."""
        holder = "column" if self.kind in ("parquet", *_DELIMITED) else "record field"
        if self.role == "corpus" and self.kind != "text" and not self.text_field:
            yield "text_field", f"is required for a {self.kind} corpus: name the {holder} that holds the text"
        kinds = typing.get_args(SourceKind)
        if self.role == "classification":
            if self.kind == "text":
                yield "kind", (f"must be {_either([k for k in kinds if k != 'text'])} for a classification source: "
                               f"a text file has no label")
            for key, holds in (("text_field", "text"), ("label_field", "label")):
                if not getattr(self, key):
                    yield key, f"is required for a classification source: name the {holder} that holds the {holds}"
        elif self.role == "hellaswag" and self.kind != "jsonl":
            yield "kind", (f"must be jsonl for a hellaswag source (HellaSwag's own format, one item a line), got "
                           f"{self.kind}")
        elif self.kind in _DELIMITED:
            yield "kind", (f"{self.kind} is for classification sources only; {self.role} sources must be "
                           f"{_either([k for k in kinds if k not in _DELIMITED])}")
        if self.columns is not None:
            if self.kind not in _DELIMITED:
                yield "columns", (f"names the columns of a headerless csv or tsv file; remove it for a {self.kind} "
                                  f"source")
            duplicates = sorted({c for c in self.columns if self.columns.count(c) > 1})
            if duplicates:
                named = ", ".join(map(repr, duplicates))
                yield "columns", f"names {named} more than once; give each column its own name"
            for key in ("text_field", "label_field"):
                value = getattr(self, key)
                if value and value not in self.columns:
                    yield "columns", f"must contain {key} {value!r}, got {self.columns}; add it, or fix {key}"


@dataclass(frozen=True)
class DownloadConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    timeout_s: float = 60.0  # per network read, not per file
    retries: int = 3  # extra tries after a transient failure (timeout, connection error, 5xx)
    retry_delay_s: float = 2.0  # first backoff; doubles on each retry

    def problems(self) -> Iterator[Problem]:
        yield from check_positive("timeout_s", self.timeout_s)
        yield from check_range("retries", self.retries, 0, 20)
        yield from check_range("retry_delay_s", self.retry_delay_s, 0)
        if not any(s.role == "corpus" for s in self.sources):
            yield "sources", "needs at least one source with role 'corpus' to pretrain on"
        seen_names: set[str] = set()
        seen_files: set[tuple[str, str]] = set()
        for i, source in enumerate(self.sources):
            if source.name in seen_names:
                yield f"sources[{i}].name", f"{source.name!r} is used by another source; names must be unique"
            if (source.role, source.file_name) in seen_files:
                yield f"sources[{i}].filename", f"{source.file_name!r} is used by another {source.role} source"
            seen_names.add(source.name)
            seen_files.add((source.role, source.file_name))


@dataclass(frozen=True)
class TokenizeConfig:
    tokenizer: str = "gpt2"  # a tiktoken encoding name
    val_fraction: float = 0.1
    seed: int = 1337
    tokens_per_shard: int = 10_000_000
    doc_separator: str | None = None  # split text files into documents on this string; None: one document
    encoding_errors: Literal["strict", "replace"] = "strict"  # bytes that are not UTF-8: fail, or U+FFFD
    num_threads: int = 0  # encoder threads; 0: one per core

    def problems(self) -> Iterator[Problem]:
        yield from check_range("val_fraction", self.val_fraction, 0, 1, closed="()")
        yield from check_range("tokens_per_shard", self.tokens_per_shard, 1024, 2**31 - 1)  # int32 Arrow offsets
        yield from check_range("num_threads", self.num_threads, 0)
        if self.doc_separator == "":
            yield "doc_separator", "must be a non-empty string, or null for one document per text file"


class _ModelSettings:
    """What the model section does with its values: the preset's config with the set fields replaced."""

    def overrides(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if f.name != "preset" and getattr(self, f.name) is not None}

    def build(self) -> ModelConfig:
        return model_config(self.preset, **self.overrides())  # type: ignore[attr-defined]

    def problems(self) -> Iterator[Problem]:
        try:
            self.build()
        except ConfigError as exc:
            yield from exc.problems


# A classifier's fields are the classify stage's to set on the model it makes, not the pretrained model's.
_CLASSIFIER_FIELDS = frozenset({"num_classes", "pooling"})
_MODEL_HINTS = typing.get_type_hints(ModelConfig)

# The model section: `preset` (a key of llm.model_config.PRESETS) and any of ModelConfig's fields to
# override, None keeping the preset's. Made from ModelConfig's own fields, so that the two cannot disagree:
# a field added to the model is a setting at once, with the model's type and checks.
ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    [("preset", str, field(default="cpu-small")),
     *((f.name, _MODEL_HINTS[f.name] | None, field(default=None))
       for f in dataclasses.fields(ModelConfig) if f.name not in _CLASSIFIER_FIELDS)],
    bases=(_ModelSettings,), frozen=True)
ModelSection.__module__ = __name__  # for pickling and reprs; make_dataclass takes `module=` only from Python 3.12


Device = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "fp32", "bf16"]  # what each means: llm/hardware.py
WindowGrid = Literal["shifted", "fixed"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
# Inference's default is fp32, not auto: bf16 rounding changes greedy text, so that evaluation, serving and
# generation would give results that depend on the CPU. bf16 (or auto) is the user's choice.
INFERENCE_PRECISION: Precision = "fp32"


@dataclass(frozen=True)
class TrainConfig:
    """How to train, shared by pretraining and fine-tuning."""

    seed: int = 1337
    device: Device = "auto"  # auto: CUDA, else MPS, else CPU
    precision: Precision = "auto"  # auto: bf16 autocast where the device runs bf16 fast, else fp32
    compile: bool = False  # torch.compile the model (minutes of warm-up; pays off on long GPU runs)
    batch_size: int = 8  # sequences per micro-batch, per process
    global_batch_size: int = 8  # sequences per optimizer step, over all processes; accumulates to it
    max_steps: int = 200  # optimizer steps; 0: no training, the starting model is the result
    max_tokens: int | None = None  # a token budget instead: sets max_steps
    lr: float = 1e-3
    min_lr: float = 1e-4  # the cosine ends here
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    log_interval: int = 10  # steps between train-loss reports
    eval_interval: int = 50  # steps between val-loss evaluations (and at the end)
    eval_batches: int = 8  # fixed val batches per evaluation
    sample_interval: int = 100  # steps between sample generations (0: none)
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 40
    checkpoint_interval: int = 50  # steps between resumable checkpoints (and at the end)
    # Also one once this many seconds of the run (training, evaluations, samples) have passed since the
    # last checkpoint or the start, whichever comes first; null: by steps only. Steps suit one host,
    # seconds any: a slower host saves as often, and a short run on a fast one pays for none.
    checkpoint_interval_s: float | None = None
    keep_checkpoints: int = 2  # resumable checkpoints kept; the oldest is deleted once a newer one is on disk
    keep_superseded: int = 2  # sets of checkpoints of other settings kept aside (resume/superseded-*)

    def problems(self) -> Iterator[Problem]:
        for key in ("batch_size", "global_batch_size", "lr", "log_interval", "eval_interval",
                    "eval_batches", "checkpoint_interval", "keep_checkpoints", "sample_tokens"):
            yield from check_positive(key, getattr(self, key))
        yield from check_range("keep_superseded", self.keep_superseded, 0)
        if self.checkpoint_interval_s is not None:
            yield from check_positive("checkpoint_interval_s", self.checkpoint_interval_s)
        yield from check_range("max_steps", self.max_steps, 0)
        if self.batch_size > 0 and (problem := global_batch_problem(self.batch_size, self.global_batch_size)):
            yield "global_batch_size", problem
        if self.max_tokens is not None:
            yield from check_positive("max_tokens", self.max_tokens)
        yield from check_range("min_lr", self.min_lr, 0, self.lr)
        yield from check_range("warmup_steps", self.warmup_steps, 0)
        yield from check_range("weight_decay", self.weight_decay, 0)
        yield from check_range("beta1", self.beta1, 0, 1, closed="[)")
        yield from check_range("beta2", self.beta2, 0, 1, closed="[)")
        yield from check_range("grad_clip", self.grad_clip, 0)
        yield from check_range("sample_interval", self.sample_interval, 0)


# Settings a killed run may change and still resume: they decide what is reported, kept and registered,
# and where and how fast it runs, not which weights a step computes. Any other setting is part of the
# run's fingerprint (a new one counts by default, which sets old checkpoints aside rather than mixing runs).
RUN_ONLY_SETTINGS = frozenset({
    "device", "precision", "compile", "log_interval", "eval_interval", "eval_batches", "sample_interval",
    "sample_prompt", "sample_tokens", "checkpoint_interval", "checkpoint_interval_s", "keep_checkpoints",
    "keep_superseded", "registered_model", "registered_encoder",
})


def weight_settings(config: TrainConfig) -> dict[str, Any]:
    """The settings of a training section that shape its weights (all but RUN_ONLY_SETTINGS)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RUN_ONLY_SETTINGS}


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    init_from: str = "scratch"  # scratch, a GPT-2 size (gpt2 ... gpt2-xl), or a checkpoint folder
    # Where the training windows are cut (llm/shards.py RandomWindows): `shifted`, at new boundaries every
    # epoch; `fixed`, at the book's, every context_length tokens from the split's start, each epoch the
    # same windows in a new order (on a small corpus the model then learns them by heart, as the book's do).
    # The val windows follow: spread over the val split, or (fixed) the book's, on the grid from its start.
    windows: WindowGrid = "shifted"
    registered_model: str = "gpt-base"  # the MLflow registry name of the result (a GPT: model.objective causal)
    registered_encoder: str = "encoder-base"  # ... of an encoder (model.objective: masked)
    # BERT's corruption, for an encoder (llm/masking.py): the positions chosen, and of those the ones that
    # become the mask token and a random token (the rest stay as they are).
    mask_rate: float = 0.15
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1

    def problems(self) -> Iterator[Problem]:
        yield from super().problems()
        yield from check_range("mask_rate", self.mask_rate, 0, 1, closed="(]")
        yield from check_range("mask_token_fraction", self.mask_token_fraction, 0, 1)
        yield from check_range("random_token_fraction", self.random_token_fraction, 0, 1)
        if self.mask_token_fraction + self.random_token_fraction > 1:
            yield "random_token_fraction", (
                f"mask_token_fraction + random_token_fraction must be at most 1 (the rest stay unchanged), got "
                f"{self.mask_token_fraction} + {self.random_token_fraction}")

    def registry_name(self, objective: Objective) -> str:
        """The name the result is registered under: a GPT's or an encoder's."""
        return self.registered_encoder if objective == "masked" else self.registered_model


MASKING_SETTINGS = frozenset({"mask_rate", "mask_token_fraction", "random_token_fraction"})


@dataclass(frozen=True)
class TuneConfig(TrainConfig):
    """What the stages that train a trained model further share: where it starts, how long, LoRA."""

    init_from: str = "pretrain"  # the pretrain stage's model, a GPT-2 size (gpt2 ... gpt2-xl), or a folder
    epochs: float | None = 1.0  # passes over the train split; sets max_steps (None: use max_steps)
    dropout: float | None = None  # the starting model's dropout, changed for this training; None: keep it
    lora_rank: int = 0  # 0: no adapters; else LoRA adapters of this rank, merged into the result
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                             "mlp.c_proj"])

    def problems(self) -> Iterator[Problem]:
        yield from super().problems()
        if self.epochs is not None:
            yield from check_positive("epochs", self.epochs)
        if self.dropout is not None:
            yield from check_range("dropout", self.dropout, 0, 1, closed="[)")
        yield from check_range("lora_rank", self.lora_rank, 0)
        yield from check_positive("lora_alpha", self.lora_alpha)
        if self.lora_rank and not self.lora_targets:
            yield "lora_targets", "must name at least one linear layer kind when lora_rank > 0"


@dataclass(frozen=True)
class FinetuneConfig(TuneConfig):
    """Instruction fine-tuning (the book's chapter 7): TrainConfig's settings, with fine-tuning defaults."""

    instructions: str = "instruction-data"  # the download source (role: instructions) to learn from
    prompt_style: PromptStyle = "alpaca"
    mask_prompt: bool = False  # learn the response only, not the prompt's tokens
    max_length: int | None = None  # truncate examples to this many tokens; None: the model's context
    train_fraction: float = 0.85  # the book's split: 85% train, 10% test, the rest (5%) val
    test_fraction: float = 0.10
    split_seed: int | None = None  # None: keep the file's order, as the book does; else shuffle by seed
    registered_model: str = "gpt-instruct"
    # Fine-tuning defaults: a lower, constant learning rate and no warmup, as the book trains.
    seed: int = 123
    lr: float = 3e-4
    min_lr: float = 3e-4
    warmup_steps: int = 0
    eval_interval: int = 25
    eval_batches: int = 4
    checkpoint_interval: int = 25
    sample_interval: int = 50
    sample_tokens: int = 48

    def problems(self) -> Iterator[Problem]:
        yield from super().problems()
        yield from check_fractions("train_fraction", self.train_fraction, "test_fraction", self.test_fraction, "val")
        if self.max_length is not None:
            yield from check_range("max_length", self.max_length, 2)


Trainable = Literal["last-block", "all", "lora"]


@dataclass(frozen=True)
class ClassifyConfig(TuneConfig):
    """Classification fine-tuning (the book's chapter 6): a class head on a trained GPT.

    The book trains GPT-2 124M's last block at lr 5e-5; these defaults (every weight at 2e-4) are what a
    small CPU-pretrained model needs (params.yaml has the figures)."""

    data: str = "sms-spam"  # the download source (role: classification) to learn from
    # What trains: the book's last transformer block with the final LayerNorm and the head, every
    # weight, or LoRA adapters on lora_targets (and the head), merged into the saved model.
    trainable: Trainable = "all"
    pooling: Pooling = "last"  # classify from the last real token, the mean of all, or the first (an encoder's)
    max_length: int | None = None  # cut texts to this many tokens; None: the longest training text's
    balance: bool = True  # undersample every class to the smallest one's size, as the book does
    train_fraction: float = 0.7  # the book's split: 70% train, 10% val, the rest (20%) test
    val_fraction: float = 0.1
    split_seed: int = 123
    registered_model: str = "gpt-classifier"
    epochs: float | None = 5.0
    seed: int = 123
    lr: float = 2e-4
    min_lr: float = 2e-4  # constant, as the book trains
    warmup_steps: int = 0
    eval_interval: int = 50
    eval_batches: int = 5  # the book's eval_iter
    checkpoint_interval: int = 50
    sample_interval: int = 0  # a classifier writes no text
    lora_rank: int = 16  # used with trainable: lora

    def problems(self) -> Iterator[Problem]:
        yield from super().problems()
        yield from check_fractions("train_fraction", self.train_fraction, "val_fraction", self.val_fraction, "test")
        if self.max_length is not None:
            yield from check_range("max_length", self.max_length, 1)
        if self.trainable == "lora" and not self.lora_rank:
            yield "lora_rank", "must be positive with trainable: lora (e.g. 16)"


# A response's log-probability, in preference tuning: the mean over its tokens (the book's), or their sum
# (the DPO paper's).
LogProb = Literal["mean", "sum"]


@dataclass(frozen=True)
class PreferenceConfig(TuneConfig):
    """Preference tuning with DPO (the book's chapter 7 bonus): the instruction model taught to prefer
    each pair's chosen response over its rejected one, against a frozen copy of itself.

    The defaults are the book's (beta 0.1, lr 5e-6, weight decay 0.01, batch 8, one epoch, no dropout) but
    for the learning rate, which params.yaml sets for the small CPU model (it has the figures)."""

    init_from: str = "finetune"  # the finetune stage's model, a GPT-2 size, or a checkpoint folder
    data: str = "instruction-data-with-preference"  # the download source (role: preference) to learn from
    prompt_style: PromptStyle | None = None  # None: the starting model's (its config.json)
    beta: float = 0.1  # how far from the reference the policy may move: DPO's temperature
    logprob: LogProb = "mean"
    max_length: int | None = None  # cut prompt + response to this many tokens; None: the model's context
    # A record that is not an object, lacks a field or has chosen == rejected: left out and counted (true;
    # the book's file has 6 pairs whose two responses are equal), or refused with its index (false).
    skip_invalid: bool = True
    # No split settings: the pairs split by finetune's (train_fraction, test_fraction, split_seed), so
    # that the test pairs are the test records evaluate answers, whatever finetune's settings are.
    registered_model: str = "gpt-instruct"  # a new version of the instruction model
    seed: int = 123
    dropout: float | None = 0.0
    lr: float = 5e-6
    min_lr: float = 5e-6
    warmup_steps: int = 0
    weight_decay: float = 0.01
    eval_interval: int = 25
    eval_batches: int = 4
    checkpoint_interval: int = 25
    sample_interval: int = 50
    sample_tokens: int = 48

    def problems(self) -> Iterator[Problem]:
        yield from super().problems()
        yield from check_positive("beta", self.beta)
        if self.max_length is not None:
            yield from check_range("max_length", self.max_length, 2)


@dataclass(frozen=True)
class JudgeConfig:
    """An optional LLM judge (llm/judge.py): an Ollama-compatible server and the model that scores."""

    url: str | None = None  # an Ollama server, e.g. http://127.0.0.1:11434 (or its /api/chat); None: no judge
    model: str = "llama3"  # a model the server has pulled
    timeout_s: float = 120.0  # per request: to connect, for each line of the answer, and for the whole answer
    seed: int = 123  # seed, temperature 0 and num_ctx as in the book, for repeatable scores
    temperature: float = 0.0
    num_ctx: int = 2048  # the judge's context window, in its tokens

    def problems(self) -> Iterator[Problem]:
        if self.url is not None:
            parts = urlparse(self.url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                yield "url", (f"must be an http(s) URL of an Ollama server, e.g. http://127.0.0.1:11434, "
                              f"got {self.url!r}")
        if not self.model.strip():
            yield "model", "must name a model the judge server has, e.g. llama3"
        yield from check_positive("timeout_s", self.timeout_s)
        yield from check_range("temperature", self.temperature, 0)
        yield from check_positive("num_ctx", self.num_ctx)

    @property
    def endpoint(self) -> str:
        base = (self.url or "").rstrip("/")
        return base if base.endswith("/api/chat") else f"{base}/api/chat"


@dataclass(frozen=True)
class EvaluateConfig:
    device: Device = "auto"
    precision: Precision = INFERENCE_PRECISION  # fp32: the same scores on any machine; bf16/auto: faster
    batch_size: int = 8  # val windows per forward pass, for perplexity
    generate_batch_size: int = 8  # test prompts generated together
    max_new_tokens: int = 64  # the book generates up to 256
    temperature: float = 0.0  # 0: greedy, as the book evaluates
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 123
    examples: int = 5  # test prompts shown in the report, base and fine-tuned side by side
    test_records: int | None = None  # evaluate the first N test records only; None: all of them
    # The download source (role: hellaswag) to score every model on, as llm.c scores HellaSwag; None: none.
    # Off by default: the file is not in the offline mirror, and 10,042 items x 4 endings per model is a
    # GPU's work (the GPU recipes turn it on). Items of batch_size x 4 rows go through the model at once.
    hellaswag: str | None = None
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def problems(self) -> Iterator[Problem]:
        for key in ("batch_size", "generate_batch_size", "max_new_tokens"):
            yield from check_positive(key, getattr(self, key))
        yield from check_range("temperature", self.temperature, 0)
        if self.top_k is not None:
            yield from check_range("top_k", self.top_k, 1)
        if self.top_p is not None:
            yield from check_range("top_p", self.top_p, 0, 1, closed="(]")
        yield from check_range("examples", self.examples, 0)
        if self.test_records is not None:
            yield from check_positive("test_records", self.test_records)
        if self.hellaswag is not None and not self.hellaswag.strip():
            yield "hellaswag", ("must name a download source with role hellaswag, e.g. hellaswag-val, or be null "
                                "for no HellaSwag scores")


_CRON_FIELD = re.compile(r"[0-9A-Za-z*/,?LW#-]+")


@dataclass(frozen=True)
class ScheduleConfig:
    """When Prefect reruns the pipeline (`python -m flows.schedule`): `dvc repro`, then `dvc push`."""

    cron: str = "0 3 * * *"  # minute hour day-of-month month day-of-week: every day at 03:00
    timezone: str = "UTC"
    push: bool = False  # push data and checkpoints to the DVC remote after each run
    deployment: str = "scheduled"  # the Prefect deployment's name: pipeline/<deployment>

    def problems(self) -> Iterator[Problem]:
        fields = self.cron.split()
        if len(fields) not in (5, 6) or not all(_CRON_FIELD.fullmatch(f) for f in fields):
            yield "cron", f"must be a cron expression of 5 fields, e.g. '0 3 * * *' (daily at 03:00), got {self.cron!r}"


@dataclass(frozen=True)
class ServingConfig:
    """Caps on one request to a logged model (`mlflow models serve`): a request above them is answered
    HTTP 400, instead of holding the server for as long as it asks. Logged with each model."""

    max_new_tokens: int = 1024  # tokens generated per prompt
    max_prompts: int = 32  # prompts per request

    def problems(self) -> Iterator[Problem]:
        for key in ("max_new_tokens", "max_prompts"):
            yield from check_positive(key, getattr(self, key))


ExportFormat = Literal["hf", "gguf"]  # a Hugging Face folder; a GGUF file for llama.cpp and Ollama
GGUFType = Literal["f32", "f16", "q8_0"]


@dataclass(frozen=True)
class ExportConfig:
    """What the export stage makes of the evaluate stage's best model (llm/export.py says what each is)."""

    formats: list[ExportFormat] = field(default_factory=lambda: ["hf", "gguf"])  # []: export nothing
    gguf_dtype: GGUFType = "f16"  # 2-D weights; norms, biases and the position embedding stay f32


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "llm-pipeline"  # the MLflow experiment every stage logs to


@dataclass(frozen=True)
class Params:
    """Every section of params.yaml; a missing section takes its defaults."""

    download: DownloadConfig = field(default_factory=DownloadConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelSection = field(default_factory=ModelSection)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


def read_yaml(path: str | Path) -> Any:
    """Parse YAML 1.2 (so `3e-4` is a number, as DVC's `-S` writes it), naming the file on errors."""
    from ruamel.yaml import YAML, YAMLError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([("", f"{path} not found; run from the project root or pass its path")], str(path))
    try:
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:
        raise ConfigError([("", f"is not valid YAML: {exc}")], str(path)) from exc


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate every section of `path`."""
    return from_mapping(Params, read_yaml(path), source=str(path))
