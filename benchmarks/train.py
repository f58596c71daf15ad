"""Training throughput: the project's trainer against nanoGPT as written, in one run.

    python -m benchmarks.train [--steps 2] [--rounds 5] [--probe-steps 2] [--no-compile]
                               [--dtype auto | fp32 | bf16 | both]

Both sides train the same shape (the `cpu-small` preset: 4 layers, 4 heads, n_embd 256, context 256,
GPT-2's 50,257-token vocabulary, biases, head tied to the token embedding, dropout 0) on the same
tokens (tinyshakespeare repeated to 2 MB, tokenized into shards by the tokenize stage), batches of
8 x 256, with the same AdamW (lr 1e-3 warmed up over 2 steps then cosine to 1e-4 over the run, betas
0.9/0.95, weight decay 0.1 on matrices only, gradient norm clipped at 1.0):
- reference: nanoGPT's `model.py`, vendored unchanged in what it computes (benchmarks/nanogpt.py: its
  init, N(0, 0.02) with the residual projections at 0.02/sqrt(2 * n_layer), SDPA attention, `lm_head`
  over every position then `F.cross_entropy`, and its `configure_optimizers`), trained by the loop of
  nanoGPT's `train.py`: random windows from one token tensor (`torch.randint` offsets, `torch.stack`
  of the x and y slices, the next batch fetched right after the forward), the autocast context, one
  micro-batch a step, `loss.backward()`, clipping, `optimizer.step()`, `zero_grad(set_to_none=True)`,
  `get_lr`'s warmup + cosine set on the param groups each step, `loss.item()` every step (its
  log_interval is 1);
- ours: `llm.train.Trainer` with `llm.model.GPT` (head and loss fused in chunks, llm/loss.py),
  memory-mapped `RandomWindows`, progress reporting, tracking and a checkpoint after each round.
Each side first tries its settings, fp32 or bf16 autocast, eager or `torch.compile` (which needs a C++
compiler: a setting that fails is skipped, with the reason), each on a fresh model: one untimed warm-up
step each (compilation), then one step of each in turn, `--probe-steps` times over; it keeps the
setting whose best step was fastest. `--dtype auto` (the default) offers bf16 only where the CPU
computes it natively, by the trainer's own rule (llm/hardware.py's `bf16_is_fast`): elsewhere bf16 is
emulated in software, many times slower than fp32, and probing it would keep the run going for half an
hour to learn that. `--dtype fp32` measures on any host what a host without native bf16 runs; `--dtype
both` offers bf16 even where it is emulated. nanoGPT fuses AdamW only on CUDA and, on a CPU, autocasts
nothing (its `ctx` is a nullcontext there); both are offered to it anyway, each side at its fastest: bf16 as
one of its settings, and the fused CPU AdamW kernel (which ours uses) tried against its fastest
setting, in turn with it, and kept if faster. Then the two winners are timed in alternating (paired)
rounds, the order swapped each round, so that a busy spell of the machine lands on both. Tokens/s
covers the optimizer steps only: not the warm-up (nor compilation), nor, for ours, the evaluation and
checkpoint that end each of its rounds. MFU is measured against this machine's own matmul rate in the
training dtype. Both sides run with glibc's heap keeping freed memory (llm/hardware.py's
`keep_freed_memory`, which our trainer sets for its whole process anyway). A run takes about 5 minutes
on 2 busy cores once torch.compile's cache is warm (the first run on a machine compiles from scratch:
minutes more).

Sanity checks, printed and asserted (a benchmark that measures a broken model is worthless): every
tried setting's step-0 loss is within 0.3 of ln(50257) = 10.82, and each winner's mean loss over the
last round is at least 1.0 below its step-0 loss. Last line: `train_vs_nanogpt=R`, the median of the
rounds' ratios of tokens/s (goal: at least 1.2).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import nanogpt
from benchmarks.tokenize import build_corpus
from llm.config import TokenizeConfig, TrainConfig
from llm.hardware import bf16_is_fast, keep_freed_memory, measured_matmul_flops
from llm.model import GPT, model_config
from llm.shards import RandomWindows, TokenStream
from llm.tokenize import tokenize_corpus
from llm.tracking import MemoryTracker
from llm.train import Trainer

BATCH = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LR, MIN_LR, WARMUP_LR_STEPS = 1e-3, 1e-4, 2  # ours: TrainConfig's lr and min_lr; both sides warm up 2 steps
WEIGHT_DECAY, BETAS, GRAD_CLIP = 0.1, (0.9, 0.95), 1.0
WARMUP = 1  # untimed steps of each setting first (compilation, the optimizer's state); its loss is step 0's
STEP0_TOLERANCE = 0.3  # around ln(vocab): an initialised model predicts nearly uniformly
MIN_LOSS_DROP = 1.0  # the last round's mean loss under step 0's by at least this

# A runner trains its own model n more steps and returns (tokens/s over those steps, their mean loss).
Runner = Callable[[int], tuple[float, float]]


@dataclass(frozen=True)
class Setting:
    dtype: torch.dtype
    compile: bool
    fused_adamw: bool = False  # the reference only: nanoGPT fuses on CUDA alone; ours always fuses

    def __str__(self) -> str:
        text = f"{str(self.dtype).removeprefix('torch.')} {'compiled' if self.compile else 'eager'}"
        return text + (" fused-AdamW" if self.fused_adamw else "")


# --- the reference: nanoGPT's model.py (vendored) and train.py's loop --------------------------------

def reference_model(fused_adamw: bool) -> tuple[nanogpt.GPT, torch.optim.AdamW]:
    """nanoGPT's model at our shape, and the AdamW its `configure_optimizers` makes for it."""
    cfg = model_config("cpu-small", dropout=0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # its prints (parameter counts, fused or not), per setting
        model = nanogpt.GPT(nanogpt.GPTConfig(block_size=cfg.context_length, vocab_size=cfg.vocab_size,
                                              n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                              dropout=0.0, bias=True))
        # configure_optimizers reads device_type for one thing only, whether to fuse: asking for 'cuda'
        # here is how the fused kernel (on the CPU, where these parameters are) is offered to it.
        optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, "cuda" if fused_adamw else "cpu")
    assert all(group.get("fused") == (fused_adamw or None) for group in optimizer.param_groups)
    return model, optimizer


