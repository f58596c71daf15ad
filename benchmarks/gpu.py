"""On a GPU: pretraining throughput and MFU of the GPT-2 124M recipe, and KV-cached generation of the 124M model.

    python -m benchmarks.gpu train [--steps 300] [--global-batch-size 128] [--peak-tflops 989]
    python -m benchmarks.gpu generate [--new-tokens 256] [--repeats 3]
    torchrun --standalone --nproc_per_node=2 -m benchmarks.gpu train --steps 40    (DDP, one GPU a process)
    python -m benchmarks.gpu train --preset tiny --steps 5 --device cpu --no-compile --precision fp32 \\
        --batch-size 4 --global-batch-size 8 --warmup-steps 1                      (the CPU smoke test)

scripts/gpu-check runs all of them on a CUDA machine; both also run on a CPU with tiny settings.

train: the pretrain stage's own code (`llm.pretrain.run_pretrain`, hence `llm.train.Trainer`) with the
`model` and `pretrain` sections of recipes/gpt2-124m.yaml (GPT-2 124M at context 1024, micro-batches of
32, bf16 autocast where the device runs it fast, torch.compile, its lr, warmup and clipping), changed only
in what a short check needs: `--steps` optimizer steps from scratch, no sample generations, a checkpoint
at the end only, and whatever flags are given (`--global-batch-size` above all: the recipe's 512
sequences take about a second a step on an H100-class GPU, so scripts/gpu-check trains 128). Nothing is
downloaded: the shards are synthetic, written to a temporary folder as the tokenize stage writes them: a
random phrase of 8,191 token ids below 2,048 repeated, so the loss falls fast (the unigram first, then
the phrase) whatever the model. Figures come from the trainer's own reports, every `log_interval` steps
(the recipe's 10); the first window holds torch.compile's warm-up and is left out: tokens/s is the median
of the other windows, the step time the global batch over it, MFU tokens/s x the model's training FLOPs
per token (`GPT.flops_per_token`: 6N plus attention, PaLM's estimate, as the pipeline logs `mfu`) over
the device's dense bf16 peak (llm/hardware.py's datasheet table, or `--peak-tflops`; on a CPU the
measured rate of a large matmul). Under DDP the tokens are every process's and MFU is per GPU. On CUDA it
also times a large bf16 matmul, the rate this GPU reaches in practice, and gives MFU against that too.
It fails (exit 1) when the val loss did not fall.

generate: `llm.generate.generate`, greedy, from a one-token prompt, of a randomly initialised 124M model
(speed does not depend on the weights) on the device, `--new-tokens` tokens (context 1024: never past
the cache), for 1 prompt and for 8 (the evaluate stage's batch), with and without the KV cache, in fp32
(what the project generates in by default) and, where the device runs it fast, in bf16 (what `--precision
bf16` asks of the pipeline's inference). Median of `--repeats` runs after a warm-up run of each; tokens/s
counts every prompt's tokens; whether cached and uncached decoding chose the same tokens is printed too.

Each ends with `key=value` lines, the figures scripts/gpu-check gathers into its summary.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import time_interleaved
from llm import distributed
from llm.config import EvaluateConfig, Params, read_yaml
from llm.generate import generate
from llm.hardware import bf16_is_fast, peak_flops, resolve_device
from llm.model import GPT, model_config
from llm.tracking import MemoryTracker
from llm.validation import from_mapping

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gpt2-124m.yaml"
PHRASE, PHRASE_VOCAB = 8191, 2048  # the synthetic stream: a random phrase of ids below 2,048, repeated
MAX_TRAIN_TOKENS = 16_000_000  # the synthetic train split holds at most this (32 MB); epochs repeat it
EOT = 50256
GENERATE_BATCHES = (1, EvaluateConfig().generate_batch_size)  # one prompt, and the evaluate stage's batch


def figure(name: str, value: Any) -> None:
    """One `key=value` line: what scripts/gpu-check gathers."""
    if isinstance(value, float):
        value = f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    print(f"{name}={value}", flush=True)


# --- the recipe ----------------------------------------------------------------------------------------

def read_recipe(path: Path = RECIPE) -> dict:
    """The recipe as a mapping: with ruamel.yaml as the pipeline reads it, else (a GPU image without it)
    with PyYAML, taught YAML 1.2's floats such as `6e-05` (YAML 1.1 wants a dot in them)."""
    try:
        return read_yaml(path)
    except ImportError:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                     re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                     list("-+0123456789."))
        return yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader)


