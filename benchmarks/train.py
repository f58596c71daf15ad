"""Training throughput: the project's trainer against a minimal nanoGPT-style loop, in one run.

    python -m benchmarks.train [--steps 12] [--no-compile]

Both sides train the same shape (the `cpu-small` preset: 4 layers, n_embd 256, context 256, GPT-2's
50,257-token vocabulary, dropout 0) on the same token shards (tinyshakespeare), batches of 8 x 256:
- reference: a plain GPT written here as nanoGPT writes it (SDPA attention, `lm_head` then
  `F.cross_entropy`), AdamW, random windows from a tensor, and nothing else;
- ours: `llm.train.Trainer` with `llm.model.GPT` (head and loss fused in chunks, llm/loss.py),
  memory-mapped `RandomWindows`, progress reporting, tracking and a checkpoint at the end.
Each side first tries its settings (fp32 or bf16 autocast, eager or `torch.compile`) and keeps its
fastest; then the two are timed in alternating rounds so that a busy spell of the machine lands on
both. Tokens/s excludes the warm-up (and compilation). MFU is measured against this machine's own
matmul rate in the training dtype. Last line: `train_vs_reference=R`, the median of the rounds'
ratios (goal: at least 1.2).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.tokenize import build_corpus
from llm.config import TokenizeConfig, TrainConfig
from llm.hardware import measured_matmul_flops, precision_name
from llm.model import GPT, model_config
from llm.shards import RandomWindows, TokenStream
from llm.tokenize import tokenize_corpus
from llm.tracking import MemoryTracker
from llm.train import Trainer

BATCH = 8


# --- the reference: nanoGPT's model and loop, minimal -----------------------------------------------

class RefBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.c_attn, self.c_proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, n_embd: int, n_head: int, n_layer: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(context_length, n_embd)
        self.h = nn.ModuleList(RefBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def reference_runner(tokens: torch.Tensor, dtype: torch.dtype, compile_: bool):
    cfg = model_config("cpu-small")
    torch.manual_seed(0)
    model = RefGPT(cfg.vocab_size, cfg.context_length, cfg.n_embd, cfg.n_head, cfg.n_layer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    step_model = torch.compile(model) if compile_ else model
    T = cfg.context_length

    def steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            ix = torch.randint(len(tokens) - T - 1, (BATCH,))
            x = torch.stack([tokens[i:i + T] for i in ix])
            y = torch.stack([tokens[i + 1:i + 1 + T] for i in ix])
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = step_model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return n * BATCH * T / (time.perf_counter() - start)

    return steps


# --- ours: the project's trainer ---------------------------------------------------------------------

def ours_runner(shards: Path, work: Path, dtype: torch.dtype, compile_: bool):
    precision = precision_name(dtype)
    model = GPT(model_config("cpu-small", dropout=0.0))
    T = model.config.context_length
    windows = RandomWindows(TokenStream.from_manifest(shards, "train"), T, BATCH, seed=0)
    val = [windows.next_batch()]
    trainer: Trainer | None = None

    def steps(n: int) -> float:
        # One Trainer (compiled once), its step budget raised by n for each round: every fit() resumes
        # its own last checkpoint, trains n steps and reports their tokens/s in one window, which covers
        # the optimizer steps only (not the evaluation and checkpoint that end each fit).
        nonlocal trainer
        if trainer is None:
            config = TrainConfig(device="cpu", precision=precision, compile=compile_, batch_size=BATCH,
                                 global_batch_size=BATCH, max_steps=n, warmup_steps=1, log_interval=10**9,
                                 eval_interval=10_000, eval_batches=1, sample_interval=0, checkpoint_interval=10_000)
            trainer = Trainer(model, windows, val, config, tempfile.mkdtemp(dir=work), settings={"bench": 1},
                              tracker=MemoryTracker())
        else:
            trainer.max_steps += n
        trainer.fit()  # reports once, at its last step: one window over the n steps
        return trainer.progress.history["tokens_per_s"][-1][1]

    return steps


def fastest(name: str, make, settings, probe_steps: int):
    """Try each (dtype, compile) setting; keep the fastest runner (after a warm-up that compiles)."""
    best = None
    for dtype, compile_ in settings:
        try:
            run = make(dtype, compile_)
            run(2)  # warm-up: compilation, allocator
            rate = run(probe_steps)
        except Exception as exc:  # a missing C++ compiler makes torch.compile fail on the CPU
            print(f"  {name} {dtype} compile={compile_}: failed ({type(exc).__name__}: {exc})")
            continue
        print(f"  {name} {str(dtype).removeprefix('torch.')} compile={compile_}: {rate:,.0f} tokens/s")
        if best is None or rate > best[0]:
            best = (rate, run, dtype, compile_)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile settings")
    args = parser.parse_args()
    # Both dtypes, eager and compiled: which is fastest depends on the CPU (bf16 wins only where the CPU
    # computes it natively) and on the side (compile fuses the reference's loss, as ours already is).
    settings = [(torch.float32, False), (torch.bfloat16, False)]
    if not args.no_compile:
        settings += [(torch.float32, True), (torch.bfloat16, True)]

    with tempfile.TemporaryDirectory() as tmp:
        raw = build_corpus(Path(tmp), 2)
        tokenize_corpus(raw, Path(tmp) / "shards", TokenizeConfig())
        stream = TokenStream.from_manifest(Path(tmp) / "shards", "train")
        tokens = torch.from_numpy(stream.window(0, len(stream)).astype("int64"))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu-small, batch {BATCH} x 256")
        print("choosing each side's fastest setting:")
        ref = fastest("reference", lambda d, c: reference_runner(tokens, d, c), settings, args.steps)
        ours = fastest("ours", lambda d, c: ours_runner(Path(tmp) / "shards", Path(tmp), d, c), settings, args.steps)
        rates: dict[str, list[float]] = {"reference": [], "ours": []}
        for _ in range(args.rounds):  # alternate, so a slow spell of the machine hits both
            rates["reference"].append(ref[1](args.steps))
            rates["ours"].append(ours[1](args.steps))

    flops_per_token = GPT(model_config("cpu-small", dropout=0.0)).flops_per_token()
    for name, (_, _, dtype, compile_) in (("reference", ref), ("ours", ours)):
        rate = statistics.median(rates[name])
        mfu = rate * flops_per_token / measured_matmul_flops(dtype)
        print(f"{name}: {rate:,.0f} tokens/s (rounds: {', '.join(f'{r:,.0f}' for r in rates[name])}), "
              f"{str(dtype).removeprefix('torch.')}, compile={compile_}, MFU {mfu:.1%} of the measured "
              f"{measured_matmul_flops(dtype) / 1e9:,.0f} GFLOP/s")
    # Each round's two runs are neighbours in time: their ratio cancels most of a busy spell of the machine.
    paired = [o / r for o, r in zip(rates["ours"], rates["reference"])]
    print(f"ours / reference per round: {', '.join(f'{p:.2f}' for p in paired)}")
    print(f"train_vs_reference={statistics.median(paired):.2f}")


if __name__ == "__main__":
    main()
