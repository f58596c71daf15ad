"""Inference is host-independent by default: a GPT-2 converted from transformers generates transformers' own
greedy tokens through the commands' and the evaluate stage's code, even on a CPU where bf16 is fast."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from llm import hardware
from llm.chat import chat
from llm.checkpoint import SPLIT_FILE
from llm.config import EvaluateConfig
from llm.evaluate import evaluate_models
from llm.generate import Sampling, generate, load_for_inference, main
from llm.gpt2_weights import convert
from llm.instructions import Record, Split, prompt_text, write_split
from llm.loss import IGNORE_INDEX
from llm.perplexity import sequential_batches
from llm.responses import clean_response
from llm.shards import TokenStream
from llm.tokenizer import get_tokenizer
from tests.data import make_shards, patterned_tokens

CPU = torch.device("cpu")
EOT = 50256
NEW_TOKENS = 30
RECORDS = [Record("Name a color", "", "Red"), Record("Translate to German", "Good morning", "Guten Morgen")]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[GPT2LMHeadModel, Path]:
    """A small random transformers GPT-2 with GPT-2's vocabulary (the commands check it against the
    tokenizer's), and the checkpoint llm.gpt2_weights converts it to."""
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(3)
    # initializer_range 0.3, not GPT-2's 0.02: at 0.02 a random GPT-2 repeats one or two tokens, which would
    # compare little. Seed 3: under bf16 weights this host's greedy text parts from transformers' at token 11.
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=EOT + 1, initializer_range=0.3,
                        bos_token_id=EOT, eos_token_id=EOT)
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(folder / "hf", safe_serialization=True)
    convert(folder / "hf", folder / "ckpt")
    return hf, folder / "ckpt"


@pytest.fixture
def bf16_host(monkeypatch):
    """A CPU that computes bf16 natively (AMX, AVX512-BF16), where training's auto picks bf16."""
    monkeypatch.setattr(hardware, "bf16_is_fast", lambda device: True)
    assert hardware.inference_dtype(CPU, "auto") == torch.bfloat16


def hf_greedy(hf: GPT2LMHeadModel, prompt: list[int]) -> list[int]:
    """transformers' greedy tokens, each a clear winner: its logit leads the next one by far more than fp32
    rounding could move either, so an fp32 implementation must pick it too."""
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                      pad_token_id=EOT, output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack(out.scores)[:, 0].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    tokens = out.sequences[0, len(prompt):].tolist()
    assert EOT not in tokens and len(set(tokens)) > NEW_TOKENS // 2  # 30 steps of varied text, none cut short
    return tokens


def test_the_commands_generate_transformers_greedy_tokens_by_default(converted, bf16_host, capsys):
    hf, ckpt = converted
    enc = get_tokenizer("gpt2")
    text = "Every effort moves you"
    expected = hf_greedy(hf, enc.encode(text))
    model = load_for_inference(ckpt)  # what llm.generate, llm.chat and the served model generate with
    assert model.wte.weight.dtype == torch.float32
    assert generate(model, [enc.encode(text)], NEW_TOKENS) == [expected]
    command = ["--checkpoint", str(ckpt), "--prompt", text, "--temperature", "0", "--max-new-tokens",
               str(NEW_TOKENS), "--device", "cpu"]
    assert main(command) == 0
    assert capsys.readouterr().out == enc.decode(expected) + "\n"
    out = io.StringIO()
    chat(ckpt, Sampling(), NEW_TOKENS, "cpu", lines=io.StringIO("Name a color\n"), out=out)
    answer = hf_greedy(hf, enc.encode_ordinary(prompt_text(RECORDS[0], "alpaca")))
    assert out.getvalue() == enc.decode(answer) + "\n\n"


def test_the_evaluate_stage_measures_and_answers_as_transformers_by_default(converted, bf16_host, tmp_path):
    hf, ckpt = converted
    enc = get_tokenizer("gpt2")
    shards = make_shards(tmp_path / "shards", patterned_tokens(300), patterned_tokens(300))
    tuned = tmp_path / "tuned"
    shutil.copytree(ckpt, tuned)
    write_split(tuned / SPLIT_FILE, Split(train=RECORDS, val=RECORDS, test=RECORDS))
    config = EvaluateConfig(device="cpu", max_new_tokens=NEW_TOKENS, examples=0)

    measured = evaluate_models(config, ckpt, {"finetune": tuned}, shards)

    assert measured.precision == "fp32"
    expected = [clean_response(enc.decode(hf_greedy(hf, enc.encode(prompt_text(r, "alpaca"), disallowed_special=()))))
                for r in RECORDS]
    assert [r["model_response"] for r in measured.tuned["finetune"].responses] == expected
    total, targets = 0.0, 0
    with torch.no_grad():
        for inputs, labels in sequential_batches(TokenStream.from_manifest(shards, "val"), 128, 8):
            logits = hf(inputs).logits
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum").item()
            targets += int((labels != IGNORE_INDEX).sum())
    assert measured.base_loss.loss == pytest.approx(total / targets, rel=1e-6)
