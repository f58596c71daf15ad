"""Where a training step's time goes, ours against a reference's, by kind of work, in one run.

    python -m benchmarks.breakdown [--against nanogpt | book] [--dtype auto | fp32 | bf16] [--no-compile]
                                   [--rounds 8]

benchmarks.train and benchmarks.book measure how much faster our training step is than their references';
this shows where the difference comes from, and how far it can go. A step is forward, backward, clipping
where the run clips, and the optimizer step, over one random batch:
- `--against nanogpt` (the default), benchmarks.train's comparison: `cpu-small`, batch 8 x 256, GPT-2's
  vocabulary, AdamW fused, clipping at 1.0. nanoGPT's `model.py` (vendored: benchmarks/nanogpt.py) with
  the AdamW of its `configure_optimizers`, and our `llm.model.GPT` with the trainer's `llm.optim` (AdamW,
  clipping), both in one setting: fp32, or bf16 autocast (`--dtype auto` takes bf16 where the CPU
  computes it natively, by the trainer's own rule), compiled unless `--no-compile`;
- `--against book`, benchmarks.book's: the book's chapter 5 model (benchmarks/book_ch05.py: its
  `GPTModel` at context 256, dropout 0.1) and step (`calc_loss_batch`, torch's AdamW at lr 4e-4 and weight
  decay 0.1, no clipping), fp32 and eager as the book runs, against our `gpt2-book` model with the
  recipe's settings (recipes/book-ch05.yaml: the same batch of 2 x 256, AdamW with its groups, no
  clipping, eager), in `--dtype` (`auto`, as the recipe trains).
Each step of each side runs under torch.profiler, the sides alternating, and each operator's own time
(its self time, children excluded) is summed by kind:
- matmuls: `aten::mm`, `addmm`, `bmm` and `baddbmm`: the same products on both sides, whatever the
  loss does around them;
- attention: SDPA's kernels (the book's explicit product, and ours where `attention: auto` takes it, in
  training in bf16 or with dropout, count as matmuls for their two products and as other for the
  softmax);
- optimizer: everything under the clipping and the optimizer step (the gradient norm, fused AdamW);
- other: everything else: Inductor's fused kernels (the loss and its gradient, LayerNorm, GELU), eager
  elementwise passes, copies and fills.
Inductor's kernels are profiled each under its own name (`torch._inductor.config.cpp.enable_kernel_profile`),
so that the largest "other" operators of each side can be printed by name. The profiler's own cost per
operator is small (a few microseconds), but not its memory: its event records come from the same heap,
where (with freed memory kept, as the trainer runs) they split the large free blocks that a step's big
buffers would reuse, so those buffers land on fresh pages and their first pass (a `fill_` of zeros, a
copy) pays the page faults: measured, zeroing a (50,257, 768) gradient took 10 ms bare and 50-400 ms
under the profiler. The sides are therefore also timed bare, alternating, before any step is profiled
(the split blocks outlast the profiler), and both walls printed: where a side's profiled step is much
slower than its bare one, its "other" (where fills and copies count) is overstated by about the
difference, and so is the ceiling.

It prints each kind in ms a step for both sides, and the ceiling: the reference's step over ours without
its "other" work, the ratio no fusion of our elementwise passes could pass while the matmuls, attention and
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
from torch import Tensor
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks import book_ch05
from benchmarks.book import RECIPE
from benchmarks.train import BATCH, BETAS, DTYPES, GRAD_CLIP, LR, STEP0_TOLERANCE, WEIGHT_DECAY, reference_model
from llm.config import load_params
from llm.hardware import autocast, keep_freed_memory, train_dtype
from llm.model import GPT, model_config
from llm.model_config import ModelConfig
from llm.optim import adamw, clip_gradients

KINDS = ("matmuls", "attention", "optimizer", "other")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
OPTIMIZER_SCOPE = "breakdown:optimizer"
WARMUP = 2  # untimed steps each: compilation, the optimizer's state, the allocator's heap
TOP_OTHERS, OP_NAME_CHARS = 4, 90
PROFILER_SLACK = 1.1  # a profiled step slower than its bare one by more than this is flagged

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


def training_step(forward: Callable[[], Tensor], optimizer: torch.optim.Optimizer,
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


def nanogpt_step(x: Tensor, y: Tensor, dtype: torch.dtype, compile_model: bool) -> Step:
    model, optimizer = reference_model(fused_adamw=True)  # what benchmarks.train keeps for it, fused being faster
    step_model = torch.compile(model) if compile_model else model

    def forward() -> Tensor:
        with autocast(x.device, dtype):  # nanoGPT's `ctx`: torch.autocast, or nothing in fp32
            return step_model(x, y)[1]

    return training_step(forward, optimizer, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP))


def book_step(x: Tensor, y: Tensor) -> Step:
    model, optimizer = book_ch05.seeded_model_and_optimizer(book_ch05.SEED, x.device)
    return training_step(lambda: book_ch05.calc_loss_batch(x, y, model, x.device), optimizer, lambda: None)


def ours_step(model: GPT, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, dtype: torch.dtype,
              compile_model: bool, grad_clip: float) -> Step:
    step_model = torch.compile(model) if compile_model else model

    def forward() -> Tensor:
        with autocast(x.device, dtype):  # as the Trainer runs it
            return step_model(x, y)

    clip = (lambda: clip_gradients(model, grad_clip)) if grad_clip > 0 else (lambda: None)
    return training_step(forward, optimizer, clip)


def sides(against: str, dtype: torch.dtype, compile_model: bool) -> dict[str, tuple[str, Step]]:
    """The two sides' steps, each with its setting in words."""
    def batch(config: ModelConfig, rows: int) -> tuple[Tensor, Tensor]:
        return tuple(torch.randint(config.vocab_size, (rows, config.context_length)) for _ in range(2))

    torch.manual_seed(1337)
    dtype_name = str(dtype).removeprefix("torch.")
    setting = f"{dtype_name} {'compiled' if compile_model else 'eager'}"
    if against == "nanogpt":
        config = model_config("cpu-small", dropout=0.0)
        x, y = batch(config, BATCH)
        ours = GPT(config)
        optimizer = adamw(ours, LR, WEIGHT_DECAY, BETAS, "cpu")
        return {"nanoGPT": (f"{setting}, fused AdamW, clipping at {GRAD_CLIP}",
                            nanogpt_step(x, y, dtype, compile_model)),
                "ours": (f"{setting}, clipping at {GRAD_CLIP}",
                         ours_step(ours, optimizer, x, y, dtype, compile_model, GRAD_CLIP))}
    recipe = load_params(RECIPE)
    config, train = recipe.model.build(), recipe.pretrain
    x, y = batch(config, train.batch_size)
    ours = GPT(config)
    optimizer = adamw(ours, train.lr, train.weight_decay, (train.beta1, train.beta2), "cpu")
    return {"the book": ("float32 eager, torch's AdamW, no clipping", book_step(x, y)),
            "ours": (f"{dtype_name} eager (the recipe's), no clipping",
                     ours_step(ours, optimizer, x, y, dtype, compile_model=False, grad_clip=train.grad_clip))}


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
    parser.add_argument("--against", choices=["nanogpt", "book"], default="nanogpt",
                        help="the reference: nanoGPT (benchmarks.train's) or the book's chapter 5 run "
                        "(benchmarks.book's)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto: bf16 where the CPU computes it natively, else fp32 (the book's side: always "
                        "fp32)")
    parser.add_argument("--no-compile", action="store_true",
                        help="against nanoGPT, both sides eager (against the book, both always are)")
    parser.add_argument("--rounds", type=int, default=8, help="profiled steps per side, the sides alternating")
    args = parser.parse_args()
    dtype = train_dtype(torch.device("cpu"), "auto") if args.dtype == "auto" else DTYPES[args.dtype]
    inductor_config.cpp.enable_kernel_profile = True  # before anything compiles: one name a kernel
    keep_freed_memory()  # as our trainer sets it, for both sides (benchmarks.train does the same)
    steps = sides(args.against, dtype, compile_model=not args.no_compile)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          + "; ".join(f"{name}: {setting}" for name, (setting, _) in steps.items()))
    uniform_loss = math.log(model_config("cpu-small").vocab_size)
    for name, (_, step) in steps.items():
        step0 = step()
        assert abs(step0 - uniform_loss) <= STEP0_TOLERANCE, f"{name}: step-0 loss {step0:.3f}"
        for _ in range(WARMUP - 1):
            step()
    samples: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in steps}
    others: dict[str, dict[str, float]] = {name: {} for name in steps}
    # The bare rounds first: the profiled ones leave the heap split by the profiler's records.
    for round_ in range(args.rounds):
        for name in steps if round_ % 2 == 0 else reversed(steps):
            start = time.perf_counter()
            steps[name][1]()
            samples[name]["bare"].append((time.perf_counter() - start) * 1e3)
    for round_ in range(args.rounds):
        for name in steps if round_ % 2 == 0 else reversed(steps):
            for key, value in profiled(steps[name][1], others[name]).items():
                samples[name][key].append(value)
    medians = {name: {key: statistics.median(values) for key, values in by_key.items()}
               for name, by_key in samples.items()}

    reference = next(iter(steps))
    print(f"ms a step, the median of {args.rounds} profiled steps each (operators' own time, by kind):")
    print(f"  {'':10s} {reference:>9s} {'ours':>9s}")
    for key in (*KINDS, "wall", "bare"):
        label = {"wall": "step (wall)", "bare": "step (bare)"}.get(key, key)
        print(f"  {label:11s}{medians[reference][key]:9.1f} {medians['ours'][key]:9.1f}")
    for name, by_name in others.items():
        largest = sorted(by_name.items(), key=lambda item: -item[1])[:TOP_OTHERS]
        print(f"largest other operators, {name}, ms a step (the mean): " + "; ".join(
            f"{op[:OP_NAME_CHARS]} {total / args.rounds:.1f}" for op, total in largest))
    for name, by_key in medians.items():
        if by_key["wall"] > PROFILER_SLACK * by_key["bare"]:
            print(f"{name}: the profiled step took {by_key['wall']:.0f} ms against {by_key['bare']:.0f} bare: its "
                  f"'other' is overstated by about {by_key['wall'] - by_key['bare']:.0f} ms (see the docstring)")
    print(f"step ratio bare: {medians[reference]['bare'] / medians['ours']['bare']:.2f}")
    ref, ours = medians[reference]["wall"], medians["ours"]["wall"]
    without_other = ours - medians["ours"]["other"]
    print(f"step ratio under the profiler: {ref / ours:.2f}; with every 'other' pass of ours free, at most "
          f"{ref / without_other:.2f} ({ref:.0f} ms over {without_other:.0f})")
    print(f"breakdown_ceiling={ref / without_other:.2f}")


if __name__ == "__main__":
    main()
