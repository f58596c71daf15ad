import math

import pytest
import torch

from llm.model import GPT, IGNORE_INDEX, ModelConfig, causal_allowed, causal_bias, model_config
from llm.model_config import PRESETS
from llm.validation import ConfigError

VOCAB = 256  # a small vocabulary keeps the head cheap; the model does not care


def tiny(**overrides) -> GPT:
    return GPT(model_config("tiny", vocab_size=VOCAB, **overrides))


def tokens(B: int, T: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T))


def test_shapes():
    model = tiny()
    idx = tokens(3, 17)
    assert model(idx).shape == (3, 17, VOCAB)
    assert model.forward_hidden(idx).shape == (3, 17, 64)
    loss = model(idx, tokens(3, 17))
    assert loss.shape == () and math.isclose(loss.item(), math.log(VOCAB), rel_tol=0.1)  # near uniform at init


def test_input_longer_than_the_context_is_an_error():
    with pytest.raises(ValueError, match="exceed context_length 64"):
        tiny()(tokens(1, 65))


@pytest.mark.parametrize("attention", ["auto", "sdpa", "explicit"])
def test_a_later_token_never_changes_an_earlier_position(attention):
    model = tiny(attention=attention).eval()
    idx = tokens(2, 24)
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % VOCAB
    before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :15], after[:, :15], rtol=0, atol=1e-6)
    assert (before[:, 15:] - after[:, 15:]).abs().amax() > 1e-3


@pytest.mark.parametrize(("T", "S"), [(5, 5), (1, 7), (3, 8)])
def test_the_causal_bias_is_minus_infinity_exactly_where_a_query_may_not_see_a_key(T, S):
    bias = causal_bias(T, S, torch.bfloat16, torch.device("cpu"))
    allowed = causal_allowed(T, S, torch.device("cpu"))
    assert bias.dtype == torch.bfloat16 and bias.shape == (T, S)
    assert torch.equal(bias == float("-inf"), ~allowed) and bool((bias[allowed] == 0).all())


def test_explicit_and_sdpa_attention_agree_on_outputs_and_gradients():
    sdpa = tiny(attention="sdpa")
    explicit = tiny(attention="explicit")
    explicit.load_state_dict(sdpa.state_dict())
    idx, targets = tokens(4, 40), tokens(4, 40)
    torch.testing.assert_close(sdpa(idx), explicit(idx), rtol=1e-5, atol=1e-5)
    sdpa(idx, targets).backward()
    explicit(idx, targets).backward()
    for (name, a), b in zip(sdpa.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_attention_runs_the_explicit_product_in_bf16_on_a_cpu_up_to_its_limit_and_sdpa_elsewhere(
        dtype, monkeypatch):
    monkeypatch.setattr("llm.model.AUTO_EXPLICIT_MAX_KEYS", 24)
    models = {kind: tiny(attention=kind).to(dtype) for kind in ("auto", "sdpa", "explicit")}
    for model in models.values():
        model.load_state_dict(models["auto"].state_dict())
    for T in (24, 25):  # at the limit, and past it
        idx, targets = tokens(2, T), tokens(2, T)
        losses = {kind: model(idx, targets) for kind, model in models.items()}
        for model, loss in zip(models.values(), losses.values()):
            model.zero_grad()
            loss.backward()
        same = "explicit" if dtype == torch.bfloat16 and T <= 24 else "sdpa"
        assert torch.equal(losses["auto"], losses[same]), (T, same)  # the same kernels, bit for bit
        for a, b in zip(models["auto"].parameters(), models[same].parameters()):
            assert torch.equal(a.grad, b.grad), (T, same)
        other = {"sdpa": "explicit", "explicit": "sdpa"}[same]
        assert not torch.equal(models["auto"].wte.weight.grad, models[other].wte.weight.grad)


def test_auto_attention_runs_the_explicit_product_in_fp32_training_with_dropout_up_to_its_limit(monkeypatch):
    """SDPA's CPU kernel has no dropout: with it SDPA runs its math path, so auto takes the explicit product,
    whose mask llm/dropout.py draws; without dropout (eval mode) fp32 stays on SDPA."""
    monkeypatch.setattr("llm.model.AUTO_EXPLICIT_MAX_KEYS", 24)
    models = {kind: tiny(attention=kind, dropout=0.1) for kind in ("auto", "sdpa", "explicit")}
    for model in models.values():
        model.load_state_dict(models["auto"].state_dict())
    for T in (24, 25):  # at the limit, and past it
        idx, targets = tokens(2, T), tokens(2, T)
        losses = {}
        for kind, model in models.items():
            torch.manual_seed(T)  # the same draws for each: the same kernels give the same masks
            losses[kind] = model(idx, targets)
        same = "explicit" if T <= 24 else "sdpa"
        assert torch.equal(losses["auto"], losses[same]), (T, same)
        assert not torch.equal(losses["auto"], losses[{"sdpa": "explicit", "explicit": "sdpa"}[same]])
    idx = tokens(2, 24)
    evaluated = {kind: model.eval()(idx) for kind, model in models.items()}  # gradients on, no dropout
    assert torch.equal(evaluated["auto"], evaluated["sdpa"])
    assert not torch.equal(evaluated["auto"], evaluated["explicit"])


def test_auto_attention_runs_sdpa_without_a_backward_to_follow_in_bf16():
    """Evaluation and generation run the forward alone, where SDPA is the faster at every length."""
    models = {kind: tiny(attention=kind).to(torch.bfloat16).eval() for kind in ("auto", "sdpa", "explicit")}
    for model in models.values():
        model.load_state_dict(models["auto"].state_dict())
    idx = tokens(2, 24)  # within the limit, where training takes the explicit product
    with torch.no_grad():
        logits = {kind: model(idx) for kind, model in models.items()}
        assert torch.equal(logits["auto"], logits["sdpa"])
        assert not torch.equal(logits["auto"], logits["explicit"])
        steps = {}
        for kind, model in models.items():  # a decoding step: one new token over the cached positions
            cache = model.new_cache(2)
            model.forward_hidden(idx, cache=cache)
            steps[kind] = model.forward_hidden(torch.full((2, 1), 7), cache=cache)
        assert torch.equal(steps["auto"], steps["sdpa"])
        assert not torch.equal(steps["auto"], steps["explicit"])


def test_ignored_targets_add_nothing_to_the_loss():
    model = tiny()
    idx, targets = tokens(2, 10), tokens(2, 10)
    padded = targets.clone()
    padded[:, 6:] = IGNORE_INDEX
    logits = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :6].flatten(0, 1), targets[:, :6].flatten())
    torch.testing.assert_close(model(idx, padded), expected)


