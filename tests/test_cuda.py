"""On a CUDA GPU: the model, the cache, the optimizer and the training loop compute there as on the CPU.

Skipped without one (every CI host); scripts/gpu-check runs them on a GPU machine. Tiny models, fp32 unless
a test says otherwise (PyTorch leaves TF32 off: CUDA's fp32 matches the CPU's to rounding).
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from llm.checkpoint import load_model
from llm.config import Params
from llm.hardware import bf16_is_fast, peak_flops, resolve_device, train_dtype
from llm.model import GPT, model_config
from llm.optim import adamw
from llm.pretrain import run_pretrain
from llm.tracking import MemoryTracker
from llm.validation import from_mapping
from tests.data import make_shards, patterned_tokens

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu-check)")

VOCAB = 512
CUDA = torch.device("cuda")


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(model_config("tiny", vocab_size=VOCAB, dropout=0.0, **overrides))


def test_the_device_is_known_for_mfu_and_trains_in_bf16():
    assert resolve_device("auto") == CUDA
    assert bf16_is_fast(CUDA) and train_dtype(CUDA) == torch.bfloat16
    name = torch.cuda.get_device_name()
    assert peak_flops(CUDA, torch.bfloat16), f"{name} has no bf16 peak in llm/hardware.py: MFU is not logged"


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_forward_and_gradients_match_the_cpu(attention):
    model = tiny(attention=attention)
    idx = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(1))
    on_cpu = model(idx, idx)
    on_cpu.backward()
    cpu_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        cpu_logits = model(idx)
    model.zero_grad(set_to_none=True)
    model.to(CUDA)
    on_gpu = model(idx.to(CUDA), idx.to(CUDA))
    on_gpu.backward()
    torch.testing.assert_close(on_gpu.cpu(), on_cpu.detach(), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(idx.to(CUDA)).cpu(), cpu_logits, rtol=1e-4, atol=1e-4)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), cpu_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_cached_chunks_equal_one_full_forward():
    model = tiny().to(CUDA).eval()
    idx = torch.randint(0, VOCAB, (2, 30), device=CUDA)
    with torch.inference_mode():
        cache = model.new_cache(batch_size=2)
        pieces = [model.forward_hidden(idx[:, a:b], cache=cache) for a, b in [(0, 12), (12, 13), (13, 30)]]
        torch.testing.assert_close(torch.cat(pieces, dim=1), model.forward_hidden(idx), rtol=1e-4, atol=1e-4)


def test_bf16_autocast_stays_close_to_fp32():
    model = tiny().to(CUDA).eval()
    idx = torch.randint(0, VOCAB, (4, 64), device=CUDA)
    with torch.no_grad():
        full = model(idx, idx).item()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(idx, idx).item()
    assert half == pytest.approx(full, abs=0.05)


def test_the_optimizer_is_fused_on_cuda():
    optimizer = adamw(tiny().to(CUDA), 1e-3, 0.1, (0.9, 0.95), "cuda")
    assert all(group.get("fused") for group in optimizer.param_groups)


def test_the_pretrain_stage_trains_compiled_in_bf16_and_its_checkpoint_loads_on_the_cpu(tmp_path):
    shards = make_shards(tmp_path / "shards", patterned_tokens(20_000), patterned_tokens(2_000), vocab_size=VOCAB)
    params = from_mapping(Params, {
        "model": {"preset": "tiny", "vocab_size": VOCAB, "context_length": 64},
        "pretrain": {"device": "cuda", "precision": "auto", "compile": True, "batch_size": 8,
                     "global_batch_size": 16, "max_steps": 30, "lr": 3e-3, "warmup_steps": 3, "log_interval": 5,
                     "eval_interval": 30, "eval_batches": 2, "sample_interval": 0, "checkpoint_interval": 30}})
    tracker = MemoryTracker()
    result = run_pretrain(params, shards, tmp_path / "out", tracker=tracker)
    assert result.precision_used == "bf16"
    val = tracker.series("val_loss")
    assert val[-1][1] < val[0][1] - 2  # about ln(512) = 6.2 at the start; the pattern is learnt fast
    mfu = [value for _, value in tracker.series("mfu")]
    assert len(mfu) == 6 and all(0 < m < 1 for m in mfu)
    assert next(result.model.parameters()).device.type == "cuda"
    saved = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    trained = {n: t.detach().cpu() for n, t in result.model.state_dict().items()}
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0, msg=name)
    on_cpu = load_model(tmp_path / "out", "cpu")
    idx = torch.randint(0, VOCAB, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(on_cpu(idx), result.model.eval()(idx.to(CUDA)).cpu(), rtol=1e-4, atol=1e-4)
