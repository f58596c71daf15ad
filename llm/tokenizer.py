"""The tokenizer: tiktoken's BPE encodings (GPT-2's by default), with errors that say how to fix them.

tiktoken downloads an encoding's BPE files on first use. With no network, point `TIKTOKEN_CACHE_DIR` at a
folder that holds them (CI uses `../shared/tiktoken_cache`).
"""

from __future__ import annotations

import functools
import os

import tiktoken


class TokenizerError(RuntimeError):
    pass


@functools.cache
def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """The tiktoken encoding `name`, cached per process."""
    known = tiktoken.list_encoding_names()
    if name not in known:
        raise TokenizerError(f"unknown tokenizer {name!r}: tokenize.tokenizer must be one of {', '.join(known)}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:  # tiktoken raises requests' or its own errors when the files are missing
        cache = os.environ.get("TIKTOKEN_CACHE_DIR", "(not set)")
        raise TokenizerError(
            f"could not load the {name!r} BPE files ({type(exc).__name__}: {exc}). Offline, set "
            f"TIKTOKEN_CACHE_DIR to a folder that holds them (TIKTOKEN_CACHE_DIR is {cache})"
        ) from exc


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned integer type that holds every id: uint16 for GPT-2's 50,257."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"
