"""Preference tuning with DPO (llm/preference.py): the loss against a hand computation, what the masks
leave out, a frozen reference, a margin that rises, the split finetune uses, bad records, exact resume."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from llm.checkpoint import SPLIT_FILE, load_model, read_config, save_model
from llm.config import Params
from llm.validation import from_mapping
from llm.download import write_manifests
from llm.instructions import load_records, split_records
from llm.model import GPT, IGNORE_INDEX, model_config
from llm.preference import (DPOObjective, PairBatches, PreferenceDataError, collate_pairs, dpo_loss, encode_pairs,
                            final_scores, load_pairs, read_pairs_split, run_preference, sequence_logprobs,
                            split_pairs)
from llm.tracking import MemoryTracker
from llm.train import Trainer
from tests.conftest import shared_file
from tests.data import DiesAtStep, Killed

SUBJECTS = "cats dogs rain tea trains music books the sea coffee winter".split()


def toy_records(n: int = 60, seed: int = 0) -> list[dict]:
    """Pairs a tiny model can learn to tell apart: a calm answer is chosen over a rude one."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        subject = rng.choice(SUBJECTS)
        records.append({"instruction": f"Say something about {subject}.", "input": "" if i % 2 else str(i),
                        "output": f"I like {subject}.", "chosen": f"I like {subject}, thank you.",
                        "rejected": f"Go away, {subject} are stupid!"})
    return records


def make_raw(root: Path, records: list) -> Path:
    raw = root / "raw"
    (raw / "preference").mkdir(parents=True)
    (raw / "preference" / "pairs.json").write_text(json.dumps(records))
    write_manifests(raw, [{"name": "pairs", "role": "preference", "kind": "json", "text_field": None,
                           "file": "preference/pairs.json", "url": "x", "sha256": "0" * 64, "bytes": 1}])
    return raw


