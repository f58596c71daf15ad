"""Text classification with a GPT (the book's chapter 6): labelled texts, their split, batches, the
classifier and its scores, and a command that classifies texts.

    python -m flows.classify                                       (what `dvc repro classify` runs)
    python -m llm.classify --checkpoint data/checkpoints/classify "You won a free cruise, call now"
    python -m llm.classify --checkpoint data/checkpoints/classify - < messages.txt     (one per line)

The data is a download source with role `classification`: delimited text (csv, tsv), JSON (a list of
objects), JSON Lines or Parquet, with a text field and a label field. Labels are whatever strings the
data holds, numbered in sorted order; the list is saved in the model's config.json. As the book does,
every class is undersampled (seeded) to the size of the smallest, then the texts are split 70 / 10 / 20
(seeded) into train / val / test, and the split is saved beside the model (`split.json`) so that every
score is on the same records.

The classifier is the starting GPT with its head replaced by an `n_embd -> num_classes` one (a
`ModelConfig` with `num_classes`), trained by llm.train.Trainer like every other stage. Texts are cut
at `max_length` tokens and right-padded with end-of-text to the longest text of their batch; a causal
model classifies from its last real token (or the mean over real tokens, `pooling: mean`), which the
padding after it cannot reach.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm.checkpoint import SPLIT_FILE, CheckpointError, read_config
from llm.config import INFERENCE_PRECISION, ClassifyConfig, Params, Precision, weight_settings
from llm.distributed import Dist
from llm.download import downloaded_source
from llm.files import atomic_path, read_json, sha256_file, write_json_atomic
from llm.generate import add_device_options, load_for_inference
from llm.imports import code_fingerprint
from llm.lora import apply_lora, merge_lora, trainable_parameters
from llm.model import GPT, IGNORE_INDEX, ModelConfig, eval_mode
from llm.sampler import EpochBatches, steps_for_epochs
from llm.starting import starting_model, starting_weights
from llm.tokenizer import get_tokenizer
from llm.train import Batch, Trainer, TrainResult

if TYPE_CHECKING:
    from llm.tracking import Tracker

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class ClassificationDataError(ValueError):
    """Classification data that cannot be used; the message names the file, the record and the fix."""


# ---------------------------------------------------------------------------------------------------
# Labelled texts


@dataclass(frozen=True)
class LabeledText:
    text: str
    label: str


def load_texts(path: str | Path, kind: str, text_field: str, label_field: str,
               columns: Sequence[str] | None = None) -> list[LabeledText]:
    """The (text, label) records of a csv / tsv (header row, or `columns` naming a headerless file's
    columns), json, jsonl or parquet file. A label is kept as the string the file holds."""
    path = Path(path)
    if kind in ("csv", "tsv", "parquet"):
        rows = _table_rows(path, kind, text_field, label_field, columns)
    elif kind in ("json", "jsonl"):
        rows = _json_rows(path, kind, text_field, label_field)
    else:
        raise ClassificationDataError(f"{path}: kind {kind!r} is not a classification format; use csv, tsv, json, "
                                      f"jsonl or parquet")
    texts = []
    for i, (text, label) in enumerate(rows):
        where = f"{path}: record {i}"
        if not isinstance(text, str) or not text.strip():
            raise ClassificationDataError(f"{where}: {text_field!r} must be a non-empty text, got {text!r}; fix or "
                                          f"remove the record")
        if label is None or isinstance(label, (dict, list)) or str(label) == "":
            raise ClassificationDataError(f"{where}: {label_field!r} must be a label (a string or a number), got "
                                          f"{label!r}; fix or remove the record")
        texts.append(LabeledText(text, str(label)))
    if not texts:
        raise ClassificationDataError(f"{path}: holds no records")
    return texts


def _table_rows(path: Path, kind: str, text_field: str, label_field: str,
                columns: Sequence[str] | None) -> list[tuple[Any, Any]]:
    import pyarrow as pa
    import pyarrow.csv as pv
    import pyarrow.parquet as pq

    wanted = [text_field, label_field]
    try:
        if kind == "parquet":
            table = pq.read_table(path, columns=wanted)
        else:
            # A tab-separated file's text is taken as it is: its quotes are part of the messages (the SMS
            # Spam Collection has unbalanced ones), as `cut -f` reads it.
            parse = pv.ParseOptions(delimiter="\t", quote_char=False) if kind == "tsv" else pv.ParseOptions()
            table = pv.read_csv(path, read_options=pv.ReadOptions(column_names=list(columns) if columns else None),
                                parse_options=parse,
                                convert_options=pv.ConvertOptions(include_columns=wanted,
                                                                  column_types={c: pa.string() for c in wanted}))
    except (pa.ArrowInvalid, KeyError) as exc:
        found = f"; its columns are {', '.join(_columns(path, kind, columns))}" if "column" in str(exc).lower() else ""
        raise ClassificationDataError(f"{path}: cannot be read as {kind} with text field {text_field!r} and label "
                                      f"field {label_field!r} ({exc}){found}; fix the file or the source's "
                                      f"text_field, label_field and columns in params.yaml") from None
    return list(zip(table.column(text_field).to_pylist(), table.column(label_field).to_pylist()))


def _columns(path: Path, kind: str, columns: Sequence[str] | None) -> list[str]:
    import pyarrow.csv as pv
    import pyarrow.parquet as pq

    if columns:
        return list(columns)
    if kind == "parquet":
        return pq.read_schema(path).names
    delimiter = "\t" if kind == "tsv" else ","
    with pv.open_csv(path, parse_options=pv.ParseOptions(delimiter=delimiter, quote_char=False)) as reader:
        return reader.schema.names


def _json_rows(path: Path, kind: str, text_field: str, label_field: str) -> list[tuple[Any, Any]]:
    text = path.read_text(encoding="utf-8")
    if kind == "json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClassificationDataError(f"{path}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(values, list):
            raise ClassificationDataError(f"{path}: a json source must hold a list of records; for one record "
                                          f"per line set kind: jsonl")
        lines = [(f"record {i}", v) for i, v in enumerate(values)]
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    lines.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ClassificationDataError(f"{path}: line {number} is not valid JSON: {exc.msg}") from None
    rows = []
    for where, value in lines:
        if not isinstance(value, dict) or text_field not in value or label_field not in value:
            keys = ", ".join(value) if isinstance(value, dict) else type(value).__name__
            raise ClassificationDataError(f"{path}: {where} must be an object with {text_field!r} and {label_field!r}, "
                                          f"got {keys}; fix the file or the source's text_field and label_field")
        rows.append((value[text_field], value[label_field]))
    return rows


def label_names(texts: Sequence[LabeledText]) -> list[str]:
    """The classes, in sorted order: a label's index is its class id."""
    return sorted({t.label for t in texts})