def test_a_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = tiny()
    idx = tokens(4, 32)
    targets = idx.roll(-1, dims=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(idx, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_weight_tying_and_gpt2_initialisation():
    model = GPT(model_config("tiny", n_layer=8))
    assert model.lm_head.weight is model.wte.weight
    untied = GPT(model_config("tiny", tie_weights=False))
    assert untied.lm_head.weight is not untied.wte.weight
    assert math.isclose(model.h[0].mlp.c_fc.weight.std().item(), 0.02, rel_tol=0.05)
    assert math.isclose(model.h[0].mlp.c_proj.weight.std().item(), 0.02 / math.sqrt(16), rel_tol=0.05)
    assert math.isclose(model.h[0].attn.c_proj.weight.std().item(), 0.02 / math.sqrt(16), rel_tol=0.05)
    assert model.h[0].attn.c_attn.bias.abs().sum() == 0
    assert GPT(model_config("tiny", qkv_bias=False)).h[0].attn.c_attn.bias is None


def test_book_initialisation_is_pytorchs_default_of_each_layer():
    torch.manual_seed(0)
    book = GPT(model_config("tiny", n_embd=128, init="book", tie_weights=False))
    assert math.isclose(book.wte.weight.std().item(), 1.0, rel_tol=0.05)  # nn.Embedding: N(0, 1)
    assert math.isclose(book.wpe.weight.std().item(), 1.0, rel_tol=0.05)
    linears = [m for m in book.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 1  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block, and the head
    for linear in linears:  # nn.Linear: kaiming-uniform, within 1/sqrt(fan_in), as are its biases
        bound = 1 / math.sqrt(linear.in_features)
        assert linear.weight.abs().max() <= bound
        assert linear.weight.abs().max() > 0.9 * bound  # spread over the whole interval, not N(0, 0.02)
        if linear.bias is not None:
            assert linear.bias.abs().max() <= bound and linear.bias.abs().sum() > 0
    assert all((block.ln_1.weight == 1).all() and (block.ln_1.bias == 0).all() for block in book.h)
    gpt2 = GPT(model_config("tiny", n_embd=128))
    assert math.isclose(gpt2.wte.weight.std().item(), 0.02, rel_tol=0.05)
    assert math.isclose(gpt2.h[0].mlp.c_fc.weight.std().item(), 0.02, rel_tol=0.05)
    assert model_config("gpt2-book").init == "book" and model_config("gpt2").init == "gpt2"


def test_book_initialisation_gives_the_books_starting_weights_and_model():
    from benchmarks.book_ch05 import GPT_CONFIG_124M, GPTModel

    torch.manual_seed(123)
    model = GPT(model_config("gpt2-book", vocab_size=VOCAB, context_length=64, n_embd=64, n_head=2, n_layer=2))
    torch.manual_seed(123)  # the book's GPTModel creates its layers in the same order, so draws the same numbers
    reference = GPTModel({**GPT_CONFIG_124M, "vocab_size": VOCAB, "context_length": 64, "emb_dim": 64,
                          "n_heads": 2, "n_layers": 2})
    book = reference.state_dict()
    theirs = {"wte.weight": book["tok_emb.weight"], "wpe.weight": book["pos_emb.weight"],
              "ln_f.weight": book["final_norm.scale"], "ln_f.bias": book["final_norm.shift"],
              "lm_head.weight": book["out_head.weight"]}
    for i in range(2):
        block = {k.removeprefix(f"trf_blocks.{i}."): v for k, v in book.items() if k.startswith(f"trf_blocks.{i}.")}
        theirs |= {f"h.{i}.{k}": v for k, v in {
            "ln_1.weight": block["norm1.scale"], "ln_1.bias": block["norm1.shift"],
            "attn.c_attn.weight": torch.cat([block[f"att.W_{w}.weight"] for w in ("query", "key", "value")]),
            "attn.c_proj.weight": block["att.out_proj.weight"], "attn.c_proj.bias": block["att.out_proj.bias"],
            "ln_2.weight": block["norm2.scale"], "ln_2.bias": block["norm2.shift"],
            "mlp.c_fc.weight": block["ff.layers.0.weight"], "mlp.c_fc.bias": block["ff.layers.0.bias"],
            "mlp.c_proj.weight": block["ff.layers.2.weight"], "mlp.c_proj.bias": block["ff.layers.2.bias"]}.items()}
    ours = model.state_dict()
    assert set(theirs) == set(ours)
    for name, weight in ours.items():
        assert torch.equal(weight, theirs[name]), name
    idx = tokens(2, 64)  # and the same function of them, to float32 rounding
    torch.testing.assert_close(model.eval()(idx), reference.eval()(idx), rtol=1e-4, atol=1e-4)


def test_either_init_is_seeded_and_loads_into_an_empty_model():
    for init in ("gpt2", "book"):
        config = model_config("tiny", vocab_size=VOCAB, init=init)
        torch.manual_seed(1)
        first, second = GPT(config), GPT(config)
        torch.manual_seed(1)
        again = GPT(config)
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
        assert not torch.equal(first.wte.weight, second.wte.weight)
        empty = GPT.empty(config)
        empty.load_state_dict(first.state_dict())
        idx = tokens(2, 12)
        torch.testing.assert_close(empty(idx), first(idx), rtol=0, atol=0)


def test_a_checkpoint_config_without_init_loads_as_gpt2():
    saved = model_config("tiny").to_dict()
    del saved["init"]
    assert ModelConfig.from_dict(saved).init == "gpt2"


def test_the_model_section_of_params_offers_every_field_of_a_language_model():
    import dataclasses
    import typing

    from llm.config import ModelSection

    section = {f.name: f for f in dataclasses.fields(ModelSection)}
    config = {f.name: f for f in dataclasses.fields(ModelConfig)}
    assert set(section) - {"preset"} == set(config) - {"num_classes", "pooling"}  # the classify stage sets those
    hints, section_hints = typing.get_type_hints(ModelConfig), typing.get_type_hints(ModelSection)
    for name in ("attention", "init"):
        choices, _none = typing.get_args(section_hints[name])  # Literal[...] | None
        assert typing.get_args(choices) == typing.get_args(hints[name]), name


@pytest.mark.parametrize(
    "preset, params",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
     ("gpt2-xl", 1_557_611_200)],
)
def test_gpt2_presets_have_gpt2s_parameter_counts(preset, params):
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(model_config(preset))
    assert model.num_params(non_embedding=False) == params
    assert model.num_params() == params - 1024 * model.config.n_embd  # less the position embeddings


def test_non_embedding_count_and_flops_per_token():
    with torch.device("meta"):
        tied, untied = GPT(model_config("gpt2")), GPT(model_config("gpt2-book"))
    assert untied.num_params() == untied.num_params(non_embedding=False) - (50257 + 1024) * 768
    assert tied.flops_per_token() == 6 * 123_653_376 + 12 * 12 * 768 * 1024
    assert tied.flops_per_token(seq_len=256) == 6 * 123_653_376 + 12 * 12 * 768 * 256


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_the_training_forward_compiles_to_one_graph(attention):
    model = tiny(attention=attention)
    idx = tokens(2, 16)
    # fullgraph: any graph break (data-dependent Python control flow) is an error; "eager" skips codegen
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(idx, idx), model(idx, idx))


def test_empty_model_is_tied_and_masked_like_a_built_one():
    config = model_config("tiny", vocab_size=VOCAB, attention="explicit")
    built, empty = GPT(config), GPT.empty(config)
    assert empty.lm_head.weight is empty.wte.weight
    empty.load_state_dict(built.state_dict())
    idx = tokens(2, 20)
    torch.testing.assert_close(empty(idx), built(idx), rtol=0, atol=0)


def test_an_empty_model_skips_the_fills_without_importing_dynamo_or_sympy_and_leaves_init_as_it_was():
    import subprocess
    import sys

    # A fresh process: what loading a checkpoint costs a stage that never compiles.
    script = (
        "import sys, torch\n"
        "from llm.model import GPT, model_config\n"
        "fills = {name: getattr(torch.nn.init, name) for name in ('normal_', 'zeros_', 'kaiming_uniform_')}\n"
        "model = GPT.empty(model_config('tiny', vocab_size=64))\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n"
        "print(all(getattr(torch.nn.init, name) is f for name, f in fills.items()))\n"
        "print(model.wte.weight.device, model.lm_head.weight is model.wte.weight)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert run.stdout.splitlines() == ["[]", "True", "cpu True"]
    # A model built after one is loaded is initialised as ever.
    GPT.empty(model_config("tiny", vocab_size=VOCAB))
    torch.manual_seed(0)
    fresh = GPT(model_config("tiny", vocab_size=VOCAB))
    assert 0.015 < float(fresh.wte.weight.std()) < 0.025 and bool(fresh.ln_f.weight.eq(1).all())


# ---------------------------------------------------------------------------------------------------
# Cache and padding paths of forward_hidden (generation's building blocks; decoding is in test_generate)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_cached_chunks_equal_one_full_forward(attention):
    model = tiny(attention=attention).eval()
    idx = tokens(2, 30)
    cache = model.new_cache(batch_size=2)
    pieces = [model.forward_hidden(idx[:, a:b], cache=cache) for a, b in [(0, 12), (12, 13), (13, 30)]]
    assert cache.length == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), model.forward_hidden(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_left_padding_changes_nothing_for_the_real_tokens(attention):
    model = tiny(attention=attention).eval()
    short, long = tokens(1, 9), tokens(1, 14)
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1), long])
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, :5] = False
    hidden = model.forward_hidden(batch, padding_mask=mask)
    torch.testing.assert_close(hidden[0, 5:], model.forward_hidden(short)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden[1], model.forward_hidden(long)[0], rtol=1e-5, atol=1e-5)


