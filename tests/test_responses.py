import json

import pytest
import torch

from llm.generate import generate
from llm.model import GPT, model_config
from llm.responses import clean_response, generate_responses, write_responses
from llm.tokenizer import get_tokenizer

RECORDS = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris.", "id": 7},
    {"instruction": "Rewrite the sentence.", "input": "The car is very fast.", "output": "It is quick."},
    {"instruction": "Say <|endoftext|> aloud.", "input": "", "output": "Done."},
    {"instruction": "Sort", "input": "3, 1, 2", "output": "1, 2, 3"},
    {"instruction": "Give an antonym of 'hot', and use it in a sentence about the weather.", "input": "",
     "output": "Cold: it is cold today."},
]


def prompt_of(record: dict) -> str:
    text = f"### Instruction:\n{record['instruction']}"
    return text + (f"\n\n### Input:\n{record['input']}" if record["input"] else "")


PROMPTS = [prompt_of(r) for r in RECORDS]


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("gpt2")


def always_says(token: int) -> GPT:
    """A model whose every next token is `token`: zero hidden states but for the final LayerNorm's bias,
    and a head that maps that constant to `token` alone."""
    model = GPT(model_config("tiny", tie_weights=False)).eval()
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[token] = 1.0
    return model


def test_one_response_per_record_in_order_with_every_field_kept(tokenizer):
    torch.manual_seed(0)
    model = GPT(model_config("tiny")).eval()
    with torch.no_grad():  # weights well away from GPT-2's small init: each prompt gets its own response
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(0, 0.2)

    answered = generate_responses(model, tokenizer, RECORDS, PROMPTS, max_new_tokens=6, batch_size=2)

    alone = [generate(model, [tokenizer.encode(p, disallowed_special=())], 6, eos_id=tokenizer.eot_token)[0]
             for p in PROMPTS]
    assert answered == [{**record, "model_response": clean_response(tokenizer.decode(ids))}
                        for record, ids in zip(RECORDS, alone)]
    assert len({r["model_response"] for r in answered}) == len(RECORDS)  # so the order shows
    assert answered[0]["id"] == 7 and "model_response" not in RECORDS[0]  # the inputs are left alone


def test_a_response_ends_at_end_of_text(tokenizer):
    silent = generate_responses(always_says(tokenizer.eot_token), tokenizer, RECORDS[:2], PROMPTS[:2], 5)
    assert [r["model_response"] for r in silent] == ["", ""]

    [ok] = tokenizer.encode(" ok")
    chatty = generate_responses(always_says(ok), tokenizer, RECORDS[:1], PROMPTS[:1], 3, key="base_response")
    assert chatty == [{**RECORDS[0], "base_response": "ok ok ok"}]


@pytest.mark.parametrize("generated, response", [
    ("\n\n### Response:\nThe capital of France is Paris.\n", "The capital of France is Paris."),
    ("### Response:", ""),
    ("Paris.\n\n### Response:\nParis.", "Paris.\n\n### Response:\nParis."),  # only a leading header goes
    (" \n ", ""),
])
def test_clean_response_strips_whitespace_and_a_leading_response_header(generated, response):
    assert clean_response(generated) == response


def test_records_and_prompts_must_pair_up(tokenizer):
    with pytest.raises(ValueError, match=r"^got 2 records but 1 prompts: give one prompt per record$"):
        generate_responses(always_says(0), tokenizer, RECORDS[:2], PROMPTS[:1], 3)


def test_responses_are_written_as_one_json_list(tmp_path):
    answered = [{**r, "model_response": "x | y\n<b>"} for r in RECORDS]
    write_responses(tmp_path / "eval" / "responses.json", answered)
    assert json.loads((tmp_path / "eval" / "responses.json").read_text(encoding="utf-8")) == answered
    assert [p.name for p in (tmp_path / "eval").iterdir()] == ["responses.json"]  # no temporary left
