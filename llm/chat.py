"""Chat with the fine-tuned model in a terminal: each line you type is an instruction, put in the
model's prompt format (the Alpaca prompt by default, as it was fine-tuned), and the answer streams back,
ending at end-of-text or where the model starts the format's next part ("### Instruction:"), as the
served chat model's answers do (llm/pyfunc_chat.py).

    python -m llm.chat                                              # data/checkpoints/finetune
    python -m llm.chat --checkpoint DIR --temperature 0.7 --max-new-tokens 200

Give an instruction an input after ` || `, as in `Translate to German || Good morning`. An empty line or
end of input (Ctrl-D) ends the chat.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from llm.checkpoint import CheckpointError, read_config, require_language_model
from llm.config import INFERENCE_PRECISION, Precision
from llm.generate import (Sampling, TextDecoder, add_sampling_options, load_for_inference, sampling_from,
                          stream)
from llm.instructions import Record, prompt_text, template
from llm.tokenizer import TokenizerError, get_tokenizer
from llm.validation import ConfigError

INPUT_SEPARATOR = " || "


def instruction(line: str) -> Record:
    text, _, extra = line.partition(INPUT_SEPARATOR)
    return Record(instruction=text.strip(), input=extra.strip(), output="")


def chat(checkpoint: Path, sampling: Sampling, max_new_tokens: int, device: str,
         precision: Precision = INFERENCE_PRECISION, lines: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    config = read_config(checkpoint)
    require_language_model(config, checkpoint)
    style = config.extra.get("prompt_style", "alpaca")
    tokenizer = get_tokenizer(config.tokenizer)
    model = load_for_inference(checkpoint, device, precision)
    interactive = lines.isatty()
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = lines.readline()
        if not line.strip():
            return
        prompt = tokenizer.encode_ordinary(prompt_text(instruction(line), style))
        # As the served chat model does: an answer also ends where the model starts the format's next part.
        decoder = TextDecoder(tokenizer, template(style).stops)
        for token in stream(model, prompt, max_new_tokens, sampling, eos_id=tokenizer.eot_token):
            out.write(decoder.add(token))
            out.flush()
            if decoder.stopped:
                break
        out.write(decoder.finish() + "\n\n")
        out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("data/checkpoints/finetune"))
    add_sampling_options(parser, max_new_tokens=128, temperature=0.0, top_k=None)
    args = parser.parse_args(argv)
    try:
        chat(args.checkpoint, sampling_from(args), args.max_new_tokens, args.device, args.precision)
    except (CheckpointError, ConfigError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