def test_cache_overflow_is_an_error():
    model = tiny().eval()
    cache = model.new_cache(batch_size=1)
    model.forward_hidden(tokens(1, 60), cache=cache)
    with pytest.raises(ValueError, match="65 positions exceed context_length 64"):
        model.forward_hidden(tokens(1, 5), cache=cache)


# ---------------------------------------------------------------------------------------------------
# Config


def test_presets_are_valid_and_overridable():
    for name in PRESETS:
        assert isinstance(model_config(name), ModelConfig)
    config = model_config("gpt2", dropout=0.1, attention="explicit")
    assert (config.n_layer, config.dropout, config.attention) == (12, 0.1, "explicit")
    assert model_config(vocab_size=10, context_length=8, n_embd=4, n_head=2, n_layer=1).qkv_bias is True


def test_config_round_trips_through_a_dict():
    config = model_config("gpt2-book", attention="explicit")
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_config_errors_name_every_bad_key():
    with pytest.raises(ConfigError) as info:
        model_config("gpt2", n_embd=100, n_layer=0, dropout=1.0, attention="flash", n_haed=3)
    assert dict(info.value.problems) == {
        "n_haed": "unknown key; did you mean 'n_head'?",
        "attention": "must be one of 'auto', 'sdpa', 'explicit', got 'flash'",
    }  # wrong types stop the range checks; fix those first, as for params.yaml
    with pytest.raises(ConfigError) as info:
        model_config("gpt2", n_embd=100, n_layer=0, dropout=1.0)
    assert dict(info.value.problems) == {
        "n_embd": "must be divisible by n_head (12), got 100",
        "n_layer": "must be > 0, got 0",
        "dropout": "must be in [0, 1), got 1.0",
    }
    assert "  n_embd: must be divisible by n_head (12), got 100" in str(info.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'gpt3'; known presets: gpt2, gpt2-medium"):
        model_config("gpt3")


def test_a_config_without_a_preset_needs_every_size():
    with pytest.raises(ConfigError) as info:
        model_config(vocab_size=10)
    assert dict(info.value.problems)["n_embd"] == "is required"
