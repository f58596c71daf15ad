"""benchmarks/breakdown.py: each operator's time lands in its kind."""

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from benchmarks.breakdown import KINDS, OPTIMIZER_SCOPE, profiled


def test_profiled_sums_each_operators_own_time_by_kind():
    q = torch.randn(2, 4, 64, 16)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    big = torch.randn(1_000_000)

    def step() -> float:
        a @ b  # matmuls
        F.scaled_dot_product_attention(q, q, q, is_causal=True)  # attention
        big.exp()  # other
        with record_function(OPTIMIZER_SCOPE):
            big.mul(2.0)  # optimizer: anything under the scope that is not a matmul
            a @ b  # a matmul stays a matmul wherever it runs
        return 0.0

    times = profiled(step)
    assert set(times) == {*KINDS, "wall"}
    assert all(times[kind] > 0 for kind in KINDS)
    # the operators' own times, children excluded, add up to no more than the step's wall time
    assert sum(times[kind] for kind in KINDS) <= times["wall"] * 1.05

    def matmuls_only() -> float:
        a @ b
        return 0.0

    only = profiled(matmuls_only)
    assert only["matmuls"] > 0 and only["attention"] == only["optimizer"] == 0
