import json

import pytest
import torch
from torch import nn

from llm.checkpoint import CheckpointError, load_model, read_config, save_model
from llm.model import GPT, model_config
from llm.validation import ConfigError


def tiny(**overrides) -> GPT:
    return GPT(model_config("tiny", vocab_size=300, **overrides)).eval()


@pytest.mark.parametrize(
    "overrides", [{}, {"tie_weights": False, "qkv_bias": False}, {"attention": "explicit"}]
)
def test_save_load_round_trip_gives_identical_logits(tmp_path, overrides):
    model = tiny(**overrides)
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    assert (loaded.lm_head.weight is loaded.wte.weight) == model.config.tie_weights
    idx = torch.randint(0, 300, (2, 30))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_settings_that_keep_the_weights_can_be_changed_on_loading(tmp_path):
    model = tiny()
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt", dropout=0.1, attention="explicit")
    assert (loaded.config.dropout, loaded.config.attention) == (0.1, "explicit")
    idx = torch.randint(0, 300, (2, 30))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="dropout: must be in"):
        load_model(tmp_path / "ckpt", dropout=1.5)


def test_config_json_holds_model_tokenizer_and_extra(tmp_path):
    model = tiny()
    save_model(model, tmp_path / "ckpt", tokenizer="r50k_base", extra={"step": 12, "source": "test"})
    data = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert data == {"model": model.config.to_dict(), "tokenizer": "r50k_base", "step": 12, "source": "test"}
    config = read_config(tmp_path / "ckpt")
    assert (config.model, config.tokenizer) == (model.config, "r50k_base")
    assert config.extra == {"step": 12, "source": "test"}
    with pytest.raises(ValueError, match="extra must not set model"):
        save_model(model, tmp_path / "other", extra={"model": {}})


def test_saving_over_a_checkpoint_replaces_it_whole(tmp_path):
    out = tmp_path / "ckpt"
    save_model(tiny(), out)
    (out / "stale.txt").write_text("from the old run")
    newer = tiny(n_layer=1)
    save_model(newer, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporaries left
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert load_model(out).config.n_layer == 1


def test_wrapped_models_are_saved_as_the_gpt_inside(tmp_path):
    class Wrapper(nn.Module):  # what DDP looks like from outside: the model under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny()
    save_model(Wrapper(model), tmp_path / "ckpt")
    torch.testing.assert_close(load_model(tmp_path / "ckpt").wte.weight, model.wte.weight)
    with pytest.raises(TypeError, match="expected a GPT"):
        save_model(nn.Linear(2, 2), tmp_path / "bad")


def test_missing_files_name_the_folder_and_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nowhere'} is not a checkpoint: config.json is"):
        load_model(tmp_path / "nowhere")
    save_model(tiny(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has config.json but model.safetensors is missing"):
        load_model(tmp_path / "ckpt")


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    save_model(tiny(), tmp_path / "ckpt")
    config_path = tmp_path / "ckpt" / "config.json"
    data = json.loads(config_path.read_text())
    data["model"]["n_embd"] = 32
    config_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt"
    assert str(info.value).splitlines()[:2] == [
        f"{ckpt / 'model.safetensors'} does not fit the model that {config_path} describes (the two files are not "
        f"of one model); fix the \"model\" section of {config_path} to match the weights, or rerun the stage that "
        f"wrote it (`dvc repro`), or restore it with `dvc checkout {ckpt}` (`dvc pull {ckpt}` if the DVC cache "
        f"lacks it):",
        "  wpe.weight: [64, 64] in the file, [64, 32] in the model",
    ]
    assert str(info.value).endswith("and 23 more")  # all 28 tensors but the first 5
    data["model"]["n_embd"], data["model"]["n_layer"] = 64, 1
    config_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="h.1.attn.c_attn.bias: in the file but not in the model"):
        load_model(tmp_path / "ckpt")
    data["model"]["n_embd"] = 33
    config_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"\n  model.n_embd: must be divisible by n_head \(2\), got 33"):
        load_model(tmp_path / "ckpt")
    config_path.write_text("{not json")
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "ckpt")
    assert str(info.value) == (
        f"{config_path} is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
        f"(char 1)): the file is damaged; rerun the stage that wrote it (`dvc repro`), or restore it with "
        f"`dvc checkout {config_path}` (`dvc pull {config_path}` if the DVC cache lacks it)")


