"""Where a training step's time goes, ours against nanoGPT's, by kind of work, in one run.

    python -m benchmarks.breakdown [--dtype auto | fp32 | bf16] [--no-compile] [--rounds 8]

benchmarks.train measures how much faster our training step is than nanoGPT's; this shows where the
difference comes from, and how far it can go. Both sides take the shape and settings of benchmarks.train
(`cpu-small`, batch 8 x 256, GPT-2's vocabulary; AdamW fused, clipping at 1.0), in the same setting:
fp32, or bf16 autocast (`--dtype auto` takes bf16 where the CPU computes it natively, by the trainer's own
rule), compiled unless `--no-compile`. A step is forward, backward, clipping, optimizer step, over one
random batch: nanoGPT's `model.py` (vendored: benchmarks/nanogpt.py) with the AdamW of its
`configure_optimizers`, and our `llm.model.GPT` with the trainer's `llm.optim` (AdamW, clipping). Each step
of each side runs under torch.profiler, the sides alternating, and each operator's own time (its self
time, children excluded) is summed by kind:
- matmuls: `aten::mm`, `addmm`, `bmm` and `baddbmm`: the same products on both sides, whatever the
  loss does around them;
- attention: SDPA's kernels (in bf16 training our `attention: auto` takes the explicit product instead,
  whose two products count as matmuls and its softmax as other);
- optimizer: everything under the clipping and the optimizer step (the gradient norm, fused AdamW);
- other: everything else: Inductor's fused kernels (the loss and its gradient, LayerNorm, GELU), eager
  elementwise passes, copies and fills.
Inductor's kernels are profiled each under its own name (`torch._inductor.config.cpp.enable_kernel_profile`),
so that the largest "other" operators of each side can be printed by name. The profiler's own cost per
operator is small (a few microseconds) and lands on both sides alike.

It prints each kind in ms a step for both sides, and the ceiling: nanoGPT's step over ours without its
"other" work, the ratio no fusion of our elementwise passes could pass while the matmuls, attention and
optimizer stay as they are. Last line: `breakdown_ceiling=R`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
import torch._inductor.config as inductor_config
from torch import Tensor, nn
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.train import BATCH, BETAS, DTYPES, GRAD_CLIP, LR, STEP0_TOLERANCE, WEIGHT_DECAY, reference_model
from llm.hardware import autocast, keep_freed_memory, train_dtype
from llm.model import GPT, model_config
from llm.optim import adamw, clip_gradients

KINDS = ("matmuls", "attention", "optimizer", "other")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
OPTIMIZER_SCOPE = "breakdown:optimizer"
WARMUP = 2  # untimed steps each: compilation, the optimizer's state, the allocator's heap
TOP_OTHERS, OP_NAME_CHARS = 4, 90

Step = Callable[[], float]  # one training step; returns its loss


def kind(event: FunctionEvent) -> str:
    if event.name in MATMULS:
        return "matmuls"
    if "scaled_dot_product" in event.name:
        return "attention"
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == OPTIMIZER_SCOPE:
            return "optimizer"
        parent = parent.cpu_parent
    return "other"


def training_step(forward: Callable[[], Tensor], model: nn.Module, optimizer: torch.optim.Optimizer,
                  clip: Callable[[], object]) -> Step:
    def step() -> float:
        loss = forward()
        loss.backward()
        with record_function(OPTIMIZER_SCOPE):
            clip()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def reference_step(x: Tensor, y: Tensor, dtype: torch.dtype, compile_model: bool) -> Step:
    model, optimizer = reference_model(fused_adamw=True)  # what benchmarks.train keeps for it, fused being faster
    step_model = torch.compile(model) if compile_model else model

    def forward() -> Tensor:
        with autocast(x.device, dtype):  # nanoGPT's `ctx`: torch.autocast, or nothing in fp32
            return step_model(x, y)[1]

    return training_step(forward, model, optimizer,
                         lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP))


def ours_step(x: Tensor, y: Tensor, dtype: torch.dtype, compile_model: bool) -> Step:
    model = GPT(model_config("cpu-small", dropout=0.0))
    optimizer = adamw(model, LR, WEIGHT_DECAY, BETAS, "cpu")
    step_model = torch.compile(model) if compile_model else model

    def forward() -> Tensor:
        with autocast(x.device, dtype):  # as the Trainer runs it
            return step_model(x, y)

    return training_step(forward, model, optimizer, lambda: clip_gradients(model, GRAD_CLIP))


def profiled(step: Step, others: dict[str, float] | None = None) -> dict[str, float]:
    """One step under the profiler: the self time of its operators in ms, summed by kind, and its wall time.
    Each "other" operator's own time is also added by name into `others`, where given."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        wall_ms = (time.perf_counter() - start) * 1e3
    times = dict.fromkeys(KINDS, 0.0)
    for event in prof.events():
        if event.name != OPTIMIZER_SCOPE:
            event_kind, ms = kind(event), event.self_cpu_time_total / 1e3
            times[event_kind] += ms
            if event_kind == "other" and others is not None:
                others[event.name] = others.get(event.name, 0.0) + ms
    return {**times, "wall": wall_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto: bf16 where the CPU computes it natively, else fp32")
    parser.add_argument("--no-compile", action="store_true", help="both sides eager")
    parser.add_argument("--rounds", type=int, default=8, help="profiled steps per side, the sides alternating")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    dtype = train_dtype(cpu, "auto") if args.dtype == "auto" else DTYPES[args.dtype]
    compile_model = not args.no_compile
    inductor_config.cpp.enable_kernel_profile = True  # before anything compiles: one name a kernel
    keep_freed_memory()  # as our trainer sets it, for both sides (benchmarks.train does the same)
    vocab = model_config("cpu-small").vocab_size
    torch.manual_seed(1337)
    x, y = (torch.randint(vocab, (BATCH, model_config("cpu-small").context_length)) for _ in range(2))
    setting = f"{str(dtype).removeprefix('torch.')} {'compiled' if compile_model else 'eager'}"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; cpu-small, batch {BATCH} x {x.shape[1]}, "
          f"both sides {setting}, fused AdamW, clipping at {GRAD_CLIP}")

    sides = {"nanoGPT": reference_step(x, y, dtype, compile_model), "ours": ours_step(x, y, dtype, compile_model)}
    for name, step in sides.items():
        step0 = step()
        assert abs(step0 - math.log(vocab)) <= STEP0_TOLERANCE, f"{name}: step-0 loss {step0:.3f}"
        for _ in range(WARMUP - 1):
            step()
    samples: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in sides}
    others: dict[str, dict[str, float]] = {name: {} for name in sides}
    for round_ in range(args.rounds):
        for name in sides if round_ % 2 == 0 else reversed(sides):
            for key, value in profiled(sides[name], others[name]).items():
                samples[name][key].append(value)
    medians = {name: {key: statistics.median(values) for key, values in by_key.items()}
               for name, by_key in samples.items()}

    print(f"ms a step, the median of {args.rounds} profiled steps each (operators' own time, by kind):")
    print(f"  {'':10s} {'nanoGPT':>9s} {'ours':>9s}")
    for key in (*KINDS, "wall"):
        label = "step (wall)" if key == "wall" else key
        print(f"  {label:11s}{medians['nanoGPT'][key]:9.1f} {medians['ours'][key]:9.1f}")
    for name, by_name in others.items():
        largest = sorted(by_name.items(), key=lambda item: -item[1])[:TOP_OTHERS]
        print(f"largest other operators, {name}, ms a step (the mean): " + "; ".join(
            f"{op[:OP_NAME_CHARS]} {total / args.rounds:.1f}" for op, total in largest))
    ref, ours = medians["nanoGPT"]["wall"], medians["ours"]["wall"]
    without_other = ours - medians["ours"]["other"]
    print(f"step ratio under the profiler: {ref / ours:.2f}; with every 'other' pass of ours free, at most "
          f"{ref / without_other:.2f} ({ref:.0f} ms over {without_other:.0f})")
    print(f"breakdown_ceiling={ref / without_other:.2f}")


if __name__ == "__main__":
    main()