def balance(texts: Sequence[LabeledText], seed: int) -> list[LabeledText]:
    """Every class undersampled to the smallest class's size (the book's create_balanced_dataset), by a
    seeded draw; the records keep the file's order."""
    by_label: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        by_label.setdefault(t.label, []).append(i)
    size = min(len(indices) for indices in by_label.values())
    rng = np.random.default_rng(seed)
    kept = sorted(i for label in sorted(by_label) for i in rng.choice(by_label[label], size, replace=False))
    return [texts[i] for i in kept]


@dataclass(frozen=True)
class Split:
    labels: list[str]
    train: list[LabeledText]
    val: list[LabeledText]
    test: list[LabeledText]


def split_texts(texts: Sequence[LabeledText], *, train: float = 0.7, val: float = 0.1, seed: int = 123) -> Split:
    """A seeded shuffle cut into train, val and test (the rest), sized int(n * train), int(n * val) as the
    book's random_split does."""
    n = len(texts)
    n_train, n_val = int(n * train), int(n * val)
    if min(n_train, n_val, n - n_train - n_val) == 0:
        raise ClassificationDataError(f"{n} records split at train {train}, val {val} leave a split empty (train "
                                      f"{n_train}, val {n_val}, test {n - n_train - n_val}); use more records")
    order = [texts[i] for i in np.random.default_rng(seed).permutation(n)]
    return Split(label_names(texts), order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])


