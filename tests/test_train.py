"""The trainer: it learns, resumes exactly after a kill -9, guards against NaN, refuses mismatches."""

from __future__ import annotations

import os
import subprocess
import sys
import shutil
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from llm.config import Params

from llm.pretrain import CheckpointMismatch, initial_model, run_pretrain
from llm.shards import read_manifest
from llm.tracking import MemoryTracker
from llm.train import TrainingDiverged, latest_checkpoint
from llm.validation import ConfigError, from_mapping
from tests.conftest import ROOT
from tests.data import make_shards, patterned_tokens

VOCAB = 512  # small, so the head does not dominate a test's time

TRAIN = {"batch_size": 4, "global_batch_size": 8, "lr": 3e-3, "warmup_steps": 3, "log_interval": 2,
         "eval_interval": 5, "eval_batches": 2, "sample_interval": 10, "sample_tokens": 5,
         "sample_prompt": " the and of",  # GPT-2 ids below VOCAB
         "checkpoint_interval": 5, "precision": "fp32", "device": "cpu"}


def params(**pretrain) -> Params:
    return from_mapping(Params, {"model": {"preset": "tiny", "vocab_size": VOCAB, "context_length": 32},
                                 "pretrain": {**TRAIN, **pretrain}})


@pytest.fixture
def shards(tmp_path) -> Path:
    return make_shards(tmp_path / "shards", patterned_tokens(6000), patterned_tokens(800), vocab_size=VOCAB)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(folder / "model.safetensors")


def test_loss_falls_and_everything_is_reported(tmp_path, shards):
    tracker = MemoryTracker()
    result = run_pretrain(params(max_steps=20), shards, tmp_path / "out", tracker=tracker)
    val = tracker.series("val_loss")
    assert val[0][0] == 0 and val[0][1] > 5.5  # about ln(512) = 6.2 at the start
    assert val[-1] == (20, result.metrics["val_loss"]) and val[-1][1] < val[0][1] - 2
    assert result.precision_used == "fp32"
    assert [s for s, _ in tracker.series("train_loss")] == list(range(2, 21, 2))
    for name in ("lr", "grad_norm", "tokens_per_s", "mfu", "peak_flops", "tokens"):
        assert len(tracker.series(name)) == 10
    # MFU is the FLOP/s the steps reached over the peak that each report carries beside it
    flops_per_token = result.model.flops_per_token()
    for (_, mfu), (_, rate), (_, peak) in zip(*(tracker.series(n) for n in ("mfu", "tokens_per_s", "peak_flops"))):
        assert mfu == pytest.approx(rate * flops_per_token / peak)
    assert result.metrics["peak_flops"] == tracker.series("peak_flops")[-1][1] > 0
    assert tracker.series("tokens")[-1][1] == 20 * 8 * 32
    assert set(tracker.texts) == {"samples/step-000010.txt", "samples/step-000020.txt"}
    assert tracker.texts["samples/step-000020.txt"].startswith(" the and of")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "resume").iterdir()) == ["step-000015", "step-000020"]


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_the_gradient_norm_is_computed_where_it_clips_or_is_reported(tmp_path, shards, monkeypatch, grad_clip):
    import llm.optim
    import llm.train

    measured: list[float] = []

    def counting(model, max_norm):
        measured.append(llm.optim.clip_gradients(model, max_norm))
        return measured[-1]

    monkeypatch.setattr(llm.train, "clip_gradients", counting)
    tracker = MemoryTracker()
    run_pretrain(params(max_steps=7, log_interval=3, grad_clip=grad_clip), shards, tmp_path / "out", tracker=tracker)
    reported = tracker.series("grad_norm")
    assert [step for step, _ in reported] == [3, 6, 7]
    # with clipping off, only the reporting steps (and the last) pay for the norm; with it on, every step
    assert len(measured) == (3 if grad_clip == 0 else 7)
    assert all(norm > 0 for _, norm in reported) and {norm for _, norm in reported} <= set(measured)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, shards):
    big = run_pretrain(params(max_steps=3, batch_size=8, global_batch_size=8), shards, tmp_path / "a",
                       tracker=MemoryTracker())
    accumulated = run_pretrain(params(max_steps=3, batch_size=2, global_batch_size=8), shards, tmp_path / "b",
                               tracker=MemoryTracker())
    assert accumulated.metrics["train_loss"] == pytest.approx(big.metrics["train_loss"], abs=1e-5)
    for name, tensor in weights(tmp_path / "a").items():
        torch.testing.assert_close(weights(tmp_path / "b")[name], tensor, atol=1e-5, rtol=1e-4)


RUN = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from pathlib import Path
    from llm.config import Params
    from llm.validation import from_mapping
    from llm.pretrain import run_pretrain
    from llm.tracking import MemoryTracker
    import json
    params = from_mapping(Params, json.loads(sys.argv[3]))
    run_pretrain(params, Path(sys.argv[1]), Path(sys.argv[2]), tracker=MemoryTracker())
