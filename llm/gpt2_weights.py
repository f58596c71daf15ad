"""OpenAI's GPT-2 weights (124M to 1558M) from Hugging Face's safetensors files, as our checkpoint folder.

    python -m llm.gpt2_weights gpt2 data/checkpoints/gpt2             # download, convert
    python -m llm.gpt2_weights path/to/hf-folder data/checkpoints/x   # a local Hugging Face GPT-2

SOURCE is a size (gpt2, gpt2-medium, gpt2-large, gpt2-xl), fetched from huggingface.co/openai-community
through llm.download (sha256-pinned, served from a local mirror where there is no network), or a
folder holding a Hugging Face GPT-2's config.json and model.safetensors. The result is a checkpoint
folder (llm/checkpoint.py) that pretraining, fine-tuning and generation read like any other.

Hugging Face's GPT-2 has our architecture and parameter names: its modules are Conv1D, whose weights
are stored (in, out), the transpose of nn.Linear's (out, in); its c_attn holds q, k, v side by side in
the same order as ours. Tensors are copied one at a time, so converting gpt2-xl needs the model's
memory (6.5 GB) and little more.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import torch

from llm.checkpoint import save_model
from llm.model import GPT, ModelConfig, model_config
from llm.validation import ConfigError, bulleted

SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
URL = "https://huggingface.co/openai-community/{size}/resolve/main/model.safetensors"
# sha256 of each model.safetensors (its Git LFS oid). gpt2's is the published oid, quoted alike by
# three unrelated public projects (size 548,105,171 bytes). For the larger sizes no trustworthy
# published value was found, so they are fetched unpinned: llm.download warns and prints the hash to pin.
SHA256: dict[str, str | None] = {
    "gpt2": "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707",
    "gpt2-medium": None,
    "gpt2-large": None,
    "gpt2-xl": None,
}
DEFAULT_DOWNLOAD_DIR = Path("data/pretrained")

# Conv1D weights, stored (in, out); nn.Linear wants (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Older transformers saved each layer's causal mask as a tensor; we build ours.
_MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


class WeightsError(RuntimeError):
    pass


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a Hugging Face GPT-2 config; variants our model does not compute are refused."""
    gelu = hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")
    supported = {  # key: (whether ours computes the same, what it must be)
        "model_type": (hf.get("model_type", "gpt2") == "gpt2", "must be 'gpt2'"),
        "activation_function": (gelu, "must be GELU's tanh approximation, 'gelu_new'"),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5) == 1e-5, "must be 1e-05"),
        "n_inner": (hf.get("n_inner") in (None, 4 * hf.get("n_embd", 0)), "must be null or 4 * n_embd"),
        "scale_attn_weights": (hf.get("scale_attn_weights", True) is True, "must be true"),
        "scale_attn_by_inverse_layer_idx": (not hf.get("scale_attn_by_inverse_layer_idx"), "must be false"),
        "add_cross_attention": (not hf.get("add_cross_attention"), "must be false"),
    }
    problems = [(key, f"{message}, got {hf.get(key)!r}") for key, (ok, message) in supported.items() if not ok]
    if problems:
        raise ConfigError(problems, source)
    fields = {"vocab_size": "vocab_size", "context_length": "n_positions", "n_embd": "n_embd",
              "n_head": "n_head", "n_layer": "n_layer"}
    missing = [hf_key for hf_key in fields.values() if hf_key not in hf]
    if missing:
        raise ConfigError([(key, "is required") for key in missing], source)
    ours = {name: hf[hf_key] for name, hf_key in fields.items()}
    return model_config(**ours, qkv_bias=True, tie_weights=hf.get("tie_word_embeddings", True), dropout=0.0)


