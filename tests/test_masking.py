"""The encoder (model.objective: masked): bidirectional attention, BERT's corruption (llm/masking.py), its
pretraining and exact resume, the fill-in command and model, the encoder as a classifier's backbone, and
everything that needs a causal model refusing it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch

from llm import fill
from llm.checkpoint import CheckpointError, load_model, save_model
from llm.config import Params
from llm.masking import Masking, MaskedBatches, corrupt, draws, masked_token_metrics, masked_val_batches
from llm.model import GPT, IGNORE_INDEX, ModelConfig, model_config
from llm.pretrain import run_pretrain
from llm.shards import RandomWindows, TokenStream
from llm.tracking import MemoryTracker
from llm.validation import ConfigError, from_mapping
from tests.data import DiesAtStep, Killed, make_shards, one_thread

VOCAB = 512  # GPT-2 ids below it; the mask token is 512


def encoder(**overrides) -> GPT:
    return GPT(model_config("tiny", vocab_size=VOCAB, objective="masked", **overrides))


def tokens(B: int, T: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T))


# ---------------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_the_encoder_sees_later_tokens(attention):
    model = encoder(attention=attention).eval()
    idx = tokens(2, 24)
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % VOCAB
    before, after = model(idx), model(changed)
    assert (before[:, :15] - after[:, :15]).abs().amax(dim=-1).min() > 1e-4  # every earlier position moved


def test_sdpa_equals_explicit_attention_without_the_causal_mask_and_with_padding():
    torch.manual_seed(0)
    sdpa, explicit = encoder(attention="sdpa"), encoder(attention="explicit")
    explicit.load_state_dict(sdpa.state_dict())
    assert not hasattr(explicit.h[0].attn, "mask")  # no causal mask buffer at all
    idx, targets = tokens(4, 40), tokens(4, 40)
    torch.testing.assert_close(sdpa(idx), explicit(idx), rtol=1e-5, atol=1e-5)
    sdpa(idx, targets).backward()
    explicit(idx, targets).backward()
    for (name, a), b in zip(sdpa.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    real = torch.ones(4, 40, dtype=torch.bool)
    real[1, 25:] = False
    torch.testing.assert_close(sdpa.forward_hidden(idx, padding_mask=real),
                               explicit.forward_hidden(idx, padding_mask=real), rtol=1e-5, atol=1e-5)


def test_padding_is_invisible_to_the_real_tokens():
    model = encoder().eval()
    idx = tokens(1, 12)
    padded = torch.cat([idx, torch.full((1, 7), 5)], dim=1)
    real = torch.arange(19)[None] < 12
    torch.testing.assert_close(model.forward_hidden(padded, padding_mask=real)[:, :12], model.forward_hidden(idx),
                               rtol=1e-5, atol=1e-5)


def test_the_mask_token_is_an_input_only():
    model = encoder()
    assert model.config.mask_token_id == VOCAB and model.wte.weight.shape == (VOCAB + 1, 64)
    assert model.lm_head.weight is model.wte.weight  # tied, and sliced: the head predicts real tokens only
    assert model(torch.tensor([[VOCAB, 3, VOCAB]])).shape == (1, 3, VOCAB)
    with pytest.raises(ValueError, match="a causal model has no mask token"):
        model_config("tiny").mask_token_id


def test_a_config_without_objective_is_a_causal_model_and_objective_is_saved(tmp_path):
    saved = model_config("tiny").to_dict()
    del saved["objective"]
    assert ModelConfig.from_dict(saved).objective == "causal"
    save_model(encoder(), tmp_path / "enc")
    assert load_model(tmp_path / "enc").config.objective == "masked"
    with pytest.raises(ConfigError, match="model.objective: must be one of 'causal', 'masked'"):
        from_mapping(Params, {"model": {"objective": "bert"}})


# ---------------------------------------------------------------------------------------------------
# The corruption


def test_the_corruption_chooses_15_percent_and_replaces_them_80_10_10_never_padding():
    config = model_config("tiny", vocab_size=50257, objective="masked")
    original = torch.randint(0, 50257, (64, 256))
    real = torch.arange(256)[None] < torch.randint(100, 257, (64, 1))  # right padding
    inputs, targets = corrupt(original, Masking(), config, draws(7, 1, 0), real)
    chosen = targets != IGNORE_INDEX
    assert not (chosen & ~real).any() and torch.equal(inputs[~real], original[~real])
    assert torch.equal(targets[chosen], original[chosen])
    assert torch.equal(inputs[~chosen], original[~chosen])  # nothing else changes
    n = int(chosen.sum())
    assert abs(n / int(real.sum()) - 0.15) < 0.01
    masked = inputs == config.mask_token_id
    assert not (masked & ~chosen).any()
    kept = chosen & (inputs == original)
    randomized = chosen & ~masked & ~kept
    assert abs(int(masked.sum()) / n - 0.8) < 0.02
    assert abs(int(randomized.sum()) / n - 0.1) < 0.015
    assert abs(int(kept.sum()) / n - 0.1) < 0.015 + 1 / 50257  # a random token may equal the original
    assert int(inputs[randomized].max()) < 50257  # a random token is a real one, never the mask


def test_the_corruption_is_a_function_of_its_draws_and_every_row_gets_a_target():
    config = encoder().config
    x = tokens(16, 8)
    a, b = corrupt(x, Masking(), config, draws(1, 1, 3)), corrupt(x, Masking(), config, draws(1, 1, 3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], corrupt(x, Masking(), config, draws(1, 1, 4))[0])
    rare = corrupt(x, Masking(rate=0.01), config, draws(1, 1, 0))[1]
    assert ((rare != IGNORE_INDEX).sum(dim=1) >= 1).all()  # BERT's max(1, ...)


def test_masked_batches_resume_exactly_from_their_state(tmp_path):
    stream = TokenStream.from_manifest(make_shards(tmp_path, np.arange(3000) % 400, np.arange(300) % 400,
                                                   vocab_size=VOCAB), "train")
    config = encoder().config

    def source():
        return MaskedBatches(RandomWindows(stream, 16, 4, seed=3), Masking(), config, seed=3)

    whole = source()
    expected = [whole.next_batch() for _ in range(6)]
    first = source()
    for _ in range(4):
        first.next_batch()
    resumed = source()
    resumed.load_state_dict(first.state_dict())
    for x, y in expected[4:]:
        got = resumed.next_batch()
        assert torch.equal(got[0], x) and torch.equal(got[1], y)


# ---------------------------------------------------------------------------------------------------
# Pretraining an encoder

TRAIN = {"batch_size": 8, "global_batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "log_interval": 10,
         "eval_interval": 100, "eval_batches": 4, "sample_interval": 200, "sample_prompt": " the and of",
         "checkpoint_interval": 100, "precision": "fp32", "device": "cpu"}


def params(**pretrain) -> Params:
    return from_mapping(Params, {"model": {"preset": "tiny", "vocab_size": VOCAB, "context_length": 32,
                                           "objective": "masked"}, "pretrain": {**TRAIN, **pretrain}})


WORDS = " the and of to a in is it you that he was for on are with as I his they"  # GPT-2 ids below VOCAB


def runs(count: int, length: int, seed: int) -> np.ndarray:
    """Runs of one word, drawn at random from WORDS: a masked token is its neighbours', which only a model
    that looks at them (on either side) can tell; knowing which words are frequent gets 1 in 20."""
    from llm.tokenizer import get_tokenizer

    ids = np.array(get_tokenizer("gpt2").encode_ordinary(WORDS))
    return np.repeat(np.random.default_rng(seed).choice(ids, count // length + 1), length)[:count]


@pytest.fixture(scope="module")
def run_shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"), runs(60000, 256, 0), runs(4000, 256, 1), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_shards) -> tuple[Path, MemoryTracker]:
    out, tracker = tmp_path_factory.mktemp("encoder") / "out", MemoryTracker()
    with one_thread():
        run_pretrain(params(max_steps=300), run_shards, out, tracker=tracker)
    return out, tracker


def test_an_encoders_masked_token_loss_falls_and_its_accuracy_approaches_one(trained):
    out, tracker = trained
    loss, accuracy, top5 = (tracker.series(f"val_{name}") for name in ("loss", "accuracy", "top5_accuracy"))
    assert [step for step, _ in accuracy] == [0, 100, 200, 300]
    assert loss[0][1] > 5.5 and loss[-1][1] < 0.5  # from about ln(512) = 6.2
    assert accuracy[-1][1] > 0.9 and top5[-1][1] >= accuracy[-1][1]
    assert tracker.texts["samples/step-000200.txt"].startswith(" the and of [MASK]\n[MASK] 1: ")
    assert load_model(out).config.is_encoder


def test_an_encoder_run_killed_and_resumed_ends_with_the_same_weights(tmp_path, run_shards):
    settings = params(max_steps=12, log_interval=2, eval_interval=4, checkpoint_interval=4, sample_interval=0)
    with one_thread():
        run_pretrain(settings, run_shards, tmp_path / "whole", tracker=MemoryTracker())
        with pytest.raises(Killed):
            run_pretrain(settings, run_shards, tmp_path / "killed", tracker=DiesAtStep(10))
        run_pretrain(settings, run_shards, tmp_path / "killed", tracker=MemoryTracker())
    expected = safetensors.torch.load_file(tmp_path / "whole" / "model.safetensors")
    actual = safetensors.torch.load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_masked_token_metrics_count_every_target_once(trained, run_shards):
    model = load_model(trained[0])
    stream = TokenStream.from_manifest(run_shards, "val")
    windows = [(torch.from_numpy(stream.window(i * 32, 32).astype(np.int64))[None], None) for i in range(5)]
    batches = masked_val_batches(windows, Masking(), model.config, seed=0)
    measured = masked_token_metrics(model, batches)
    assert measured.targets == sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
    assert measured.accuracy > 0.9 and measured.top5_accuracy >= measured.accuracy


# ---------------------------------------------------------------------------------------------------
# Filling in masks


def test_fill_prints_the_top_k_tokens_for_each_mask(trained, capsys):
    out, _ = trained
    assert fill.main(["--checkpoint", str(out), "--top-k", "3", " the the the [MASK] the the [MASK] and"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[MASK] 1: ' the' ") and lines[1].startswith("[MASK] 2: ")
    assert len(lines[0].split(", ")) == 3


def test_a_space_before_a_mask_belongs_to_the_token_that_fills_it():
    from llm.tokenizer import get_tokenizer

    enc = get_tokenizer("gpt2")
    ids = fill.encode_masked(enc, "The capital of France is [MASK].", 99999)
    assert ids == enc.encode_ordinary("The capital of France is") + [99999] + enc.encode_ordinary(".")
    with pytest.raises(ValueError, match=r"the text has no \[MASK\]"):
        fill.encode_masked(enc, "no blanks here", 99999)


def test_the_encoder_is_logged_as_a_mask_filling_model(trained, tmp_path, monkeypatch):
    import mlflow

    from llm.registry import log_gpt_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # An experiment of its own, whose artifacts stay in tmp_path: the default one's go to ./mlruns.
    experiment = mlflow.create_experiment("encoder", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        version = log_gpt_model(trained[0], "test-encoder")
    served = mlflow.pyfunc.load_model(f"models:/test-encoder/{version}")
    rows = served.predict(pd.DataFrame({"text": [" the the [MASK] the", " and and [MASK] and [MASK]"]}),
                          params={"top_k": 2})
    assert list(rows.columns) == ["text", "mask", "rank", "token", "probability"]
    assert rows[["text", "mask", "rank"]].values.tolist() == [[0, 1, 1], [0, 1, 2], [1, 1, 1], [1, 1, 2],
                                                              [1, 2, 1], [1, 2, 2]]
    assert rows.iloc[0]["token"] == " the" and rows.iloc[2]["token"] == " and"


# ---------------------------------------------------------------------------------------------------
# What needs a causal model refuses an encoder


def test_generate_and_chat_refuse_an_encoder(trained, capsys):
    from llm import chat, generate

    out, _ = trained
    assert generate.main(["--checkpoint", str(out), "--prompt", "hi"]) == 1
    assert (f"{out} is an encoder (model.objective: masked), not a causal language model: it predicts masked "
            f"tokens and cannot generate text; fill in masks with `python -m llm.fill --checkpoint {out} "
            f"\"The capital of France is [MASK].\"`") in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="is an encoder .*cannot generate text"):
        chat.chat(out, generate.Sampling(), 5, "cpu")
    with pytest.raises(ValueError, match=r"an encoder \(model.objective: masked\) does not generate text"):
        generate.generate(load_model(out), [[1, 2]], 3)


def test_the_classify_command_refuses_an_encoder(trained, capsys):
    from llm import classify

    out, _ = trained
    assert classify.main(["--checkpoint", str(out), "hello"]) == 1
    assert (f"{out} is an encoder, not a classifier: fill in masks with `python -m llm.fill --checkpoint {out} "
            f"TEXT`, or train one with `dvc repro classify`") in capsys.readouterr().err


def test_fill_refuses_a_causal_model(tmp_path, capsys):
    save_model(GPT(model_config("tiny", vocab_size=VOCAB)), tmp_path / "gpt")
    assert fill.main(["--checkpoint", str(tmp_path / "gpt"), "a [MASK]"]) == 1
    assert f"{tmp_path / 'gpt'} is a causal model (model.objective: causal), not an encoder" in capsys.readouterr().err


def test_instruction_and_preference_tuning_refuse_an_encoder(trained, tmp_path):
    from llm.starting import starting_model

    out, _ = trained
    for section, purpose in (("finetune", "instruction tuning"), ("preference", "preference tuning")):
        with pytest.raises(CheckpointError) as caught:
            starting_model(str(out), out, section=section, causal_for=purpose)
        assert str(caught.value) == (
            f"{section}.init_from: {out} is an encoder (model.objective: masked), but {purpose} needs a causal "
            f"language model (objective: causal): start from a GPT (the pretrain stage's with model.objective: "
            f"causal, a GPT-2 size such as gpt2, or a causal checkpoint folder); an encoder fine-tunes with the "
            f"classify stage")


def test_the_finetune_stage_refuses_an_encoder_before_reading_data(trained, tmp_path):
    from llm.finetune import run_finetune

    with pytest.raises(CheckpointError, match=r"finetune.init_from: .* is an encoder .* instruction tuning needs"):
        run_finetune(from_mapping(Params, {}), tmp_path / "raw", trained[0], tmp_path / "out", tracker=MemoryTracker())


def test_gpt2_weights_do_not_load_into_an_encoder(tmp_path):
    from llm.gpt2_weights import WeightsError, gpt2_from_files

    with pytest.raises(WeightsError, match=r"holds GPT-2, a causal language model: its weights do not make an "
                                           r"encoder \(model.objective: masked\); set model.objective: causal"):
        gpt2_from_files(tmp_path / "model.safetensors", model_config("tiny", objective="masked"))


def test_a_causal_checkpoint_does_not_start_an_encoder(tmp_path, run_shards):
    from llm.pretrain import CheckpointMismatch

    save_model(GPT(model_config("tiny", vocab_size=VOCAB, context_length=32)), tmp_path / "gpt")
    with pytest.raises(CheckpointMismatch, match=r"has objective=causal, but params.yaml's model section says "
                                                  r"objective=masked"):
        run_pretrain(params(init_from=str(tmp_path / "gpt")), run_shards, tmp_path / "out", tracker=MemoryTracker())


def test_masking_settings_are_checked_in_the_users_words():
    with pytest.raises(ConfigError) as caught:
        params(mask_rate=0, mask_token_fraction=0.9, random_token_fraction=0.2)
    assert caught.value.problems == [
        ("pretrain.mask_rate", "must be in (0, 1], got 0.0"),
        ("pretrain.random_token_fraction", "mask_token_fraction + random_token_fraction must be at most 1 (the "
                                           "rest stay unchanged), got 0.9 + 0.2")]
