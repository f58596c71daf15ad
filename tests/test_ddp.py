"""Data-parallel training: 2 processes on CPU (gloo) against 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT
from tests.data import make_shards, patterned_tokens

SETTINGS = {"model": {"preset": "tiny", "vocab_size": 512, "context_length": 32},
            "pretrain": {"global_batch_size": 8, "max_steps": 6, "lr": 3e-3, "warmup_steps": 2, "log_interval": 1,
                         "eval_interval": 3, "eval_batches": 1, "sample_interval": 0, "checkpoint_interval": 3,
                         # by the clock, a checkpoint after every step: the ranks save when rank 0's clock says
                         "checkpoint_interval_s": 1e-6, "precision": "fp32", "device": "cpu"}}

WORKER = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from llm import distributed
    from llm.config import Params
    from llm.validation import from_mapping
    from llm.pretrain import run_pretrain
    from llm.tracking import MemoryTracker

    shards, out, settings = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    dist = distributed.from_env()
    tracker = MemoryTracker()
    result = run_pretrain(from_mapping(Params, settings), shards, out / "ckpt", tracker=tracker, dist=dist)
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in result.model.parameters()))
    (out / f"rank{dist.rank}.json").write_text(json.dumps({
        "losses": [v for _, v in result.progress.history["train_loss"]], "weights": digest.hexdigest(),
        "logged": len(tracker.metrics)}))
    distributed.shutdown()
""")


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    shards = make_shards(tmp_path / "shards", patterned_tokens(6000), patterned_tokens(800), vocab_size=512)
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "worker.py").write_text(WORKER)
    one = {**SETTINGS, "pretrain": {**SETTINGS["pretrain"], "batch_size": 8}}
    two = {**SETTINGS, "pretrain": {**SETTINGS["pretrain"], "batch_size": 4}}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name, settings, launcher in (
        ("one", one, []),
        ("two", two, ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]),
    ):
        out = tmp_path / name
        done = subprocess.run([sys.executable, *launcher, str(out / "worker.py"), str(shards), str(out),
                               json.dumps(settings)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    single = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the replicas never drift apart
    assert ranks[0]["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert ranks[0]["logged"] > 0 and ranks[1]["logged"] == 0  # only rank 0 reports
    assert (tmp_path / "two" / "ckpt" / "model.safetensors").is_file()
    kept = sorted(path.name for path in (tmp_path / "two" / "ckpt" / "resume").glob("step-*"))
    assert kept == ["step-000005", "step-000006"]  # saved after every step (by steps alone: 3 and 6)