def load_hf_weights(model: GPT, weights: Path) -> None:
    """Copy a Hugging Face GPT-2 safetensors file into `model`, checking every name and shape."""
    if model.config.is_encoder:
        raise WeightsError(f"{weights} holds GPT-2, a causal language model: its weights do not make an encoder "
                           f"(model.objective: masked); set model.objective: causal to start from GPT-2, or "
                           f"pretrain the encoder from scratch (pretrain.init_from: scratch)")
    ours = model.state_dict()  # shares storage with the parameters: copying into it loads the model
    if model.config.tie_weights:
        del ours["lm_head.weight"]  # it is wte; a tied file stores it once, as wte
    present: set[str] = set()
    problems: list[str] = []
    with safetensors.safe_open(weights, framework="pt") as f:
        for hf_name in f.keys():
            name = hf_name.removeprefix("transformer.")
            if _MASK_BUFFER.fullmatch(name) or (name == "lm_head.weight" and model.config.tie_weights):
                continue
            if name not in ours:
                problems.append(f"{hf_name}: not a GPT-2 parameter")
                continue
            present.add(name)
            tensor = f.get_tensor(hf_name)
            target = ours[name].t() if name.endswith(CONV1D_WEIGHTS) else ours[name]  # in the file's layout
            if tensor.shape != target.shape:
                problems.append(f"{hf_name}: {list(tensor.shape)} in the file, "
                                f"{list(target.shape)} in the config")
                continue
            target.copy_(tensor)
    problems += [f"{name}: missing" for name in ours if name not in present]
    if problems:
        raise WeightsError(f"{weights} does not hold the GPT-2 its config describes:{bulleted(problems)}")


def gpt2_from_files(weights: Path, config: ModelConfig, device: torch.device | str = "cpu") -> GPT:
    """Our GPT holding a Hugging Face GPT-2's weights, in eval mode."""
    model = GPT.empty(config, device)
    load_hf_weights(model, weights)
    return model.eval()


def download_gpt2(size: str, download_dir: Path = DEFAULT_DOWNLOAD_DIR) -> Path:
    """Fetch (or find in the mirror) `size`'s model.safetensors as `download_dir/<size>.safetensors`."""
    from llm.download import fetch_with_retries  # imported here: only this path needs the network code

    return fetch_with_retries(URL.format(size=size), Path(download_dir) / f"{size}.safetensors", SHA256[size])


def convert(
    source: str | Path, out_dir: str | Path, *, download_dir: Path = DEFAULT_DOWNLOAD_DIR,
    device: torch.device | str = "cpu",
) -> Path:
    """Write a checkpoint folder at `out_dir` from a GPT-2 size name or a Hugging Face folder."""
    if str(source) in SIZES:
        config = model_config(str(source))  # the presets are GPT-2's shapes
        weights = download_gpt2(str(source), download_dir)
        origin = URL.format(size=source)
    elif Path(source).is_dir():
        folder = Path(source)
        for name in ("config.json", "model.safetensors"):
            if not (folder / name).is_file():
                raise WeightsError(f"{folder} has no {name}: a Hugging Face GPT-2 folder holds config.json "
                                   "and model.safetensors")
        try:
            hf_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise WeightsError(f"{folder / 'config.json'} is not valid JSON: {exc}") from exc
        config = config_from_hf(hf_config, str(folder / "config.json"))
        weights = folder / "model.safetensors"
        origin = str(folder.resolve())
    else:
        raise WeightsError(f"{source!r} is neither a GPT-2 size ({', '.join(SIZES)}) nor a folder")
    model = gpt2_from_files(weights, config, device)
    return save_model(model, out_dir, tokenizer="gpt2", extra={"source": origin})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.gpt2_weights", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help=f"{', '.join(SIZES)}, or a Hugging Face GPT-2 folder")
    parser.add_argument("out_dir", type=Path, help="the checkpoint folder to write")
    parser.add_argument("--download-dir", type=Path, default=DEFAULT_DOWNLOAD_DIR,
                        help=f"where downloaded weights are kept (default: {DEFAULT_DOWNLOAD_DIR})")
    args = parser.parse_args(argv)
    try:
        out = convert(args.source, args.out_dir, download_dir=args.download_dir)
    except (WeightsError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