def write_split(path: str | Path, split: Split) -> None:
    write_json_atomic(path, {"labels": split.labels,
                             **{name: [dataclasses.asdict(t) for t in getattr(split, name)] for name in SPLITS}})


def read_split(path: str | Path) -> Split:
    path = Path(path)
    if not path.is_file():
        raise ClassificationDataError(f"{path}: not found; run the classify stage first (`dvc repro classify`)")
    data = read_json(path)
    return Split(list(data["labels"]), *([LabeledText(**t) for t in data[name]] for name in SPLITS))


# ---------------------------------------------------------------------------------------------------
# Tokens and batches


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]  # the text's tokens, cut at max_length
    label: int  # the class id
    cut: bool = False  # whether max_length cut the text


def encode_texts(texts: Sequence[LabeledText], labels: Sequence[str], tokenizer: str,
                 max_length: int | None = None) -> list[Example]:
    """Each text's tokens, at most `max_length`, with its class id. `encode_ordinary` reads an
    "<|endoftext|>" in a text as plain text, so no text holds the padding token."""
    ids = get_tokenizer(tokenizer).encode_ordinary_batch([t.text for t in texts])
    index = {label: i for i, label in enumerate(labels)}
    return cut_to([Example(tuple(tokens), index[t.label]) for tokens, t in zip(ids, texts)], max_length)


