import os
import subprocess
import sys

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llm.checkpoint import save_model
from llm.generate import Sampling, TextDecoder, decode_stream, draw, generate, main, nucleus, sample_next, stream, top_k
from llm.model import GPT, model_config
from llm.tokenizer import get_tokenizer
from llm.validation import ConfigError
from tests.conftest import ROOT

VOCAB = 256


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(model_config("tiny", vocab_size=VOCAB, context_length=16)).eval()


def prompt(length: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,)).tolist()


def reference_greedy(model: GPT, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The book's loop: the plain training forward on the last context_length tokens, argmax."""
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(idx[:, -model.config.context_length :])
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(prompt) :].tolist()


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_greedy_decoding_equals_the_plain_loop_also_past_the_context(use_cache, attention):
    torch.manual_seed(1)
    model = GPT(model_config("tiny", vocab_size=VOCAB, context_length=16, attention=attention)).eval()
    for length in (1, 5, 16):
        p = prompt(length)
        [out] = generate(model, [p], 30, use_cache=use_cache)  # 30 new tokens: well past context 16
        assert out == reference_greedy(model, p, 30)


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_prompts_of_different_lengths_decode_as_they_would_alone(model, use_cache):
    prompts = [prompt(3), prompt(11), prompt(1), prompt(16)]
    batched = generate(model, prompts, 20, use_cache=use_cache)
    assert batched == [generate(model, [p], 20)[0] for p in prompts]


def test_a_prompt_longer_than_the_context_is_cropped_to_its_end(model):
    p = prompt(40)
    assert generate(model, [p], 8) == generate(model, [p[-16:]], 8)


def test_generation_stops_at_end_of_text(model):
    prompts = [prompt(4), prompt(7)]
    free = generate(model, prompts, 12)
    eos = free[0][5]  # whatever the first row says sixth is our end-of-text
    stopped = generate(model, prompts, 12, eos_id=eos)
    assert stopped[0] == free[0][: free[0].index(eos)]
    assert stopped[1] == (free[1][: free[1].index(eos)] if eos in free[1] else free[1])
    assert list(stream(model, prompts[0], 12, eos_id=eos)) == stopped[0]


def test_generation_restores_training_mode(model):
    model.train()
    generate(model, [prompt(3)], 2)
    assert model.training


def test_seeded_sampling_is_reproducible(model):
    sampling = Sampling(temperature=1.0, seed=7)
    prompts = [prompt(5), prompt(2)]
    first = generate(model, prompts, 20, sampling)
    assert generate(model, prompts, 20, sampling) == first
    assert generate(model, prompts, 20, Sampling(temperature=1.0, seed=8)) != first
    assert list(stream(model, prompts[0], 20, sampling)) == generate(model, prompts[:1], 20, sampling)[0]


def known_logits(rows: int) -> torch.Tensor:
    """Every row: token 3 at p=0.5, 7 at 0.3, 1 at 0.15, 9 at 0.05, the other 16 next to nothing."""
    probs = torch.full((20,), 1e-9)
    probs[[3, 7, 1, 9]] = torch.tensor([0.5, 0.3, 0.15, 0.05])
    return probs.log().expand(rows, 20)


@pytest.mark.parametrize(
    "sampling, allowed",
    [
        (Sampling(temperature=1.0, top_k=2), {3, 7}),
        (Sampling(temperature=2.0, top_k=3), {3, 7, 1}),
        (Sampling(temperature=1.0, top_p=0.7), {3, 7}),  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
        (Sampling(temperature=1.0, top_p=0.9), {3, 7, 1}),
        (Sampling(temperature=1.0, top_p=0.4), {3}),
        (Sampling(temperature=1.0, top_k=3, top_p=0.7), {3, 7}),
        (Sampling(temperature=0.0, top_k=3), {3}),
    ],
)
def test_sampling_draws_only_from_the_allowed_tokens_and_from_all_of_them(sampling, allowed):
    generator = torch.Generator().manual_seed(0)
    drawn = set(sample_next(known_logits(4000), sampling, generator).tolist())
    assert drawn == allowed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_picks_the_first_of_tied_maxima_as_argmax_does(dtype):
    logits = torch.randn(6, 50257).to(dtype)
    logits[0, [5, 9, 40000]] = 100  # a tie of three
    logits[1] = 0  # a row that is all ties
    logits[2, -1] = 100  # the last token
    logits[3, 7] = float("nan")  # a broken row: torch takes the NaN as the maximum
    picked = sample_next(logits, Sampling())
    assert picked.tolist() == logits.argmax(dim=-1).tolist()
    assert picked[:4].tolist() == [5, 0, 50256, 7]