""")


def run_stage(shards: Path, out: Path, settings: dict) -> subprocess.Popen:
    import json

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", RUN, str(shards), str(out), json.dumps(settings)], env=env,
                            stderr=subprocess.PIPE, text=True)


def test_other_settings_set_the_checkpoints_aside_and_start_over(tmp_path, shards, caplog):
    out = tmp_path / "out"
    run_pretrain(params(max_steps=5), shards, out, tracker=MemoryTracker())
    before = weights(out / "resume" / "step-000005")
    tracker = MemoryTracker()
    with caplog.at_level("WARNING", logger="llm.checkpoint"):
        run_pretrain(params(max_steps=5, lr=1e-3), shards, out, tracker=tracker)
    assert tracker.series("val_loss")[0][0] == 0  # evaluated at step 0: a fresh start
    (aside,) = (out / "resume").glob("superseded-*")
    assert [p.name for p in aside.iterdir()] == ["step-000005"]  # nothing deleted
    assert all(torch.equal(before[k], v) for k, v in weights(aside / "step-000005").items())
    message = caplog.text
    assert "pretrain.lr: 0.003 -> 0.001" in message
    assert f"moved to {aside}" in message and f"set init_from: {aside / 'step-000005'}" in message


def test_at_most_keep_superseded_sets_are_kept_aside(tmp_path, shards):
    out = tmp_path / "out"
    for lr in (1e-3, 2e-3, 3e-3, 4e-3):
        run_pretrain(params(max_steps=2, lr=lr, keep_superseded=2), shards, out, tracker=MemoryTracker())
    assert len(list((out / "resume").glob("superseded-*"))) == 2


def test_settings_that_leave_the_weights_alone_resume(tmp_path, shards):
    out = tmp_path / "out"
    run_pretrain(params(max_steps=10, checkpoint_interval=3), shards, out, tracker=MemoryTracker())
    shutil.rmtree(out / "resume" / "step-000010")  # as if killed after step 9's checkpoint
    tracker = MemoryTracker()
    changed = dict(log_interval=1, eval_interval=7, eval_batches=1, sample_interval=0, checkpoint_interval=4,
                   keep_checkpoints=3, sample_prompt=" of", registered_model="other", precision="bf16")
    result = run_pretrain(params(max_steps=10, **changed), shards, out, tracker=tracker)
    assert [step for step, _ in tracker.series("train_loss")] == [10]  # resumed at step 9: one step left
    assert result.precision_used == "fp32 then bf16"
    assert not list((out / "resume").glob("superseded-*"))


class StepClock:
    """A monotonic clock that moves `seconds_per_step` at the end of every training step, and not otherwise."""

    def __init__(self, seconds_per_step: float) -> None:
        self.now, self.seconds_per_step = 0.0, seconds_per_step

    def monotonic(self) -> float:
        return self.now

    def step_ends(self, point: str) -> None:
        if point == "train.step":
            self.now += self.seconds_per_step


@pytest.mark.parametrize("interval_s, saved", [(None, [10]), (10.0, [4, 7, 10]), (3600.0, [10])])
def test_checkpoints_also_come_every_checkpoint_interval_s(tmp_path, shards, monkeypatch, interval_s, saved):
    import llm.train

    clock = StepClock(seconds_per_step=4.0)  # 10 s are due at the third step after the last checkpoint
    monkeypatch.setattr(llm.train, "time", SimpleNamespace(monotonic=clock.monotonic, perf_counter=time.perf_counter))
    monkeypatch.setattr(llm.train.faults, "pause_point", clock.step_ends)
    out = tmp_path / "out"
    run_pretrain(params(max_steps=10, checkpoint_interval=100, checkpoint_interval_s=interval_s, keep_checkpoints=5),
                 shards, out, tracker=MemoryTracker())
    assert sorted(int(path.name.removeprefix("step-")) for path in (out / "resume").glob("step-*")) == saved


def test_checkpoint_interval_s_must_be_positive():
    with pytest.raises(ConfigError, match=r"pretrain.checkpoint_interval_s: must be > 0, got 0"):
        params(checkpoint_interval_s=0)


def test_new_code_starts_over_instead_of_resuming_a_finished_run(tmp_path, shards, monkeypatch):
    import llm.pretrain

    run_pretrain(params(max_steps=5), shards, tmp_path / "out", tracker=MemoryTracker())
    monkeypatch.setattr(llm.pretrain, "code_fingerprint", lambda module: {"llm/model.py": "after an edit"})
    tracker = MemoryTracker()
    run_pretrain(params(max_steps=5), shards, tmp_path / "out", tracker=tracker)
    assert [step for step, _ in tracker.series("train_loss")] == [2, 4, 5]  # trained again, from the start


@pytest.mark.parametrize("damage", ["model.safetensors", "state.pt", "trainer.json"])
def test_an_unreadable_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, shards, damage, caplog):
    run_pretrain(params(max_steps=10), shards, tmp_path / "whole", tracker=MemoryTracker())
    out = tmp_path / "out"
    run_pretrain(params(max_steps=10), shards, out, tracker=MemoryTracker())
    newest = out / "resume" / "step-000010"
    path = newest / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a torn write
    tracker = MemoryTracker()
    with caplog.at_level("WARNING", logger="llm.checkpoint"):
        run_pretrain(params(max_steps=10), shards, out, tracker=tracker)
    assert f"checkpoint {newest} cannot be read back" in caplog.text
    assert [step for step, _ in tracker.series("train_loss")] == [6, 8, 10]  # resumed at step 5
    assert (out / "resume" / "unreadable-step-000010" / damage).is_file()  # set aside, not deleted
    expected, actual = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


class NaNAfter:
    """Wraps a model's forward so that its loss turns NaN from the `after`-th call on."""

    def __init__(self, model, after: int):
        self.calls, self.after, self.forward = 0, after, model.forward
        model.forward = self

    def __call__(self, idx, targets=None):
        self.calls += 1
        out = self.forward(idx, targets)
        return out * float("nan") if targets is not None and self.calls > self.after else out


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path, shards, monkeypatch):
    import llm.pretrain

    made = {}
    real = llm.pretrain.initial_model

    def poisoned(p, manifest):
        model = made["model"] = real(p, manifest)
        # 4 micro-batches a step, 2 val batches every 5 steps and at 0: call 50 falls in step 11
        NaNAfter(model, after=49)
        return model

    monkeypatch.setattr(llm.pretrain, "initial_model", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 11; stopped before applying it. The last "
                                                r"good checkpoint is .*step-000010"):
        run_pretrain(params(max_steps=20, batch_size=2), shards, tmp_path / "out", tracker=MemoryTracker())
    assert all(torch.isfinite(p).all() for p in made["model"].parameters())
    assert latest_checkpoint(tmp_path / "out").name == "step-000010"


