"""An instruction-tuned model's responses to test prompts, in the book's shape (chapter 7).

    prompts = [prompt_text(record, style) for record in records]      # llm.instructions
    answered = generate_responses(model, tokenizer, records, prompts, max_new_tokens=256)
    write_responses("data/eval/responses.json", answered)   # [{...record, "model_response": "..."}]

Prompts are decoded in batches with the KV cache (`llm.generate.generate`), each stopping at the
end-of-text token; batches group prompts of similar length, so there is little padding to carry. A
response is the new text only: the "### Response:" header that a model fine-tuned on the Alpaca format
writes first is removed and the whitespace around it stripped, as in the book's

    response_text = generated_text[len(input_text):].replace("### Response:", "").strip()

except that only a leading header goes: a model that rambles on into another "### Response:" keeps it,
so the rambling stays visible to the scores.

Greedy decoding (the default) gives the same responses whatever the batch size; seeded sampling is
reproducible for a given batch size, as each batch draws from its own generator seeded alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from llm import faults
from llm.files import write_json_atomic
from llm.generate import Sampling, generate
from llm.model import GPT

RESPONSE_HEADER = "### Response:"


def clean_response(text: str) -> str:
    """The generated text without surrounding whitespace and without a leading "### Response:"."""
    text = text.strip()
    if text.startswith(RESPONSE_HEADER):
        text = text[len(RESPONSE_HEADER):].strip()
    return text


def generate_responses(
    model: GPT,
    tokenizer: tiktoken.Encoding,
    records: Sequence[Mapping[str, Any]],
    prompts: Sequence[str],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    batch_size: int = 8,
    key: str = "model_response",
) -> list[dict[str, Any]]:
    """Each record, in order, with its fields and the model's response to its prompt under `key`."""
    if len(records) != len(prompts):
        raise ValueError(f"got {len(records)} records but {len(prompts)} prompts: give one prompt per record")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Prompt text is data: a literal "<|endoftext|>" in it is text, not the special token.
    ids = [tokenizer.encode(prompt, disallowed_special=()) for prompt in prompts]
    by_length = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    responses = [""] * len(ids)
    for start in range(0, len(by_length), batch_size):
        rows = by_length[start:start + batch_size]
        outputs = generate(model, [ids[i] for i in rows], max_new_tokens, sampling,
                           eos_id=tokenizer.eot_token)
        for i, new_ids in zip(rows, outputs):
            responses[i] = clean_response(tokenizer.decode(new_ids))
        faults.pause_point("evaluate.generate")
    return [{**record, key: response} for record, response in zip(records, responses)]


def write_responses(path: str | Path, records: Sequence[Mapping[str, Any]]) -> None:
    """The records as one JSON list (the book's instruction-data-with-response.json), written atomically."""
    write_json_atomic(path, [dict(record) for record in records])