DRAWS = 40_000  # rows drawn from one distribution in the frequency tests


def assert_drawn_as(drawn: torch.Tensor, probs: torch.Tensor) -> None:
    """Each token's frequency among `drawn` lies within 4.5 standard errors of its probability, and a token of
    probability 0 is never drawn: a draw that lands one token off, or favours either end of the row, is many
    standard errors out."""
    frequency = torch.bincount(drawn, minlength=len(probs)) / len(drawn)
    error = (probs * (1 - probs) / len(drawn)).sqrt()
    assert (frequency - probs).abs().le(4.5 * error).all(), (frequency, probs)
    assert frequency[probs == 0].eq(0).all()


def test_draws_follow_the_probabilities():
    probs = torch.tensor([0.4, 0.0, 0.3, 0.2, 0.1, 0.0, 0.0])
    generator = torch.Generator().manual_seed(0)
    assert_drawn_as(draw((probs * 3).expand(DRAWS, -1), generator), probs)  # the row needs no normalising


@pytest.mark.parametrize("sampling", [
    Sampling(temperature=1.0),
    Sampling(temperature=0.7, top_k=4),
    Sampling(temperature=1.3, top_p=0.8),
    Sampling(temperature=0.9, top_k=6, top_p=0.9),
])
def test_sampling_draws_as_transformers_samples(sampling):
    # transformers' warpers, in the order its generate applies them, give the probabilities it samples
    # from; our draws' frequencies match them
    warpers = [TemperatureLogitsWarper(sampling.temperature)]
    warpers += [TopKLogitsWarper(sampling.top_k)] if sampling.top_k else []
    warpers += [TopPLogitsWarper(sampling.top_p)] if sampling.top_p else []
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(1)) * 2
    expected = torch.softmax(LogitsProcessorList(warpers)(torch.zeros(1, 0, dtype=torch.long), logits), -1)[0]
    drawn = sample_next(logits.expand(DRAWS, -1), sampling, torch.Generator().manual_seed(0))
    assert_drawn_as(drawn, expected)


@pytest.mark.parametrize("probs, top_p, kept", [
    ([0.5, 0.3, 0.15, 0.05], 0.7, [0.5, 0.3, 0, 0]),  # 0.5 < 0.7, then 0.8 >= 0.7
    ([0.5, 0.3, 0.15, 0.05], 0.5, [0.5, 0, 0, 0]),  # the first alone reaches top_p
    ([0.05, 0.15, 0.5, 0.3], 0.7, [0, 0, 0.5, 0.3]),  # in any order
    ([0.3, 0.3, 0.3, 0.1], 0.5, [0.3, 0.3, 0.3, 0]),  # a tie at the cut is kept whole
    ([0.5, 0.3, 0.15, 0.05], 1.0, [0.5, 0.3, 0.15, 0.05]),
])
def test_the_nucleus_keeps_the_most_likely_tokens_that_reach_top_p(probs, top_p, kept):
    assert torch.equal(nucleus(torch.tensor([probs]), top_p), torch.tensor([kept]))