def test_a_start_checkpoint_that_does_not_fit_is_refused_naming_both(tmp_path, shards):
    from llm.checkpoint import save_model
    from llm.model import GPT, model_config

    other = tmp_path / "other"
    save_model(GPT(model_config("tiny", vocab_size=VOCAB, context_length=32, n_layer=3)), other)
    with pytest.raises(CheckpointMismatch, match=rf"{other} has n_layer=3, but params.yaml's model section says "
                                                 "n_layer=2; set the model section"):
        initial_model(params(init_from=str(other)), read_manifest(shards))
    save_model(GPT(model_config("tiny", vocab_size=VOCAB, context_length=32)), other, tokenizer="cl100k_base")
    with pytest.raises(CheckpointMismatch, match="trained with tokenizer 'cl100k_base', but the shards use 'gpt2'"):
        initial_model(params(init_from=str(other)), read_manifest(shards))
    matching = {**read_manifest(shards), "tokenizer": "cl100k_base"}
    assert initial_model(params(init_from=str(other)), matching).config.n_layer == 2


def test_training_settings_are_validated():
    with pytest.raises(ConfigError) as info:
        from_mapping(Params, {"pretrain": {"batch_size": 3, "global_batch_size": 8, "min_lr": 1.0, "lr": 0.1},
                              "model": {"preset": "tiny", "n_head": 3}})
    problems = dict(info.value.problems)
    assert problems["pretrain.global_batch_size"] == "must be a multiple of batch_size (3), got 8"
    assert problems["pretrain.min_lr"] == "must be in [0, 0.1], got 1.0"
    assert problems["model.n_embd"] == "must be divisible by n_head (3), got 64"


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    import llm.checkpoint
    # A real EFBIG from the kernel on the second checkpoint's first file: RLIMIT_FSIZE caps any file this
    # process writes. Ignoring SIGXFSZ makes the write fail with the error instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    real, calls = llm.checkpoint.ResumeStore.save, []
    def save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY))
        return real(self, *args, **kwargs)
    llm.checkpoint.ResumeStore.save = save
""")


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_fails_clearly_and_keeps_the_previous_one(tmp_path, shards):
    settings = {"model": {"preset": "tiny", "vocab_size": VOCAB, "context_length": 32},
                "pretrain": {**TRAIN, "max_steps": 15}}
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    import json

    full = subprocess.run([sys.executable, "-c", FULL_DISK + RUN, str(shards), str(out), json.dumps(settings)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stderr
    assert (f"llm.checkpoint.CheckpointWriteError: could not write the checkpoint of step 10 under {out / 'resume'}: "
            f"Error while serializing: I/O error: File too large (os error 27)") in full.stderr
    assert (f"The checkpoint {out / 'resume' / 'step-000005'} is intact; free disk space (or raise the file size "
            f"limit) and rerun to continue from it") in full.stderr
    assert [p.name for p in (out / "resume").iterdir()] == ["step-000005"]  # no half-written step-000010
    assert not list(out.rglob(".tmp-*"))

    again = run_stage(shards, out, settings)
    assert again.wait(timeout=300) == 0, again.stderr.read()
    run_pretrain(params(max_steps=15), shards, tmp_path / "whole", tracker=MemoryTracker())
    expected, actual = weights(tmp_path / "whole"), weights(out)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
