"""The chat command: instructions in, answers out, in the fine-tuned model's prompt format."""

from __future__ import annotations

import io
import subprocess
import sys

import torch

from llm.chat import chat, instruction
from llm.checkpoint import save_model
from llm.generate import Sampling, generate
from llm.hardware import inference_dtype
from llm.instructions import Record, prompt_text
from llm.model import GPT, model_config
from llm.tokenizer import get_tokenizer
from tests.conftest import ROOT


def test_an_input_follows_the_separator():
    assert instruction("Translate to German || Good morning\n") == Record("Translate to German", "Good morning", "")
    assert instruction("Name a color\n") == Record("Name a color", "", "")


def test_each_line_is_answered_with_the_alpaca_prompt(tmp_path):
    torch.manual_seed(0)
    model = GPT(model_config("tiny")).eval()
    save_model(model, tmp_path / "ckpt", extra={"prompt_style": "alpaca"})
    model.to(inference_dtype(torch.device("cpu")))  # as the chat generates
    out = io.StringIO()
    chat(tmp_path / "ckpt", Sampling(), 6, "cpu", lines=io.StringIO("Name a color\nSay hi\n\nignored\n"), out=out)
    enc = get_tokenizer()
    expected = []
    for line in ("Name a color", "Say hi"):
        ids = enc.encode_ordinary(prompt_text(Record(line, "", ""), "alpaca"))
        expected.append(enc.decode(generate(model, [ids], 6, Sampling(), eos_id=enc.eot_token)[0]))
    assert out.getvalue() == "".join(f"{answer}\n\n" for answer in expected)


def test_the_command_reads_stdin_and_reports_a_missing_checkpoint(tmp_path):
    save_model(GPT(model_config("tiny")), tmp_path / "ckpt")
    done = subprocess.run([sys.executable, "-m", "llm.chat", "--checkpoint", str(tmp_path / "ckpt"),
                           "--max-new-tokens", "3"], input="Hello\n", capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n\n")
    missing = subprocess.run([sys.executable, "-m", "llm.chat", "--checkpoint", str(tmp_path / "none")],
                             input="", capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode == 1 and "is not a checkpoint" in missing.stderr


def test_an_answer_ends_where_the_model_starts_the_formats_next_part(tmp_path, monkeypatch):
    import llm.chat

    save_model(GPT(model_config("tiny")), tmp_path / "ckpt", extra={"prompt_style": "alpaca"})
    enc = get_tokenizer()
    runs_on = enc.encode_ordinary("Green, and blue.\n\n### Instruction:\nName" + " more" * 20)
    given = []

    def scripted(model, prompt, max_new_tokens, sampling, eos_id=None):
        for token in runs_on:
            given.append(token)
            yield token

    monkeypatch.setattr(llm.chat, "stream", scripted)
    out = io.StringIO()
    chat(tmp_path / "ckpt", Sampling(), 64, "cpu", lines=io.StringIO("Name a color\n"), out=out)
    assert out.getvalue() == "Green, and blue.\n\n"
    assert len(given) < len(runs_on)  # generation stopped there, not at max_new_tokens
