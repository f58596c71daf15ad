import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from llm import gpt2_weights
from llm.checkpoint import load_model, read_config
from llm.gpt2_weights import WeightsError, config_from_hf, convert, main
from llm.validation import ConfigError

VOCAB = 1000


def hf_gpt2(folder, tie=True) -> GPT2LMHeadModel:
    """A small randomly initialised Hugging Face GPT-2, saved as safetensors in `folder`."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, vocab_size=VOCAB,
                        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


def as_openai_community_file(folder) -> None:
    """Rewrite the file the way openai-community/gpt2's is laid out: no "transformer." prefix, and each
    layer's causal mask stored as attn.bias."""
    path = folder / "model.safetensors"
    tensors = {name.removeprefix("transformer."): t for name, t in load_file(path).items()}
    for layer in range(2):
        tensors[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "tie, layout", [(True, "save_pretrained"), (False, "save_pretrained"), (True, "openai")]
)
def test_logits_match_hugging_faces_gpt2(tmp_path, tie, layout):
    hf = hf_gpt2(tmp_path / "hf", tie=tie)
    if layout == "openai":
        as_openai_community_file(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ckpt")
    ours = load_model(tmp_path / "ckpt")
    assert ours.config.tie_weights == tie and (ours.lm_head.weight is ours.wte.weight) == tie
    idx = torch.randint(0, VOCAB, (3, 64))
    with torch.no_grad():
        expected = hf(idx).logits
    assert (ours(idx) - expected).abs().max() < 1e-4
    assert read_config(tmp_path / "ckpt").extra["source"] == str((tmp_path / "hf").resolve())


def test_the_command_converts_a_local_folder(tmp_path, capsys):
    hf_gpt2(tmp_path / "hf")
    assert main([str(tmp_path / "hf"), str(tmp_path / "ckpt")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'ckpt'}\n"
    assert load_model(tmp_path / "ckpt").config.n_layer == 2
    assert main(["gpt3", str(tmp_path / "x")]) == 1
    error = capsys.readouterr().err
    assert "'gpt3' is neither a GPT-2 size (gpt2, gpt2-medium, gpt2-large, gpt2-xl) nor a folder" in error


def test_weights_that_do_not_fit_their_config_are_listed(tmp_path):
    hf_gpt2(tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    config["n_layer"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"its config describes:\n  h.2.ln_1.weight: missing"):
        convert(tmp_path / "hf", tmp_path / "ckpt")
    config["n_layer"], config["n_embd"] = 2, 32
    config_path.write_text(json.dumps(config))
    shapes = r"\n  transformer.h.0.attn.c_attn.weight: \[64, 192\] in the file, \[32, 96\] in the config\n"
    with pytest.raises(WeightsError, match=shapes):
        convert(tmp_path / "hf", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="has no model.safetensors"):
        convert(tmp_path / "hf", tmp_path / "ckpt")


def test_gpt2_variants_our_model_does_not_compute_are_refused():
    base = {"vocab_size": 10, "n_positions": 8, "n_embd": 4, "n_head": 2, "n_layer": 1}
    assert config_from_hf(base).context_length == 8
    with pytest.raises(ConfigError) as info:
        config_from_hf({**base, "activation_function": "relu", "scale_attn_by_inverse_layer_idx": True})
    assert dict(info.value.problems) == {
        "activation_function": "must be GELU's tanh approximation, 'gelu_new', got 'relu'",
        "scale_attn_by_inverse_layer_idx": "must be false, got True",
    }


def test_a_size_name_is_fetched_through_llm_download_with_its_pinned_hash(tmp_path, monkeypatch):
    calls = []

    def fetch_with_retries(url, dest, sha256, **kwargs):
        calls.append((url, dest, sha256))
        raise RuntimeError("no network in tests")

    fake = types.SimpleNamespace(fetch_with_retries=fetch_with_retries)  # llm.download lands on main
    monkeypatch.setitem(sys.modules, "llm.download", fake)
    with pytest.raises(RuntimeError, match="no network"):
        convert("gpt2", tmp_path / "ckpt", download_dir=tmp_path / "downloads")
    assert calls == [("https://huggingface.co/openai-community/gpt2/resolve/main/model.safetensors",
                      tmp_path / "downloads" / "gpt2.safetensors", gpt2_weights.SHA256["gpt2"])]
