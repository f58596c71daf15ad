"""Take a model out of the pipeline: a Hugging Face folder, or a GGUF file for llama.cpp and Ollama.

    python -m llm.export --checkpoint data/checkpoints/finetune --format hf exports/gpt-instruct
    python -m llm.export --checkpoint data/checkpoints/finetune --format gguf exports/gpt-instruct.gguf [--dtype f16]

An existing OUT is replaced only with `--overwrite` (whole, once the new export is complete).

`hf` writes a folder that `transformers.AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` load with no code of ours: config.json (GPT2LMHeadModel),
model.safetensors in GPT-2's Conv1D layout, generation_config.json, and GPT-2's tokenizer files
(vocab.json, merges.txt), written from the tiktoken encoding the model was trained with.

`gguf` writes one file in the layout llama.cpp loads for its `gpt2` architecture, with the tokenizer
embedded, in f32, f16 or q8_0 (norms, biases and the position embedding stay f32, as llama.cpp's own
converter keeps them), and an Ollama Modelfile beside it (OUT with the suffix .Modelfile): an instruction
model gets its prompt template (Alpaca or Phi-3), a base model the raw prompt.

    ollama create gpt-instruct -f exports/gpt-instruct.Modelfile && ollama run gpt-instruct "Name a colour."

Every GPT of this project exports exactly, the book's `gpt2-book` preset included: a model without qkv
biases gets zero biases (the same function), and an untied head is saved as its own `lm_head.weight` with
`tie_word_embeddings: false`, which GPT-2's Hugging Face class honours (llama.cpp reads `output.weight`,
which is always written). Refused, with the reason: classifiers and encoders (not causal language
models), and tokenizers other than GPT-2's byte-level BPE (gpt2, r50k_base), which GPT-2's tokenizer
files cannot describe.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import numpy as np
import tiktoken
import torch

from llm.checkpoint import CheckpointConfig, CheckpointError, load_model, read_config, require_language_model
from llm.config import ExportFormat, GGUFType
from llm.files import atomic_dir, atomic_path, write_text_atomic
from llm.gpt2_weights import CONV1D_WEIGHTS
from llm.instructions import TEMPLATES, Record, prompt_text
from llm.model import GPT
from llm.tokenizer import get_tokenizer

FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)
GGUF_TYPES: tuple[GGUFType, ...] = get_args(GGUFType)
# Encodings with GPT-2's vocabulary and pre-tokenizer: the only ones GPT-2's tokenizer files describe.
GPT2_TOKENIZERS = ("gpt2", "r50k_base")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which llm/model.py uses


class ExportError(RuntimeError):
    pass


def exportable(ckpt_dir: str | Path) -> tuple[CheckpointConfig, GPT, tiktoken.Encoding]:
    """The checkpoint's config, model (fp32, eval mode) and tokenizer, if both formats can describe its
    model and tokenizer; else an ExportError that says why not."""
    saved = read_config(ckpt_dir)
    try:
        require_language_model(saved, ckpt_dir)
    except CheckpointError as exc:
        raise ExportError(f"cannot export {ckpt_dir}: both formats hold a causal language model (GPT-2's "
                          f"architecture), and {exc}") from None
    if saved.tokenizer not in GPT2_TOKENIZERS:
        raise ExportError(f"cannot export {ckpt_dir}: its tokenizer is {saved.tokenizer!r}, and the exported "
                          f"tokenizer files are GPT-2's byte-level BPE, which describe only "
                          f"{' or '.join(GPT2_TOKENIZERS)}; train with tokenize.tokenizer: gpt2 to export")
    return saved, load_model(ckpt_dir).float(), get_tokenizer(saved.tokenizer)


def export(ckpt_dir: str | Path, fmt: ExportFormat, out: str | Path, dtype: GGUFType = "f16") -> Path:
    """Export checkpoint `ckpt_dir` as `fmt` to `out` (a folder for hf, a file for gguf)."""
    if fmt == "hf":
        return export_hf(ckpt_dir, out)
    if fmt == "gguf":
        return export_gguf(ckpt_dir, out, dtype)
    raise ExportError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------------------------------
# The tokenizer, as GPT-2's byte-level BPE files spell it


@functools.cache
def _byte_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (bytes_to_unicode in its encoder.py): vocab.json's alphabet."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in symbols)
    for n, b in enumerate(shifted):
        symbols[b] = chr(256 + n)
    return dict(sorted(symbols.items()))


def _spelled(token: bytes) -> str:
    symbols = _byte_symbols()
    return "".join(symbols[b] for b in token)


@functools.cache
def bpe_vocabulary(tokenizer: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the token of each id, the merges in rank order) as vocab.json and merges.txt spell them.

    tiktoken keeps only each token's rank; the merge that made a token is found by running BPE on its
    bytes with the merges ranked before it, which ends in exactly the two parts it was merged from.
    """
    enc = get_tokenizer(tokenizer)
    special = {enc.encode_single_token(s): s for s in enc.special_tokens_set}
    pieces = [enc.decode_single_token_bytes(i) for i in range(enc.n_vocab) if i not in special]
    ranks = {piece: rank for rank, piece in enumerate(pieces)}
    tokens = [special[i] if i in special else _spelled(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    merges = []
    for piece in pieces:
        if len(piece) > 1:
            left, right = _last_merge(piece, ranks)
            merges.append(f"{_spelled(left)} {_spelled(right)}")
    return tuple(tokens), tuple(merges)


def _last_merge(piece: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    parts = [piece[i:i + 1] for i in range(len(piece))]
    limit = ranks[piece]
    while len(parts) > 2:
        candidates = [(ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1)]
        rank, i = min(candidates)
        if rank >= limit:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ExportError(f"token {piece!r} is not the merge of two tokens ranked before it: the encoding is not "
                          f"a byte-level BPE that GPT-2's merges.txt can describe")
    return parts[0], parts[1]


# ---------------------------------------------------------------------------------------------------
# Hugging Face


def hf_config(model: GPT, eot_id: int) -> dict:
    """config.json for transformers' GPT2LMHeadModel computing exactly what `model` computes."""
    c = model.config
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.context_length, "n_ctx": c.context_length,
        "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None,
        "activation_function": "gelu_new",  # GELU's tanh approximation, as llm/model.py's MLP
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": c.tie_weights, "bos_token_id": eot_id, "eos_token_id": eot_id,
        "initializer_range": 0.02, "use_cache": True, "dtype": "float32",
    }


def hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under GPT2LMHeadModel's names and layouts."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if not model.config.tie_weights:
                tensors[name] = tensor.clone()
            continue
        tensors[f"transformer.{name}"] = (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).contiguous().clone()
    if not model.config.qkv_bias:  # GPT-2 always adds a qkv bias: a zero one computes the same
        for i, block in enumerate(model.h):
            tensors[f"transformer.h.{i}.attn.c_attn.bias"] = _zero_bias(block.attn.c_attn.weight)
    return tensors


def _zero_bias(weight: torch.Tensor) -> torch.Tensor:
    """The bias a layer without one has, for formats that always hold one: zeros, one per output."""
    return torch.zeros(weight.shape[0], dtype=weight.dtype)


def export_hf(ckpt_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face GPT-2 folder at `out_dir` (replacing one there only once complete)."""
    import safetensors.torch

    saved, model, enc = exportable(ckpt_dir)
    eot = enc.eot_token
    tokens, merges = bpe_vocabulary(saved.tokenizer)
    eot_text = tokens[eot]
    with atomic_dir(out_dir) as tmp:
        safetensors.torch.save_file(hf_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {
            "config.json": hf_config(model, eot),
            "generation_config.json": {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
                                       "do_sample": False},  # greedy, as llm.generate's default
            "vocab.json": {token: i for i, token in enumerate(tokens)},
            "tokenizer_config.json": {"tokenizer_class": "GPT2Tokenizer",
                                      "model_max_length": model.config.context_length,
                                      "bos_token": eot_text, "eos_token": eot_text, "unk_token": eot_text,
                                      "add_prefix_space": False, "add_bos_token": False},
            "special_tokens_map.json": {"bos_token": eot_text, "eos_token": eot_text, "unk_token": eot_text},
        }
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return Path(out_dir)


# ---------------------------------------------------------------------------------------------------
# GGUF and Ollama


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's gpt2 names, in nn.Linear's (out, in) layout as it reads them."""
    import gguf

    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    sd = model.state_dict()
    tensors = {f"{names[T.TOKEN_EMBD]}.weight": sd["wte.weight"], f"{names[T.POS_EMBD]}.weight": sd["wpe.weight"]}
    per_layer = {T.ATTN_NORM: "ln_1", T.ATTN_QKV: "attn.c_attn", T.ATTN_OUT: "attn.c_proj", T.FFN_NORM: "ln_2",
                 T.FFN_UP: "mlp.c_fc", T.FFN_DOWN: "mlp.c_proj"}
    for i in range(model.config.n_layer):
        for kind, ours in per_layer.items():
            name = names[kind].format(bid=i)
            tensors[f"{name}.weight"] = sd[f"h.{i}.{ours}.weight"]
            bias = sd.get(f"h.{i}.{ours}.bias")
            tensors[f"{name}.bias"] = bias if bias is not None else _zero_bias(sd[f"h.{i}.{ours}.weight"])
    tensors[f"{names[T.OUTPUT_NORM]}.weight"] = sd["ln_f.weight"]
    tensors[f"{names[T.OUTPUT_NORM]}.bias"] = sd["ln_f.bias"]
    tensors[f"{names[T.OUTPUT]}.weight"] = sd["lm_head.weight"]  # written tied or not: llama.cpp reads it
    return tensors


def gguf_type(name: str, tensor: torch.Tensor, dtype: GGUFType):
    """The GGML type a tensor is stored in: as llama.cpp's converter chooses, 1-D and position tensors f32,
    and a q8_0 tensor whose rows are not whole 32-value blocks f16."""
    import gguf

    if dtype == "f32" or tensor.dim() == 1 or name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD]):
        return gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.F16


def export_gguf(ckpt_dir: str | Path, out_path: str | Path, dtype: GGUFType = "f16") -> Path:
    """Write a GGUF file at `out_path` and an Ollama Modelfile beside it (each whole, or not at all)."""
    import gguf

    if dtype not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {dtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    saved, model, enc = exportable(ckpt_dir)
    c = model.config
    tokens, merges = bpe_vocabulary(saved.tokenizer)
    specials = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    out_path = Path(out_path)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
        writer.add_name(str(saved.extra.get("stage", Path(ckpt_dir).name)))
        writer.add_context_length(c.context_length)
        writer.add_embedding_length(c.n_embd)
        writer.add_feed_forward_length(4 * c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_head_count(c.n_head)
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex, as llama.cpp names it
        writer.add_token_list(list(tokens))
        writer.add_token_types([gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL
                                for i in range(len(tokens))])
        writer.add_token_merges(list(merges))
        writer.add_bos_token_id(enc.eot_token)
        writer.add_eos_token_id(enc.eot_token)
        writer.add_add_bos_token(False)  # GPT-2 was trained without one
        for name, tensor in gguf_tensors(model).items():
            kind = gguf_type(name, tensor, dtype)
            data = gguf.quants.quantize(tensor.detach().numpy().astype(np.float32), kind)
            writer.add_tensor(name, data, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    write_text_atomic(modelfile_path(out_path), modelfile(out_path.name, saved))
    return out_path


def modelfile_path(gguf_path: str | Path) -> Path:
    return Path(gguf_path).with_suffix(".Modelfile")


def modelfile(gguf_name: str, saved: CheckpointConfig) -> str:
    """An Ollama Modelfile for the GGUF file beside it: greedy, the model's context, and for an instruction
    model the prompt it was tuned on, with the user's message as the instruction, and its format's stops."""
    style = saved.extra.get("prompt_style")
    if style in TEMPLATES:
        prompt = prompt_text(Record("{{ .Prompt }}", "", ""), style)
        stops = TEMPLATES[style].stops
    else:
        prompt, stops = "{{ .Prompt }}", ()
    enc = get_tokenizer(saved.tokenizer)
    return "\n".join([
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{prompt}"""',
        # Each stop on one line, without the newlines before it: a Modelfile's quoted values are not escaped.
        *(f'PARAMETER stop "{stop.strip()}"' for stop in (enc.decode([enc.eot_token]), *stops)),
        "PARAMETER temperature 0",
        f"PARAMETER num_ctx {saved.model.context_length}",
        "",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint folder to export")
    parser.add_argument("--format", choices=FORMATS, required=True, help="hf: a Hugging Face folder; gguf: one file")
    parser.add_argument("--dtype", choices=GGUF_TYPES, default="f16", help="the GGUF tensor type (default f16)")
    parser.add_argument("out", type=Path, help="the folder (hf) or file (gguf) to write")
    parser.add_argument("--overwrite", action="store_true", help="replace what is at OUT (default: refuse)")
    args = parser.parse_args(argv)
    targets = [args.out, *([modelfile_path(args.out)] if args.format == "gguf" else [])]
    if not args.overwrite and (taken := [str(p) for p in targets if p.exists()]):
        print(f"error: {' and '.join(taken)} already there: an export replaces what is at its path; choose "
              f"another path, or pass --overwrite to replace it", file=sys.stderr)
        return 1
    try:
        out = export(args.checkpoint, args.format, args.out, args.dtype)
    except (ExportError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}" + (f" and {modelfile_path(out)}" if args.format == "gguf" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