def reference_runner(tokens: torch.Tensor, setting: Setting, total_steps: int) -> Runner:
    block_size = model_config("cpu-small").context_length
    torch.manual_seed(1337)  # train.py's seed
    model, optimizer = reference_model(setting.fused_adamw)
    step_model = torch.compile(model) if setting.compile else model
    ctx = (contextlib.nullcontext() if setting.dtype == torch.float32
           else torch.autocast(device_type="cpu", dtype=setting.dtype))

    def get_batch():
        ix = torch.randint(len(tokens) - block_size, (BATCH,))
        x = torch.stack([tokens[i:i + block_size] for i in ix])
        y = torch.stack([tokens[i + 1:i + 1 + block_size] for i in ix])
        return x, y

    def get_lr(it: int) -> float:  # train.py's, with warmup_iters, lr_decay_iters and min_lr set as ours
        if it < WARMUP_LR_STEPS:
            return LR * (it + 1) / (WARMUP_LR_STEPS + 1)
        if it > total_steps:
            return MIN_LR
        decay_ratio = (it - WARMUP_LR_STEPS) / (total_steps - WARMUP_LR_STEPS)
        assert 0 <= decay_ratio <= 1
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
        return MIN_LR + coeff * (LR - MIN_LR)

    iter_num = 0
    X, Y = get_batch()

    def steps(n: int) -> tuple[float, float]:
        nonlocal iter_num, X, Y
        losses = []
        start = time.perf_counter()
        for _ in range(n):
            lr = get_lr(iter_num)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            with ctx:
                _logits, loss = step_model(X, Y)
            X, Y = get_batch()  # as train.py: the next batch while (on a GPU) the forward runs
            loss.backward()
            torch.nn.utils.clip_grad_norm_(step_model.parameters(), GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            iter_num += 1
        return n * BATCH * block_size / (time.perf_counter() - start), sum(losses) / n

    return steps


def reference_params() -> int:
    return reference_model(fused_adamw=False)[0].get_num_params(non_embedding=False)


# --- ours: the project's trainer ---------------------------------------------------------------------

def ours_runner(shards: Path, work: Path, setting: Setting, total_steps: int) -> Runner:
    torch.manual_seed(1337)
    model = GPT(model_config("cpu-small", dropout=0.0))
    T = model.config.context_length
    windows = RandomWindows(TokenStream.from_manifest(shards, "train"), T, BATCH, seed=0)
    val = [windows.next_batch()]
    config = TrainConfig(device="cpu", precision="bf16" if setting.dtype == torch.bfloat16 else "fp32",
                         compile=setting.compile, batch_size=BATCH, global_batch_size=BATCH,
                         max_steps=total_steps, lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP_LR_STEPS,
                         weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1], grad_clip=GRAD_CLIP,
                         log_interval=10**9, eval_interval=10**9, eval_batches=1, sample_interval=0,
                         checkpoint_interval=10**9)
    # One Trainer (compiled once) whose schedule spans the whole benchmark (total_steps); its step budget
    # is raised by n for each call: every fit() resumes its own last checkpoint, trains n steps and reports
    # their tokens/s and mean loss in one window, which covers the optimizer steps only (not the evaluation
    # and checkpoint that end each fit).
    trainer = Trainer(model, windows, val, config, tempfile.mkdtemp(dir=work), settings={"bench": 1},
                      tracker=MemoryTracker())
    done = 0

    def steps(n: int) -> tuple[float, float]:
        nonlocal done
        trainer.max_steps = done + n
        trainer.fit()  # reports once, at its last step: one window over the n steps
        done += n
        history = trainer.progress.history
        assert history["train_loss"][-1][0] == done
        return history["tokens_per_s"][-1][1], history["train_loss"][-1][1]

    return steps