def tiny_instruct(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_model(GPT(model_config("tiny", context_length=64)), folder, extra={"prompt_style": "alpaca"})
    return folder


PREFERENCE = {"data": "pairs", "batch_size": 4, "global_batch_size": 4, "epochs": None, "max_steps": 12,
              "lr": 1e-3, "min_lr": 1e-3, "log_interval": 2, "eval_interval": 6, "eval_batches": 2,
              "sample_interval": 6, "sample_tokens": 4, "checkpoint_interval": 6, "precision": "fp32",
              "device": "cpu"}


def params(**preference) -> Params:
    return from_mapping(Params, {"preference": {**PREFERENCE, **preference}})


# ---------------------------------------------------------------------------------------------------
# The loss


def test_the_loss_and_rewards_equal_a_hand_computation():
    # two pairs: log-probabilities of chosen 1 and 2, rejected 3 and 4, under policy and reference
    policy = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    reference = torch.tensor([-1.5, -2.0, -2.0, -4.5])
    loss, figures = dpo_loss(policy, reference, beta=0.1)
    # pair 1: chosen reward 0.1 * 0.5 = 0.05, rejected 0.1 * -1.0 = -0.1, margin 0.15
    # pair 2: chosen 0.0, rejected 0.1 * 0.5 = 0.05, margin -0.05
    expected = (-math.log(1 / (1 + math.exp(-0.15))) - math.log(1 / (1 + math.exp(0.05)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert figures["chosen_reward"].item() == pytest.approx(0.025)
    assert figures["rejected_reward"].item() == pytest.approx(-0.025)
    assert figures["reward_margin"].item() == pytest.approx(0.05)
    assert figures["preference_accuracy"].item() == 0.5  # one pair of two has a positive margin
    _, same = dpo_loss(policy, policy, beta=0.1)  # a model against itself: every margin 0, a tie each
    assert same["preference_accuracy"].item() == 0.5 and same["reward_margin"].item() == 0.0


def test_log_probabilities_cover_the_response_and_its_end_of_text_only():
    pair = encode_pairs(load_pairs_from(toy_records(1)), "alpaca")[0]
    short = encode_pairs([dict_pair(instruction="Hi.", chosen="Yes.", rejected="No, go away now.")], "alpaca")[0]
    x, y = collate_pairs([pair, short], pad_id=50256)
    assert x.shape[0] == 4  # chosen, chosen, rejected, rejected
    for row, example in enumerate([pair.chosen, short.chosen, pair.rejected, short.rejected]):
        response = len(example.ids) - example.prompt_len  # the response's tokens and end-of-text
        assert (y[row] != IGNORE_INDEX).sum().item() == response
        assert (y[row, :example.prompt_len - 1] == IGNORE_INDEX).all()  # no prompt target
        assert y[row, example.prompt_len - 1:len(example.ids) - 1].tolist() == list(example.ids[example.prompt_len:])
    torch.manual_seed(0)
    model = GPT(model_config("tiny", context_length=96)).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(x), dim=-1)
        picked = logp.gather(2, y.clamp(min=0)[..., None]).squeeze(2) * (y != IGNORE_INDEX)
        summed = sequence_logprobs(model, x, y, "sum")
        torch.testing.assert_close(summed, picked.sum(1))
        torch.testing.assert_close(sequence_logprobs(model, x, y, "mean"), picked.sum(1) / (y != IGNORE_INDEX).sum(1))


def dict_pair(**fields):
    from llm.preference import PreferencePair

    return PreferencePair(**{"instruction": "", "input": "", "output": "", "chosen": "", "rejected": "", **fields})


def load_pairs_from(records: list[dict]):
    from llm.preference import parse_pair

    return [parse_pair(r, f"record {i}") for i, r in enumerate(records)]


def test_training_raises_the_margin_and_never_changes_the_reference(tmp_path):
    start = load_model(tiny_instruct(tmp_path / "sft"))
    reference = copy.deepcopy(start)
    frozen = {name: p.clone() for name, p in reference.state_dict().items()}
    examples = encode_pairs(load_pairs_from(toy_records(40)), "alpaca")
    objective = DPOObjective(reference, beta=0.1)
    batches = PairBatches(examples, 8, seed=1, pad_id=50256)
    val = [collate_pairs(examples[:8], 50256)]  # training pairs: the margin the steps raise
    config = params(max_steps=15, lr=3e-3, min_lr=3e-3, eval_interval=15, sample_interval=0).preference
    tracker = MemoryTracker()
    Trainer(start, batches, val, config, tmp_path / "out", settings={"test": 1}, tracker=tracker,
            objective=objective).fit()
    margins = tracker.series("val_reward_margin")
    assert margins[0][1] == 0.0 and tracker.series("val_preference_accuracy")[0][1] == 0.5
    assert margins[-1][1] > 0.5 and tracker.series("val_preference_accuracy")[-1][1] == 1.0
    assert tracker.series("val_loss")[-1][1] < math.log(2) - 0.2 < tracker.series("val_loss")[0][1]
    assert tracker.series("train_chosen_reward") and tracker.series("train_preference_accuracy")
    assert not reference.training and all(not p.requires_grad for p in reference.parameters())
    for name, p in reference.state_dict().items():
        assert torch.equal(p, frozen[name]), name


def test_a_sum_of_log_probabilities_scales_with_the_response_length():
    torch.manual_seed(0)
    model = GPT(model_config("tiny", context_length=96)).eval()
    x, y = collate_pairs(encode_pairs(load_pairs_from(toy_records(2)), "alpaca"), 50256)
    with torch.no_grad():
        mean, summed = sequence_logprobs(model, x, y, "mean"), sequence_logprobs(model, x, y, "sum")
    torch.testing.assert_close(summed, mean * (y != IGNORE_INDEX).sum(1))


# ---------------------------------------------------------------------------------------------------
# Data


def test_bad_records_are_refused_with_their_index_and_the_fix(tmp_path):
    good = toy_records(3)
    cases = [([*good, "text"], "record 3 is a string, not an object"),
             ([good[0], {k: v for k, v in good[1].items() if k != "rejected"}], "record 1 has no field 'rejected'"),
             ([good[0], {**good[1], "chosen": good[1]["rejected"]}],
              "record 1: its chosen and rejected responses are equal, which teaches no preference; fix the record, "
              "or set preference.skip_invalid: true")]
    for records, message in cases:
        path = tmp_path / "pairs.json"
        path.write_text(json.dumps(records))
        with pytest.raises(PreferenceDataError, match=message.replace(".", r"\.").replace("(", r"\(")):
            load_pairs(path)


def test_invalid_records_can_be_skipped_and_counted_without_moving_the_split(tmp_path):
    records = toy_records(40)
    records[5] = {**records[5], "chosen": records[5]["rejected"]}
    records[38] = "not a record"
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    loaded = load_pairs(path, skip_invalid=True)
    assert sorted(loaded.skipped) == [5, 38] and loaded.pairs[5] is None
    split = split_pairs(loaded, params().finetune)
    whole = split_records(list(range(40)))  # the same positions, as finetune splits the same file
    assert [p.instruction for p in split.train] == [records[i]["instruction"] for i in whole.train if i != 5]
    assert [p.instruction for p in split.test] == [records[i]["instruction"] for i in whole.test]
    assert len(split.val) == len(whole.val) - 1


def test_the_books_pairs_split_as_finetune_splits_its_instructions(tmp_path):
    loaded = load_pairs(shared_file("instruction-data-with-preference.json"), skip_invalid=True)
    assert len(loaded.pairs) == 1100 and len(loaded.skipped) == 6  # six pairs have equal responses
    pairs = split_pairs(loaded, params().finetune)
    instructions = split_records(load_records(shared_file("instruction-data.json")))
    kept = {(p.instruction, p.input) for p in pairs.test}
    assert [(r.instruction, r.input) for r in instructions.test if (r.instruction, r.input) in kept] == \
        [(p.instruction, p.input) for p in pairs.test]
    assert len(pairs.test) >= 105


# ---------------------------------------------------------------------------------------------------
# The stage


def test_the_stage_learns_saves_its_split_and_scores_val_and_test(tmp_path):
    raw, sft = make_raw(tmp_path, toy_records(60)), tiny_instruct(tmp_path / "sft")
    settings = params(epochs=2, lr=3e-3, min_lr=3e-3)
    result = run_preference(settings, raw, sft, tmp_path / "out", tracker=MemoryTracker())
    split = read_pairs_split(tmp_path / "out" / SPLIT_FILE)
    assert (len(split.train), len(split.test), len(split.val)) == (51, 6, 3)
    assert result.metrics["steps"] == 2 * (51 // 4)
    saved = read_config(tmp_path / "out")
    assert saved.extra["stage"] == "preference" and saved.extra["prompt_style"] == "alpaca"
    scored = final_scores(result.model, settings.preference, sft, tmp_path / "out")
    assert scored["test_preference_accuracy"] > 0.5 and scored["test_reward_margin"] > 0
    assert set(scored) == {f"{s}_{k}" for s in ("val", "test")
                           for k in ("loss", "chosen_reward", "rejected_reward", "reward_margin",
                                     "preference_accuracy")}


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    raw, sft = make_raw(tmp_path, toy_records(40)), tiny_instruct(tmp_path / "sft")
    settings = params(sample_interval=0)
    run_preference(settings, raw, sft, tmp_path / "whole", tracker=MemoryTracker())

    with pytest.raises(Killed):
        run_preference(settings, raw, sft, tmp_path / "killed", tracker=DiesAtStep(8))
    run_preference(settings, raw, sft, tmp_path / "killed", tracker=MemoryTracker())
    ours = safetensors.torch.load_file(tmp_path / "killed" / "model.safetensors")
    for name, p in safetensors.torch.load_file(tmp_path / "whole" / "model.safetensors").items():
        assert torch.equal(p, ours[name]), name


def test_lora_trains_adapters_and_saves_a_plain_model(tmp_path):
    raw, sft = make_raw(tmp_path, toy_records(40)), tiny_instruct(tmp_path / "sft")
    result = run_preference(params(lora_rank=4, sample_interval=0, max_steps=4), raw, sft, tmp_path / "out",
                            tracker=MemoryTracker())
    saved = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert not any("lora" in name for name in saved) and result.metrics["steps"] == 4
    start = safetensors.torch.load_file(sft / "model.safetensors")
    assert any(not torch.equal(saved[n], start[n]) for n in saved if "attn" in n)


def test_a_missing_finetuned_model_says_to_run_finetune(tmp_path):
    raw = make_raw(tmp_path, toy_records(20))
    with pytest.raises(FileNotFoundError, match=r"preference.init_from: .*sft is not a checkpoint folder; run the "
                                                r"finetune stage first \(`dvc repro finetune`\)"):
        run_preference(params(), raw, tmp_path / "sft", tmp_path / "out", tracker=MemoryTracker())


def test_a_classifier_is_refused_as_a_start(tmp_path):
    raw = make_raw(tmp_path, toy_records(20))
    torch.manual_seed(0)
    save_model(GPT(model_config("tiny", num_classes=2, tie_weights=False)), tmp_path / "sft")
    with pytest.raises(ValueError, match="is a classifier; start from an instruction model"):
        run_preference(params(), raw, tmp_path / "sft", tmp_path / "out", tracker=MemoryTracker())


def test_policy_logits_equal_plain_cross_entropy_gradients_through_the_objective():
    """The per-row fused loss inside the objective gives the gradients of the book's plain computation."""
    torch.manual_seed(0)
    model = GPT(model_config("tiny", context_length=96))
    reference = copy.deepcopy(model)
    with torch.no_grad():  # move the policy off the reference, so the margins are not all zero
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, y = collate_pairs(encode_pairs(load_pairs_from(toy_records(4)), "alpaca"), 50256)
    loss, _ = DPOObjective(reference, beta=0.1)(model, x, y)
    ours = torch.autograd.grad(loss, list(model.parameters()))

    def book_logprobs(m):  # the book's compute_logprobs: log_softmax, gather, masked mean
        logp = torch.log_softmax(m(x), dim=-1).gather(2, y.clamp(min=0)[..., None]).squeeze(2)
        mask = (y != IGNORE_INDEX).float()
        return (logp * mask).sum(1) / mask.sum(1)

    with torch.no_grad():
        ref = book_logprobs(reference)
    pol = book_logprobs(model)
    c, r = pol.chunk(2)
    rc, rr = ref.chunk(2)
    book = -F.logsigmoid(0.1 * ((c - r) - (rc - rr))).mean()
    theirs = torch.autograd.grad(book, list(model.parameters()))
    torch.testing.assert_close(loss, book)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