def train_params(args: argparse.Namespace, recipe: dict) -> Params:
    """The recipe's model and pretrain sections, with what a short check changes."""
    model = {"preset": args.preset} if args.preset else dict(recipe["model"])
    pretrain = dict(recipe["pretrain"])
    pretrain.update(init_from="scratch", max_steps=args.steps, sample_interval=0, checkpoint_interval=args.steps)
    for key in ("device", "precision", "compile", "batch_size", "global_batch_size", "warmup_steps", "lr",
                "log_interval", "eval_batches"):
        if getattr(args, key) is not None:
            pretrain[key] = getattr(args, key)
    if pretrain["min_lr"] > pretrain["lr"]:
        pretrain["min_lr"] = pretrain["lr"]
    return from_mapping(Params, {"model": model, "pretrain": pretrain}, source=f"{RECIPE.name} and flags")


# --- synthetic shards ------------------------------------------------------------------------------------

def synthetic_shards(root: Path, vocab_size: int, train_tokens: int, val_tokens: int, seed: int = 0) -> Path:
    """A shards folder as the tokenize stage writes it (the test suite's writer, tests/data.py): one document
    per split, the same random phrase repeated (val starts elsewhere in it), so that a model's loss falls fast."""
    from tests.data import make_shards

    phrase = np.random.default_rng(seed).integers(0, min(PHRASE_VOCAB, vocab_size), size=PHRASE).astype(np.uint16)
    train, val = (np.resize(np.roll(phrase, shift), count) for count, shift in ((train_tokens, 0),
                                                                               (val_tokens, PHRASE // 2)))
    return make_shards(root, train, val, tokens_per_shard=4_000_000, vocab_size=vocab_size)


# --- train -----------------------------------------------------------------------------------------------

class PrintingTracker(MemoryTracker):
    """Keeps the reports, and prints each: the run's progress shows even if a time limit stops it."""

    def log_metrics(self, metrics, step):
        super().log_metrics(metrics, step)
        if "train_loss" in metrics:
            mfu = f", MFU {metrics['mfu']:.1%} (the trainer's)" if "mfu" in metrics else ""
            print(f"  step {step:5d}: train loss {metrics['train_loss']:.3f}, "
                  f"{metrics['tokens_per_s']:,.0f} tokens/s{mfu}", flush=True)
        if "val_loss" in metrics:
            print(f"  step {step:5d}: val loss {metrics['val_loss']:.3f}", flush=True)


def matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of a size^3 bf16 matmul on a CUDA device: what its tensor cores reach in practice."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def train(args: argparse.Namespace) -> int:
    from llm.pretrain import run_pretrain  # after argument parsing: --help stays fast

    dist = distributed.from_env()
    params = train_params(args, read_recipe())
    cfg, model_cfg = params.pretrain, params.model.build()
    T = model_cfg.context_length
    tokens_per_step = cfg.global_batch_size * T
    tracker = PrintingTracker() if dist.is_main else MemoryTracker()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        train_tokens = min(MAX_TRAIN_TOKENS, max(1_000_000, tokens_per_step * cfg.max_steps))
        val_tokens = max(10_000, cfg.eval_batches * cfg.batch_size * T + T + 1)
        shards = synthetic_shards(Path(tmp) / "shards", model_cfg.vocab_size, train_tokens, val_tokens)
        if dist.is_main:
            print(f"torch {torch.__version__}; {params.model.preset}, context {T}, micro-batch {cfg.batch_size}, "
                  f"global batch {cfg.global_batch_size} over {dist.world_size} process(es) "
                  f"({tokens_per_step:,} tokens a step), {cfg.max_steps} steps, precision {cfg.precision}, "
                  f"compile {cfg.compile}, device {cfg.device}; synthetic shards of {train_tokens:,} tokens",
                  flush=True)
        result = run_pretrain(params, shards, Path(tmp) / "out", tracker=tracker, dist=dist)
    wall = time.perf_counter() - started
    if not dist.is_main:
        return 0

    gpt = result.model
    device = next(gpt.parameters()).device
    dtype = torch.bfloat16 if result.precision_used == "bf16" else torch.float32
    history = result.progress.history
    rates = [rate for _, rate in history["tokens_per_s"]]
    steady = rates[1:] or rates  # the first window holds compilation and warm-up
    rate = statistics.median(steady)
    flops_per_token = gpt.flops_per_token()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device, dtype)
    val = history["val_loss"]
    train_losses = history["train_loss"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    window = cfg.log_interval * tokens_per_step
    compile_s = max(0.0, window / rates[0] - window / rate) if len(rates) > 1 else float("nan")
    print(f"{name}: {rate:,.0f} tokens/s (median of {len(steady)} report windows), "
          f"{tokens_per_step / rate * 1e3:.0f} ms a step, {flops_per_token / 1e9:.3f} GFLOP a token; "
          f"val loss {val[0][1]:.3f} at step 0, {val[-1][1]:.3f} at step {val[-1][0]}; {wall:.0f} s in all")

    figure("device", name.replace(" ", "_"))
    figure("world_size", dist.world_size)
    figure("precision_used", result.precision_used)
    figure("compile", cfg.compile)
    figure("params", gpt.num_params(non_embedding=False))
    figure("steps", result.progress.step)
    figure("global_batch_tokens", tokens_per_step)
    figure("tokens_per_s", rate)
    figure("tokens_per_s_per_gpu", rate / dist.world_size)
    figure("step_ms", tokens_per_step / rate * 1e3)
    figure("first_window_extra_s", compile_s)  # torch.compile's warm-up, mostly
    if peak:
        figure("peak_tflops", peak / 1e12)
        figure("mfu", rate * flops_per_token / (peak * dist.world_size))
    else:
        figure("mfu", f"unknown: no peak for {name}; pass --peak-tflops")
    if device.type == "cuda":
        measured = matmul_tflops(device)
        figure("matmul_bf16_tflops", measured)
        figure("mfu_vs_matmul", rate * flops_per_token / (measured * 1e12 * dist.world_size))
        figure("peak_memory_gib", torch.cuda.max_memory_allocated(device) / 2**30)
    figure("loss_first_window", train_losses[0][1])
    figure("loss_last_window", train_losses[-1][1])
    figure("val_loss_start", val[0][1])
    figure("val_loss_end", val[-1][1])
    fell = math.isfinite(val[-1][1]) and val[-1][1] < val[0][1]
    figure("loss_fell", "yes" if fell else "no")
    figure("wall_s", wall)
    return 0 if fell else 1


# --- generate --------------------------------------------------------------------------------------------

def generation(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = GPT(model_config(args.preset)).to(device).eval()
    new = min(args.new_tokens, model.config.context_length - 1)  # 1 + new fill at most the context
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"torch {torch.__version__}; {name}; {args.preset} ({model.num_params(non_embedding=False):,} parameters, "
          f"random weights), {new} new tokens from a one-token prompt, greedy", flush=True)
    figure_lines: list[tuple[str, Any]] = [("device", name.replace(" ", "_")), ("new_tokens", new)]
    precisions = ["fp32"] + (["bf16"] if bf16_is_fast(device) else []) if args.precision == "all" else [args.precision]
    for precision in precisions:
        model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
        for batch in GENERATE_BATCHES:
            prompts = [[EOT]] * batch
            cached = generate(model, prompts, new)
            uncached = generate(model, prompts, new, use_cache=False)
            times = time_interleaved({"KV cache": lambda: generate(model, prompts, new),
                                      "no cache": lambda: generate(model, prompts, new, use_cache=False)},
                                     warmup=0, repeats=args.repeats)  # the runs above warmed up
            kv, full = times["KV cache"].median, times["no cache"].median
            print(f"{precision} batch {batch}: KV cache {batch * new / kv:,.0f} tokens/s ({kv / new * 1e3:.2f} ms "
                  f"a step, {times['KV cache']}), no cache {batch * new / full:,.0f} tokens/s "
                  f"({times['no cache']}): {full / kv:.2f}x; same tokens: {cached == uncached}", flush=True)
            key = f"{precision}_b{batch}"
            figure_lines += [(f"{key}_tokens_per_s", batch * new / kv), (f"{key}_ms_per_step", kv / new * 1e3),
                             (f"{key}_uncached_tokens_per_s", batch * new / full),
                             (f"{key}_kvcache_speedup", full / kv),
                             (f"{key}_same_tokens_as_uncached", "yes" if cached == uncached else "no")]
    for key, value in figure_lines:
        figure(key, value)
    return 0


# --- the command -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="pretrain the 124M recipe for a few hundred steps: tokens/s and MFU")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--preset", help="a model preset instead of the recipe's (tiny for a CPU smoke test)")
    t.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"))
    t.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    for flag in ("--batch-size", "--global-batch-size", "--warmup-steps", "--log-interval", "--eval-batches"):
        t.add_argument(flag, type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--peak-tflops", type=float, help="the peak to measure MFU against (default: llm/hardware.py's)")
    g = commands.add_parser("generate", help="time KV-cached generation of the 124M model")
    g.add_argument("--preset", default="gpt2")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    g.add_argument("--new-tokens", type=int, default=256)
    g.add_argument("--repeats", type=int, default=3)
    g.add_argument("--precision", default="all", choices=("all", "fp32", "bf16"),
                   help="all: fp32, and bf16 where the device runs it fast")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return train(args) if args.command == "train" else generation(args)


if __name__ == "__main__":
    sys.exit(main())
