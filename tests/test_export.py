"""llm.export: Hugging Face folders that transformers loads and runs as ours, GGUF files read back whole."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from llm.checkpoint import save_model
from llm.export import (ExportError, bpe_vocabulary, export_gguf, export_hf, gguf_tensors, main, modelfile_path)
from llm.generate import Sampling, generate
from llm.model import GPT, model_config
from llm.tokenizer import get_tokenizer

# The preset's shape and the book's two departures from GPT-2: no qkv bias, an untied head.
VARIANTS = {"gpt2-like": {}, "book-like": {"qkv_bias": False, "tie_weights": False}}


def checkpoint(tmp_path, name="ckpt", *, tokenizer="gpt2", extra=None, **overrides):
    model = GPT(model_config("tiny", n_embd=64, **overrides)).eval()
    with torch.no_grad():  # GPT-2's init leaves biases zero: random ones check that each lands in its place
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model, save_model(model, tmp_path / name, tokenizer=tokenizer, extra=extra)


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_loads_the_hf_export_and_computes_our_logits_and_greedy_text(tmp_path, variant):
    transformers = pytest.importorskip("transformers")
    model, ckpt = checkpoint(tmp_path, **VARIANTS[variant])
    out = export_hf(ckpt, tmp_path / "hf")

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.context_length))
    with torch.no_grad():
        diff = (hf(idx).logits - model(idx)).abs().max().item()
    assert diff < 1e-4

    prompt = idx[0, :8].tolist()
    ours = generate(model, [prompt], 24, Sampling(temperature=0.0))[0]
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
    assert theirs == ours


def test_the_hf_tokenizer_files_are_gpt2s_own_and_tokenize_as_tiktoken(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tiktoken.load import read_file_cached

    _, ckpt = checkpoint(tmp_path)
    out = export_hf(ckpt, tmp_path / "hf")
    # OpenAI's GPT-2 release files, which tiktoken itself reads (from TIKTOKEN_CACHE_DIR offline).
    base = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    vocab, merges = read_file_cached(base + "encoder.json"), read_file_cached(base + "vocab.bpe").decode()
    assert json.loads((out / "vocab.json").read_text(encoding="utf-8")) == json.loads(vocab)
    assert (out / "merges.txt").read_text(encoding="utf-8").rstrip("\n") == merges.rstrip("\n")

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    enc = get_tokenizer("gpt2")
    rng = np.random.default_rng()
    texts = ["Every effort moves you", "It's 2026: naïve café, 東京 ✓\n\n  indented\ttab", "<|endoftext|>next"]
    texts += [enc.decode(rng.integers(0, 50256, size=30).tolist()) for _ in range(5)]
    for text in texts:
        assert tokenizer(text)["input_ids"] == enc.encode(text, allowed_special="all"), text
    assert tokenizer.eos_token_id == enc.eot_token


def test_merges_are_recovered_from_tiktokens_ranks():
    tokens, merges = bpe_vocabulary("gpt2")
    assert len(tokens) == 50257 and len(merges) == 50000
    assert tokens[50256] == "<|endoftext|>" and tokens[198] == "Ċ"  # "\n" as GPT-2's byte alphabet spells it
    assert merges[:3] == ("Ġ t", "Ġ a", "h e")


def test_an_export_refuses_what_the_formats_cannot_hold(tmp_path):
    _, encoder = checkpoint(tmp_path, "encoder", objective="masked")
    _, classifier = checkpoint(tmp_path, "classifier", num_classes=2, tie_weights=False,
                               extra={"labels": ["ham", "spam"]})
    _, cl100k = checkpoint(tmp_path, "cl100k", tokenizer="cl100k_base")
    with pytest.raises(ExportError, match=r"causal language model .*is an encoder \(model.objective: masked\)"):
        export_hf(encoder, tmp_path / "out")
    with pytest.raises(ExportError, match=r"is a classifier \(classes: ham, spam\)"):
        export_gguf(classifier, tmp_path / "out.gguf")
    with pytest.raises(ExportError, match=r"its tokenizer is 'cl100k_base'.*tokenize.tokenizer: gpt2"):
        export_hf(cl100k, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])  # f32: in the tokenizer's test, to read one file less
def test_the_gguf_file_reads_back_with_every_tensor_and_what_llama_cpp_needs(tmp_path, dtype):
    model, ckpt = checkpoint(tmp_path, **VARIANTS["book-like"], extra={"stage": "finetune", "prompt_style": "alpaca"})
    out = export_gguf(ckpt, tmp_path / "model.gguf", dtype)
    reader = gguf.GGUFReader(out)

    def field(key):
        return reader.get_field(key).contents()

    c = model.config
    assert field("general.architecture") == "gpt2"
    assert (field("gpt2.context_length"), field("gpt2.embedding_length"), field("gpt2.feed_forward_length"),
            field("gpt2.block_count"), field("gpt2.attention.head_count")) == (c.context_length, c.n_embd,
                                                                              4 * c.n_embd, c.n_layer, c.n_head)
    assert field("gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert field("general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    check_tensors(reader, model, dtype)


def test_an_f32_gguf_file_embeds_gpt2s_tokenizer_and_every_tensor_exactly(tmp_path):
    model, ckpt = checkpoint(tmp_path)
    reader = gguf.GGUFReader(export_gguf(ckpt, tmp_path / "model.gguf", "f32"))

    def field(key):
        return reader.get_field(key).contents()

    tokens, merges = bpe_vocabulary("gpt2")
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    assert field("tokenizer.ggml.tokens") == list(tokens) and field("tokenizer.ggml.merges") == list(merges)
    types = field("tokenizer.ggml.token_type")
    assert types[50256] == gguf.TokenType.CONTROL and set(types[:50256]) == {gguf.TokenType.NORMAL}
    assert field("tokenizer.ggml.bos_token_id") == field("tokenizer.ggml.eos_token_id") == 50256
    assert field("tokenizer.ggml.add_bos_token") is False
    assert field("general.file_type") == 0
    check_tensors(reader, model, "f32")


def check_tensors(reader: gguf.GGUFReader, model: GPT, dtype: str) -> None:
    c = model.config
    expected = gguf_tensors(model)
    assert [t.name for t in reader.tensors] == list(expected)
    assert "output.weight" in expected and len(expected) == 4 + 12 * c.n_layer + 1
    for t in reader.tensors:
        want = expected[t.name].detach().numpy()
        assert tuple(int(n) for n in reversed(t.shape)) == want.shape, t.name  # GGUF lists dims innermost first
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if want.ndim == 1 or t.name.startswith("position_embd") or dtype == "f32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want), t.name
        elif dtype == "f16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), t.name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            # q8_0: each block of 32 values shares one scale, max|x| / 127, kept in f16: half a step of
            # rounding, and the scale's own f16 rounding over up to 127 steps
            step = np.abs(want).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            assert (np.abs(got - want).reshape(-1, 32) <= step * (0.5 + 127 * 2**-11) + 1e-7).all(), t.name


def test_the_modelfile_carries_the_prompt_template_of_an_instruction_model_and_none_for_a_base_model(tmp_path):
    _, tuned = checkpoint(tmp_path, "tuned", extra={"stage": "finetune", "prompt_style": "phi3"})
    _, base = checkpoint(tmp_path, "base", extra={"stage": "pretrain"})
    export_gguf(tuned, tmp_path / "tuned.gguf", "f32")
    export_gguf(base, tmp_path / "base.gguf", "f32")
    tuned_file = modelfile_path(tmp_path / "tuned.gguf").read_text(encoding="utf-8")
    assert tuned_file.startswith("FROM ./tuned.gguf\n")
    assert 'TEMPLATE """<|user|>\n{{ .Prompt }}\n<|assistant|>:\n"""' in tuned_file
    assert 'PARAMETER stop "<|endoftext|>"\nPARAMETER stop "<|user|>"\n' in tuned_file
    assert "PARAMETER temperature 0\nPARAMETER num_ctx 64\n" in tuned_file
    assert 'TEMPLATE """{{ .Prompt }}"""' in modelfile_path(tmp_path / "base.gguf").read_text(encoding="utf-8")


def test_the_cli_writes_the_export_and_names_a_bad_checkpoint(tmp_path, capsys):
    _, ckpt = checkpoint(tmp_path)
    assert main(["--checkpoint", str(ckpt), "--format", "gguf", "--dtype", "f32", str(tmp_path / "m.gguf")]) == 0
    assert f"wrote {tmp_path / 'm.gguf'} and {tmp_path / 'm.Modelfile'}" in capsys.readouterr().out
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--format", "hf", str(tmp_path / "hf")]) == 1
    assert "nowhere is not a checkpoint: config.json is missing" in capsys.readouterr().err


def test_the_cli_replaces_an_existing_output_only_when_asked(tmp_path, capsys):
    _, ckpt = checkpoint(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    assert main(["--checkpoint", str(ckpt), "--format", "hf", str(mine)]) == 1
    assert f"{mine} already there" in capsys.readouterr().err and (mine / "notes.txt").is_file()
    assert main(["--checkpoint", str(ckpt), "--format", "hf", str(mine), "--overwrite"]) == 0
    assert (mine / "config.json").is_file() and not (mine / "notes.txt").exists()