# --- the comparison ----------------------------------------------------------------------------------

@dataclass
class Trial:
    setting: Setting
    run: Runner
    step0_loss: float
    rates: list[float] = field(default_factory=list)  # one a probe step

    @property
    def rate(self) -> float:
        return max(self.rates)  # its best step: a busy moment of the machine only lowers the others


def warm_up(name: str, make: Callable[[Setting], Runner], settings: list[Setting], limit: float) -> list[Trial]:
    """A fresh model for each setting, one untimed step each (compilation, the optimizer's state): its
    loss is the untrained model's, checked against ln(vocab). A setting that fails is skipped."""
    trials = []
    for setting in settings:
        try:
            run = make(setting)
            _, step0 = run(WARMUP)
        except Exception as exc:  # noqa: BLE001 (a missing C++ compiler makes torch.compile fail on the CPU)
            print(f"  {name} {setting}: failed, skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            continue
        assert abs(step0 - limit) <= STEP0_TOLERANCE, (
            f"{name} {setting}: step-0 loss {step0:.3f} is not within {STEP0_TOLERANCE} of ln(vocab) = {limit:.3f}")
        trials.append(Trial(setting, run, step0))
    if not trials:
        raise SystemExit(f"{name}: every setting failed")
    return trials


def fastest(name: str, trials: list[Trial], probe_steps: int) -> Trial:
    """Time one step of each trial in turn, probe_steps times over (so that a busy spell of the machine
    is spread over all of them), and keep the trial whose best step was fastest."""
    for trial in trials:
        trial.rates = []
    for _ in range(probe_steps):
        for trial in trials:
            trial.rates.append(trial.run(1)[0])
    for trial in trials:
        steps = ", ".join(f"{r:,.0f}" for r in trial.rates)
        print(f"  {name} {trial.setting}: {trial.rate:,.0f} tokens/s (best of {steps}), "
              f"step-0 loss {trial.step0_loss:.3f}")
    return max(trials, key=lambda t: t.rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per side per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--probe-steps", type=int, default=2, help="timed steps of each setting when choosing")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile settings")
    parser.add_argument("--dtype", choices=["auto", *DTYPES, "both"], default="auto",
                        help="the dtypes offered to both sides: auto (fp32, and bf16 where the CPU computes "
                        "it natively), fp32 (as a host without native bf16 trains), bf16, or both")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.dtype == "auto":
        dtypes = [torch.float32, torch.bfloat16] if bf16_is_fast(torch.device("cpu")) else [torch.float32]
    else:
        dtypes = list(DTYPES.values()) if args.dtype == "both" else [DTYPES[args.dtype]]
    compiles = [False] if args.no_compile else [False, True]
    settings = [Setting(dtype, compiled) for compiled in compiles for dtype in dtypes]
    # Every runner follows one schedule: warm-up, probe, then the rounds (a trial's runner stops early).
    total_steps = WARMUP + args.probe_steps + args.rounds * args.steps
    cfg = model_config("cpu-small", dropout=0.0)
    uniform_loss = math.log(cfg.vocab_size)
    ours_params = GPT(cfg).num_params(non_embedding=False)
    assert reference_params() == ours_params, (reference_params(), ours_params)
    # Our trainer keeps freed memory for the whole process (llm/hardware.py), which would speed up the
    # reference's later rounds too, and not its earlier ones: set it before either side runs.
    print(f"allocator: freed memory kept in the heap for both sides: {keep_freed_memory()}")

    with tempfile.TemporaryDirectory() as tmp:
        raw = build_corpus(Path(tmp), 2)
        tokenize_corpus(raw, Path(tmp) / "shards", TokenizeConfig())
        stream = TokenStream.from_manifest(Path(tmp) / "shards", "train")
        tokens = torch.from_numpy(stream.window(0, len(stream)).astype("int64"))

        def make_ref(setting: Setting) -> Runner:
            return reference_runner(tokens, setting, total_steps)

        def make_ours(setting: Setting) -> Runner:
            return ours_runner(Path(tmp) / "shards", Path(tmp), setting, total_steps)

        caps = torch.cpu.get_capabilities()
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {caps.get('cpu_name', 'CPU')}, "
              f"AVX512-BF16 {'yes' if caps.get('avx512_bf16') else 'no'}, AMX-BF16 "
              f"{'yes' if caps.get('amx_bf16') else 'no'}; cpu-small ({ours_params:,} parameters on both sides), "
              f"batch {BATCH} x {cfg.context_length}, {len(tokens):,} training tokens; dtypes offered "
              f"({args.dtype}): {', '.join(str(d).removeprefix('torch.') for d in dtypes)}")
        print(f"choosing each side's fastest setting ({WARMUP} warm-up step each, then {args.probe_steps} "
              f"timed in turn):")
        ref = fastest("nanoGPT", warm_up("nanoGPT", make_ref, settings, uniform_loss), args.probe_steps)
        if "fused" in inspect.signature(torch.optim.AdamW).parameters:  # the fused CPU kernel, on its fastest
            fused = Setting(ref.setting.dtype, ref.setting.compile, fused_adamw=True)
            ref = fastest("nanoGPT", [ref, *warm_up("nanoGPT", make_ref, [fused], uniform_loss)], args.probe_steps)
        print(f"  nanoGPT keeps {ref.setting}")
        ours = fastest("ours", warm_up("ours", make_ours, settings, uniform_loss), args.probe_steps)
        print(f"  ours keeps {ours.setting}")
        rates: dict[str, list[float]] = {"nanoGPT": [], "ours": []}
        losses: dict[str, list[float]] = {"nanoGPT": [], "ours": []}
        print(f"timed rounds ({args.steps} steps a side, alternating which goes first; settings chosen in "
              f"{time.perf_counter() - started:.0f} s):")
        for i in range(args.rounds):
            order = [("nanoGPT", ref), ("ours", ours)]
            for name, side in order if i % 2 == 0 else order[::-1]:
                rate, loss = side.run(args.steps)
                rates[name].append(rate)
                losses[name].append(loss)
            ratio = rates["ours"][-1] / rates["nanoGPT"][-1]
            print(f"  round {i + 1}: nanoGPT {rates['nanoGPT'][-1]:,.0f} tokens/s (mean loss "
                  f"{losses['nanoGPT'][-1]:.3f}), ours {rates['ours'][-1]:,.0f} (mean loss {losses['ours'][-1]:.3f}), "
                  f"ours/nanoGPT {ratio:.2f}")

    flops_per_token = GPT(cfg).flops_per_token()
    for name, side in (("nanoGPT", ref), ("ours", ours)):
        rate = statistics.median(rates[name])
        peak = measured_matmul_flops(side.setting.dtype)
        print(f"{name}: {rate:,.0f} tokens/s median ({side.setting}), MFU {rate * flops_per_token / peak:.1%} of "
              f"the measured {peak / 1e9:,.0f} GFLOP/s; step-0 loss {side.step0_loss:.3f}, last round's "
              f"{losses[name][-1]:.3f}")
        assert losses[name][-1] < side.step0_loss - MIN_LOSS_DROP, (
            f"{name}: the loss did not fall (step 0 {side.step0_loss:.3f}, last round {losses[name][-1]:.3f})")
    # Each round's two runs are neighbours in time: their ratio cancels most of a busy spell of the machine.
    paired = [o / r for o, r in zip(rates["ours"], rates["nanoGPT"])]
    print(f"ours / nanoGPT per round: {', '.join(f'{p:.2f}' for p in paired)}; "
          f"benchmark took {time.perf_counter() - started:.0f} s")
    print(f"train_vs_nanogpt={statistics.median(paired):.2f}")


if __name__ == "__main__":
    main()
