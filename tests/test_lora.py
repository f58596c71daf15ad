"""LoRA: adapters start as a no-op, only they train, merging keeps the logits, refusals say what to do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from llm.checkpoint import load_model, save_model
from llm.config import TrainConfig
from llm.instructions import InstructionBatches, collate, validation_batches
from llm.lora import BLOCK_TARGETS, LoRALinear, apply_lora, merge_lora, trainable_parameters
from llm.model import GPT, model_config
from llm.tracking import MemoryTracker
from llm.train import Trainer
from llm.validation import from_mapping
from tests.data import copy_examples, one_thread

IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
LAYERS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def tiny(tie_weights: bool = True) -> GPT:
    torch.manual_seed(0)
    return GPT(model_config("tiny", vocab_size=512, context_length=64, tie_weights=tie_weights)).eval()


def test_a_fresh_adapter_changes_nothing():
    model = tiny()
    before = model(IDS)
    names = apply_lora(model, rank=4, alpha=8, targets=BLOCK_TARGETS)
    assert names == [f"h.{i}.{layer}" for i in range(2) for layer in LAYERS]
    assert isinstance(model.h[1].mlp.c_proj, LoRALinear)
    assert torch.equal(model(IDS), before)


def test_only_the_adapters_train_and_the_weights_keep_their_names():
    model = tiny()
    names = set(model.state_dict())
    apply_lora(model, rank=4, alpha=8, targets=["c_attn", "mlp.c_fc"])
    adapters = {f"h.{i}.{layer}.lora_{m}" for i in range(2) for layer in ("attn.c_attn", "mlp.c_fc")
                for m in "AB"}
    assert {name for name, p in model.named_parameters() if p.requires_grad} == adapters
    assert set(model.state_dict()) == names | adapters
    # rank x (in + out) per layer: c_attn is 64 -> 192, c_fc 64 -> 256.
    assert trainable_parameters(model) == 2 * (4 * (64 + 192) + 4 * (64 + 256))


@pytest.mark.parametrize("tie_weights, lora_targets", [(True, BLOCK_TARGETS), (False, ("c_proj", "lm_head"))])
def test_training_moves_only_the_adapters_and_merging_keeps_the_logits(tmp_path, tie_weights, lora_targets):
    model = tiny(tie_weights)
    frozen = copy.deepcopy(model.state_dict())
    base_logits = model(IDS)
    apply_lora(model, rank=4, alpha=8, targets=lora_targets)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs, targets = collate(copy_examples(8), pad_id=511)
    model.train()
    for _ in range(5):
        model(inputs, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    state = model.state_dict()
    for name, tensor in frozen.items():
        assert torch.equal(state[name], tensor), name
    adapted = model(IDS).detach()
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapters learned something

    assert merge_lora(model) is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.h[0].attn.c_proj) is nn.Linear and set(model.state_dict()) == set(frozen)
    assert all(p.requires_grad for p in model.parameters())
    assert (model.lm_head.weight is model.wte.weight) == tie_weights
    merged = model(IDS).detach()
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    save_model(model, tmp_path / "merged")
    assert torch.equal(load_model(tmp_path / "merged")(IDS), merged)


def test_an_unknown_target_is_refused_and_the_model_left_as_it_was():
    model = tiny()
    message = (r"^LoRA target 'attn.c_q' matches no linear layer; the model's linear layers are attn.c_attn, "
               r"attn.c_proj, mlp.c_fc, mlp.c_proj, lm_head \(a target is a layer's name or its end after a "
               r"'.'\)$")
    with pytest.raises(ValueError, match=message):
        apply_lora(model, rank=4, alpha=8, targets=["attn.c_attn", "attn.c_q"])
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_a_tied_head_is_refused():
    with pytest.raises(ValueError, match=r"^LoRA cannot target lm_head: its weight is tied to wte.weight "
                                         r"\(tie_weights: true\), and merging the adapter would change "
                                         r"wte.weight too; leave lm_head out of the targets, or use a model "
                                         r"with tie_weights: false$"):
        apply_lora(tiny(), rank=4, alpha=8, targets=["lm_head"])


def test_bad_settings_and_a_second_application_are_refused():
    model = tiny()
    with pytest.raises(ValueError, match=r"^LoRA needs rank >= 1 and alpha > 0, got rank 0, alpha 8$"):
        apply_lora(model, rank=0, alpha=8, targets=BLOCK_TARGETS)
    with pytest.raises(ValueError, match=r"^no LoRA targets given; name some of the model's linear layers: "
                                         r"attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, lm_head$"):
        apply_lora(model, rank=4, alpha=8, targets=[])
    apply_lora(model, rank=4, alpha=8, targets=BLOCK_TARGETS)
    with pytest.raises(ValueError, match=r"^the model already has LoRA adapters; merge them with merge_lora "
                                         r"first$"):
        apply_lora(model, rank=4, alpha=8, targets=BLOCK_TARGETS)


def test_the_trainer_trains_adapters_and_resumes_them(tmp_path):
    def adapted() -> GPT:
        model = tiny()
        apply_lora(model, rank=4, alpha=8, targets=BLOCK_TARGETS)
        return model

    config = from_mapping(TrainConfig, {
        "batch_size": 4, "global_batch_size": 8, "max_steps": 6, "lr": 1e-2, "warmup_steps": 2,
        "log_interval": 3, "eval_interval": 3, "sample_interval": 0, "checkpoint_interval": 3,
        "precision": "fp32", "device": "cpu"})
    val = validation_batches(copy_examples(8, seed=1), 8, pad_id=511)

    def fit(model: GPT) -> nn.Module:
        batches = InstructionBatches(copy_examples(32), config.batch_size, config.seed, pad_id=511,
                                     global_batch_size=config.global_batch_size)
        trainer = Trainer(model, batches, val, config, tmp_path, settings={"test": "lora"}, tracker=MemoryTracker())
        return trainer.fit().model

    trained = fit(adapted())
    resumed = fit(adapted())  # finds the step-6 checkpoint: the adapters come back from it
    for (name, p), q in zip(trained.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name
    for name, tensor in tiny().state_dict().items():
        assert torch.equal(trained.state_dict()[name], tensor), name
    assert any(p.abs().max() > 0 for name, p in trained.named_parameters() if name.endswith("lora_B"))