def test_top_k_keeps_a_tie_at_the_kth_value_whole():
    logits = torch.tensor([[5.0, 3, 3, 1, 3], [4, 3, 2, 1, 0]])
    values, tokens = top_k(logits, 2)
    # row 0's k-th value, 3, is tied three ways: all kept; row 1 has no tie and is filled up with -inf
    assert values.tolist() == [[5, 3, 3, 3], [4, 3, float("-inf"), float("-inf")]]
    assert tokens[0, 0] == 0 and set(tokens[0, 1:].tolist()) == {1, 2, 4} and tokens[1, :2].tolist() == [0, 1]
    assert torch.equal(logits.gather(1, tokens)[0], values[0])
    drawn = sample_next(torch.tensor([[0.0, 2, 2, 2, -1]]).expand(4000, -1), Sampling(temperature=1.0, top_k=2),
                        torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {1, 2, 3}


def test_broken_logits_are_named_not_sampled():
    logits = torch.zeros(2, 10)
    logits[1, 3] = float("nan")
    with pytest.raises(ValueError, match="the next token's probabilities are NaN, infinite or all zero"):
        sample_next(logits, Sampling(temperature=1.0))


def test_bad_settings_are_named():
    model = GPT(model_config("tiny", vocab_size=VOCAB))
    with pytest.raises(ConfigError) as info:
        generate(model, [[1]], 3, Sampling(temperature=-1, top_k=0, top_p=1.5))
    assert dict(info.value.problems) == {
        "temperature": "must be in [0, inf], got -1",
        "top_k": "must be in [1, inf], got 0",
        "top_p": "must be in (0, 1], got 1.5",
    }
    with pytest.raises(ValueError, match=r"every prompt needs at least one token \(empty: \[1\]\)"):
        generate(model, [[1], []], 3)


def test_streamed_text_holds_back_characters_split_across_tokens():
    tokenizer = get_tokenizer("gpt2")
    text = "Moves you 🤗 日本語, é."
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # the emoji and the kanji take several tokens each
    pieces = list(decode_stream(tokenizer, ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(decode_stream(tokenizer, ids[:-4])).endswith("\ufffd")  # a cut character shows as U+FFFD


def test_text_ends_before_a_stop_text_and_what_may_begin_one_waits_for_the_next_tokens():
    tokenizer = get_tokenizer("gpt2")
    stops = ["\n\n### Instruction:"]

    def pieces(text: str) -> tuple[list[str], str, bool]:
        decoder = TextDecoder(tokenizer, stops)
        given = [decoder.add(token) for token in tokenizer.encode_ordinary(text)]
        return given, decoder.finish(), decoder.stopped

    given, rest, stopped = pieces("Blue is nice.\n\n### Instruction:\nName another")
    assert "".join(given) + rest == "Blue is nice." and stopped
    given, rest, stopped = pieces("Blue.\n\n### Instr")  # ends while it may still be a stop text
    assert given[-1] == "" and "".join(given) == "Blue." and rest == "\n\n### Instr" and not stopped
    given, rest, stopped = pieces("A.\n\n## B")  # held back until it is no stop text
    assert "".join(given) + rest == "A.\n\n## B" and not stopped


@pytest.mark.slow
def test_the_command_prints_the_continuation(tmp_path):
    torch.manual_seed(3)
    model = GPT(model_config("tiny")).eval()  # GPT-2's vocabulary, to match the tokenizer
    save_model(model, tmp_path / "ckpt")
    tokenizer = get_tokenizer("gpt2")
    text = "Every effort moves you"
    sampling = Sampling(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    new = generate(model, [tokenizer.encode(text)], 12, sampling, eos_id=tokenizer.eot_token)[0]
    assert new
    command = [sys.executable, "-m", "llm.generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", text,
               "--max-new-tokens", "12", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95",
               "--seed", "11"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == tokenizer.decode(new) + "\n"



def test_the_command_names_what_is_wrong(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "x"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nowhere'} is not a checkpoint")
    assert main(["--checkpoint", str(tmp_path), "--prompt", "x", "--temperature", "-1", "--top-p", "2"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: the command line has 2 problems; fix them and rerun:",
        "  temperature: must be in [0, inf], got -1.0",
        "  top_p: must be in (0, 1], got 2.0",
    ]
    save_model(GPT(model_config("tiny", vocab_size=VOCAB)), tmp_path / "small-vocab")
    assert main(["--checkpoint", str(tmp_path / "small-vocab"), "--prompt", "x"]) == 1
    assert "model's vocab_size 256 does not match tokenizer 'gpt2' (50257 tokens)" in capsys.readouterr().err