@pytest.mark.parametrize("damage", ["truncated", "empty", "not safetensors"])
def test_damaged_weights_are_named_with_how_to_get_them_back(tmp_path, damage):
    save_model(tiny(), tmp_path / "ckpt", extra={"stage": "pretrain"})
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[:len(data) // 2], "empty": b"",
                         "not safetensors": b"<html>404 Not Found</html>"}[damage])
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "ckpt")
    said = {"truncated": f"{len(data) // 2:,} bytes; safetensors says: incomplete metadata, file not fully covered",
            "empty": "0 bytes; safetensors says: header too small",
            "not safetensors": "26 bytes; safetensors says: header too large"}[damage]
    assert str(info.value) == (
        f"{weights} is damaged: it is truncated or not a safetensors file ({said}); rerun the stage that wrote it "
        f"(`dvc repro pretrain`), or restore it with `dvc checkout {weights}` (`dvc pull {weights}` if the DVC cache "
        f"lacks it)")


def test_a_config_of_another_model_names_the_file_and_the_keys(tmp_path):
    save_model(tiny(), tmp_path / "ckpt", extra={"stage": "finetune"})
    config_path = tmp_path / "ckpt" / "config.json"
    data = json.loads(config_path.read_text())
    fix = (f"rerun the stage that wrote it (`dvc repro finetune`), or restore it with `dvc checkout {config_path}` "
           f"(`dvc pull {config_path}` if the DVC cache lacks it)")
    config_path.write_text(json.dumps({**data, "model": {**data["model"], "n_kv_head": 1, "rotary": True,
                                                         "n_layer": "2"}}))
    with pytest.raises(CheckpointError) as info:
        read_config(tmp_path / "ckpt")
    assert str(info.value).splitlines() == [
        f"{config_path}: its \"model\" section is not a model this code can build (written for another model, or "
        f"by another version of the code?); fix the keys below, or {fix}:",
        "  model.n_kv_head: unknown key; did you mean 'n_head'?",
        "  model.rotary: unknown key; known keys: vocab_size, context_length, n_embd, n_head, n_layer, dropout, "
        "qkv_bias, tie_weights, attention, init, objective, num_classes, pooling",
        "  model.n_layer: must be an integer, got str '2'",
    ]
    config_path.write_text(json.dumps({**data, "model": {**data["model"], "dropout": 1.5}}))
    with pytest.raises(CheckpointError, match=r"\n  model.dropout: must be in \[0, 1\), got 1.5$"):
        load_model(tmp_path / "ckpt")
    config_path.write_text(json.dumps({**data, "model": {**data["model"], "dropout": float("nan")}}))  # JSON's NaN
    with pytest.raises(CheckpointError, match=r"\n  model.dropout: must be a finite number, got nan$"):
        load_model(tmp_path / "ckpt")
    config_path.write_text(json.dumps({**data, "tokenizer": 5}))
    with pytest.raises(CheckpointError) as info:
        read_config(tmp_path / "ckpt")
    assert str(info.value) == (f"{config_path}: \"tokenizer\" must be a tokenizer name such as \"gpt2\", got 5; "
                               f"fix it, or {fix}")
    # Hugging Face's config.json, say: the model's fields at the top level.
    config_path.write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 768}))
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "ckpt")
    assert str(info.value) == (
        f"{config_path} is not a checkpoint config of this project: it must hold an object with a \"model\" object "
        f"(the model config), as llm.checkpoint.save_model writes, but it holds keys architectures, model_type, "
        f"n_embd; for OpenAI's GPT-2 weights set init_from: gpt2 (or another GPT-2 size) instead")
    config_path.write_text("[]")
    with pytest.raises(CheckpointError, match="but it holds a list; for OpenAI's"):
        read_config(tmp_path / "ckpt")


def test_a_killed_writers_leftovers_are_removed_by_the_next_write(tmp_path):
    from llm.files import TMP_PREFIX, atomic_dir, atomic_path

    (tmp_path / f"{TMP_PREFIX}out.0123abcd").mkdir()  # as a writer killed inside atomic_dir leaves it
    (tmp_path / f"{TMP_PREFIX}out.part").write_text("a download's part file: not ours to delete")
    (tmp_path / f"{TMP_PREFIX}metrics.json.89abcdef").write_text("{")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    with atomic_path(tmp_path / "metrics.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{TMP_PREFIX}out.part", "metrics.json", "out"]