def cut_to(examples: Sequence[Example], max_length: int | None) -> list[Example]:
    """The examples cut at `max_length` tokens, those cut marked."""
    if max_length is None:
        return list(examples)
    return [Example(e.ids[:max_length], e.label, e.cut or len(e.ids) > max_length) for e in examples]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Inputs (B, T), right-padded with `pad_id` to the batch's longest text, and targets (B, T): the class id
    at every real token and IGNORE_INDEX at the padding, which is what a classifier GPT's forward takes.

    The book pads every batch to the longest training text; padding to the batch's own longest gives the
    same predictions (no real token sees the padding after it) with far fewer positions, most texts being
    short."""
    width = max(len(e.ids) for e in examples)
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        inputs[row, :len(example.ids)] = torch.tensor(example.ids, dtype=torch.long)
        targets[row, :len(example.ids)] = example.label
    return inputs, targets


def fixed_batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> list[Batch]:
    """Every example once, in order: the same batches at every evaluation."""
    return [collate(examples[i:i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


# ---------------------------------------------------------------------------------------------------
# The classifier


def classifier_from(lm: GPT, num_classes: int, pooling: str, seed: int) -> GPT:
    """`lm` with its head replaced by a new `n_embd -> num_classes` one (seeded N(0, 0.02), as GPT-2
    initialises a linear layer); every other weight is `lm`'s."""
    config = ModelConfig.from_dict({**lm.config.to_dict(), "num_classes": num_classes, "pooling": pooling,
                                    "tie_weights": False}, source="the classifier's model config")
    model = GPT.empty(config)
    state = {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    torch.manual_seed(seed)
    nn.init.normal_(model.lm_head.weight, mean=0.0, std=0.02)
    return model


def set_trainable(model: GPT, config: ClassifyConfig) -> None:
    """Freeze what `config.trainable` leaves out: the book's last block + final LayerNorm + head, every
    weight, or LoRA adapters (and the new head, which starts from nothing)."""
    if config.trainable == "last-block":
        model.requires_grad_(False)
        for module in (model.h[-1], model.ln_f, model.lm_head):
            module.requires_grad_(True)
    elif config.trainable == "lora":
        torch.manual_seed(config.seed)  # the adapters' initialisation
        apply_lora(model, config.lora_rank, config.lora_alpha, config.lora_targets)
        model.lm_head.requires_grad_(True)


@torch.no_grad()
def predict(model: GPT, batches: Sequence[Batch]) -> tuple[Tensor, Tensor, Tensor]:
    """Class probabilities (N, num_classes), predicted class ids (N,) and true ids (N,) over `batches`."""
    device = model.lm_head.weight.device
    probs, truth = [], []
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            probs.append(F.softmax(model.class_logits(x, y != IGNORE_INDEX).float(), dim=-1))
            truth.append(y.amax(dim=1))
    p = torch.cat(probs)
    return p, p.argmax(dim=1), torch.cat(truth)


def accuracy(model: GPT, batches: Sequence[Batch]) -> float:
    _, predicted, truth = predict(model, batches)
    return (predicted == truth).float().mean().item()


def scores(probs: Tensor, predicted: Tensor, truth: Tensor, labels: Sequence[str],
           split: str) -> tuple[dict[str, float], list]:
    """`split`'s loss, accuracy and per-class precision, recall and F1 from `predict`'s output (flat keys, for
    metrics/classify.json), and its confusion matrix (rows: true class, columns: predicted)."""
    loss = F.nll_loss(probs.clamp(min=1e-12).log(), truth).item()
    n = len(labels)
    matrix = torch.zeros(n, n, dtype=torch.long)
    matrix.index_put_((truth.cpu(), predicted.cpu()), torch.ones_like(truth.cpu()), accumulate=True)
    metrics = {f"{split}_loss": loss, f"{split}_accuracy": (predicted == truth).float().mean().item()}
    for i, label in enumerate(labels):
        hits, said, there = matrix[i, i].item(), matrix[:, i].sum().item(), matrix[i, :].sum().item()
        precision = hits / said if said else 0.0
        recall = hits / there if there else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        metrics.update({f"{split}_precision_{label}": precision, f"{split}_recall_{label}": recall,
                        f"{split}_f1_{label}": f1})
    return metrics, matrix.tolist()


# ---------------------------------------------------------------------------------------------------
# The stage


def data_file(raw_dir: str | Path, config: ClassifyConfig) -> tuple[Path, dict]:
    return downloaded_source(raw_dir, "classification", config.data, "classify.data")


def run_settings(params: Params, raw_dir: str | Path, pretrain_dir: str | Path) -> dict[str, Any]:
    """What shapes the classifier's weights: what a resumable checkpoint must match."""
    config = params.classify
    return {"classify": weight_settings(config), "start": starting_weights(config.init_from, pretrain_dir, "classify"),
            "data": sha256_file(data_file(raw_dir, config)[0]), "code": code_fingerprint(__name__)}


def prepare_split(raw_dir: str | Path, config: ClassifyConfig, out_dir: Path) -> Split:
    path, entry = data_file(raw_dir, config)
    texts = load_texts(path, entry["kind"], entry["text_field"], entry["label_field"], entry.get("columns"))
    labels = label_names(texts)
    if len(labels) < 2:
        raise ClassificationDataError(f"{path}: every record has the label {labels[0]!r}; a classifier needs at "
                                      f"least two classes")
    if config.balance:
        texts = balance(texts, config.split_seed)
    split = split_texts(texts, train=config.train_fraction, val=config.val_fraction, seed=config.split_seed)
    write_split(out_dir / SPLIT_FILE, split)
    return split


@dataclass(frozen=True)
class Prepared:
    """What the classifier's training and its scoring share: the split, its examples, the text length."""

    split: Split
    examples: dict[str, list[Example]]
    pad_id: int
    length: int  # max_length: the tokens a text is cut to

    @property
    def truncated(self) -> dict[str, int]:
        """Per split, the texts cut at `length`."""
        return {name: sum(e.cut for e in found) for name, found in self.examples.items()}

    def batches(self, name: str, batch_size: int, limit: int | None = None) -> list[Batch]:
        return fixed_batches(self.examples[name][:None if limit is None else limit * batch_size], batch_size,
                             self.pad_id)


def prepare(raw_dir: str | Path, config: ClassifyConfig, out_dir: Path, tokenizer: str, context_length: int, *,
            warn: bool = True) -> Prepared:
    split = prepare_split(raw_dir, config, out_dir)
    whole = {name: encode_texts(getattr(split, name), split.labels, tokenizer) for name in SPLITS}
    length = min(config.max_length or max(len(e.ids) for e in whole["train"]), context_length)
    examples = {name: cut_to(found, length) for name, found in whole.items()}
    prepared = Prepared(split, examples, get_tokenizer(tokenizer).eot_token, length)
    for name, cut in prepared.truncated.items():
        if cut and warn:
            log.warning("classify: %d of %d %s texts are longer than %d tokens and are cut to it%s", cut,
                        len(examples[name]), name, length,
                        "" if length == context_length else "; raise classify.max_length to keep more")
    return prepared


def run_classify(params: Params, raw_dir: str | Path, pretrain_dir: str | Path, out_dir: str | Path, *,
                 tracker: Tracker, dist: Dist = Dist(), run_id: str | None = None,
                 settings: dict[str, Any] | None = None) -> TrainResult:
    """Train the classifier and leave it (LoRA merged), its history and `split.json` in `out_dir`."""
    config, out_dir = params.classify, Path(out_dir)
    lm, tokenizer = starting_model(config.init_from, pretrain_dir, section="classify", dropout=config.dropout)
    if lm.config.is_classifier:
        raise CheckpointError(f"classify.init_from: {config.init_from} is a classifier already; start from a "
                              f"language model (the pretrain stage's, a GPT-2 size or its folder)")
    data = prepare(raw_dir, config, out_dir, tokenizer, lm.config.context_length, warn=dist.is_main)
    model = classifier_from(lm, len(data.split.labels), config.pooling, config.seed)
    set_trainable(model, config)
    config = steps_for_epochs(config, len(data.examples["train"]))  # epochs, where set, decide the length of the run
    batches = EpochBatches(data.examples["train"], functools.partial(collate, pad_id=data.pad_id),
                           config.batch_size, config.seed, global_batch_size=config.global_batch_size,
                           rank=dist.rank, world_size=dist.world_size)
    # As the book's train_classifier_simple: at every evaluation, accuracy on the first eval_batches batches.
    watched = {name: data.batches(name, config.batch_size, config.eval_batches) for name in ("train", "val")}

    def evaluator(model: nn.Module) -> dict[str, float]:
        return {f"{name}_accuracy": accuracy(model, b) for name, b in watched.items()}

    extra = {"stage": "classify", "init_from": config.init_from, "labels": data.split.labels,
             "max_length": data.length, "truncated_texts": data.truncated, "trainable": config.trainable,
             "trainable_parameters": trainable_parameters(model)}
    trainer = Trainer(model, batches, watched["val"], config, out_dir,
                      settings=settings or run_settings(params, raw_dir, pretrain_dir), tracker=tracker,
                      tokenizer=tokenizer, run_id=run_id, dist=dist, checkpoint_extra=extra,
                      export=merge_lora if config.trainable == "lora" else None, evaluator=evaluator)
    return trainer.fit()


@dataclass(frozen=True)
class Scores:
    metrics: dict[str, float]  # flat keys, for metrics/classify.json: test_accuracy, test_f1_spam, ...
    labels: list[str]
    confusion: list[list[int]]  # the test split's: rows the true class, columns the predicted one
    wrong: list[dict[str, Any]]  # the test texts it gets wrong: text, label, predicted, probability


def final_scores(model: GPT, out_dir: str | Path, batch_size: int) -> Scores:
    """Loss, accuracy, per-class precision / recall / F1 on the saved split's train, val and test texts,
    the test confusion matrix and the test texts it gets wrong. In fp32, so that the scores do not depend
    on the machine's bf16."""
    saved = read_config(out_dir)
    split = read_split(Path(out_dir) / SPLIT_FILE)
    model = model.float()
    pad_id, length = get_tokenizer(saved.tokenizer).eot_token, saved.extra["max_length"]
    metrics: dict[str, float] = {}
    for name in SPLITS:
        examples = encode_texts(getattr(split, name), split.labels, saved.tokenizer, length)
        probs, predicted, truth = predict(model, fixed_batches(examples, batch_size, pad_id))
        found, matrix = scores(probs, predicted, truth, split.labels, name)
        metrics.update(found)  # the loop ends on test: `probs`, `predicted` and `matrix` are the test split's
    wrong = [{"text": t.text, "label": t.label, "predicted": split.labels[p],
              "probability": round(probs[i, p].item(), 4)}
             for i, (t, p) in enumerate(zip(split.test, predicted.tolist())) if split.labels[p] != t.label]
    return Scores(metrics, split.labels, matrix, wrong)


def write_report(path: str | Path, scored: Scores, confusion_plot: str | Path, examples: int = 10) -> Path:
    """The classifier's scores as Markdown: accuracy per split, per-class figures on test, the confusion
    matrix, and some of the test texts it gets wrong."""
    path, m = Path(path), scored.metrics
    lines = ["# Classification", "", "| split | loss | accuracy |", "| --- | --- | --- |"]
    lines += [f"| {s} | {m[f'{s}_loss']:.4f} | {m[f'{s}_accuracy']:.2%} |" for s in SPLITS]
    lines += ["", "Test split, per class:", "", "| class | precision | recall | F1 |", "| --- | --- | --- | --- |"]
    lines += [f"| {c} | {m[f'test_precision_{c}']:.2%} | {m[f'test_recall_{c}']:.2%} | {m[f'test_f1_{c}']:.2%} |"
              for c in scored.labels]
    plot = Path(os.path.relpath(Path(confusion_plot).resolve(), path.resolve().parent)).as_posix()
    lines += ["", f"![confusion matrix of the test split]({plot})", "",
              f"{len(scored.wrong)} of {sum(map(sum, scored.confusion))} test texts misclassified"
              + (":" if scored.wrong else "."), ""]
    if scored.wrong:
        lines += ["| text | label | predicted | probability |", "| --- | --- | --- | --- |"]
        lines += [f"| {_cell(w['text'])} | {w['label']} | {w['predicted']} | {w['probability']:.3f} |"
                  for w in scored.wrong[:examples]]
    with atomic_path(path) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------------
# Classifying texts


class Classifier:
    """A saved classifier and its tokenizer: texts in, (label, probability of every class) out.

        classifier = Classifier("data/checkpoints/classify")
        classifier(["You won a free cruise, call now"])   # [("spam", {"ham": 0.03, "spam": 0.97})]
    """

    def __init__(self, checkpoint: str | Path, device: str = "cpu", batch_size: int = 16,
                 precision: Precision = INFERENCE_PRECISION):
        saved = read_config(checkpoint)
        if not saved.model.is_classifier:
            use = (f"fill in masks with `python -m llm.fill --checkpoint {checkpoint} TEXT`" if saved.model.is_encoder
                   else f"generate with `python -m llm.generate --checkpoint {checkpoint}`")
            kind = "an encoder" if saved.model.is_encoder else "a language model"
            raise CheckpointError(f"{checkpoint} is {kind}, not a classifier: {use}, or train one with "
                                  f"`dvc repro classify`")
        self.model = load_for_inference(checkpoint, device, precision)  # fp32 by default: the same on every machine
        self.labels: list[str] = list(saved.extra["labels"])
        self.length, self.tokenizer, self.batch_size = int(saved.extra["max_length"]), saved.tokenizer, batch_size

    def __call__(self, texts: Sequence[str]) -> list[tuple[str, dict[str, float]]]:
        records = [LabeledText(t, self.labels[0]) for t in texts]
        examples = [e if e.ids else dataclasses.replace(e, ids=(self.pad_id,))
                    for e in encode_texts(records, self.labels, self.tokenizer, self.length)]
        if not examples:
            return []
        probs, predicted, _ = predict(self.model, fixed_batches(examples, self.batch_size, self.pad_id))
        return [(self.labels[p], {label: probs[i, j].item() for j, label in enumerate(self.labels)})
                for i, p in enumerate(predicted.tolist())]

    @property
    def pad_id(self) -> int:
        return get_tokenizer(self.tokenizer).eot_token


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.classify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("data/checkpoints/classify"),
                        help="a classifier's checkpoint folder (default: the classify stage's)")
    parser.add_argument("texts", nargs="+", help="texts to classify; - reads one text per line from stdin")
    add_device_options(parser)
    args = parser.parse_args(argv)
    texts = [line for t in args.texts for line in (sys.stdin.read().splitlines() if t == "-" else [t]) if line.strip()]
    try:
        classifier = Classifier(args.checkpoint, args.device, precision=args.precision)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for text, (label, probs) in zip(texts, classifier(texts)):
        print(f"{label}\t{probs[label]:.3f}\t{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
