"""scripts/gpu-check and benchmarks/gpu.py: what can be checked without a GPU (the checks themselves need one).

The benchmark's two checks run on a CPU with tiny settings and end with their key=value figures, also where
the packages a GPU image lacks cannot be imported; the script refuses a machine without a CUDA GPU, with a
message, in its log too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu
from tests.conftest import ROOT

TINY_TRAIN = ["train", "--preset", "tiny", "--steps", "4", "--device", "cpu", "--no-compile", "--precision", "fp32",
              "--batch-size", "2", "--global-batch-size", "4", "--warmup-steps", "1", "--lr", "3e-3",
              "--eval-batches", "1", "--log-interval", "2"]


def figures(output: str) -> dict[str, str]:
    """The key=value lines that end the output; every line after the first of them is one."""
    lines = output.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if "=" in line and " " not in line)
    assert all("=" in line and " " not in line for line in lines[first:]), lines[first:]
    return dict(line.split("=", 1) for line in lines[first:])


def test_the_train_check_runs_the_pretrain_stage_on_a_cpu_and_ends_with_its_figures(capsys):
    assert gpu.main(TINY_TRAIN) == 0
    found = figures(capsys.readouterr().out)
    assert found["device"] == "cpu" and found["world_size"] == "1" and found["precision_used"] == "fp32"
    assert found["steps"] == "4" and found["global_batch_tokens"] == str(4 * 64)
    assert float(found["tokens_per_s"]) > 0 and 0 < float(found["mfu"]) < 1 and float(found["step_ms"]) > 0
    assert float(found["val_loss_end"]) < float(found["val_loss_start"]) and found["loss_fell"] == "yes"
    assert float(found["first_window_extra_s"]) >= 0  # two report windows: the first is left out of tokens/s


def test_the_generate_check_times_1_and_8_prompts_with_and_without_the_cache(capsys):
    assert gpu.main(["generate", "--preset", "tiny", "--device", "cpu", "--new-tokens", "8", "--repeats", "1",
                     "--precision", "fp32"]) == 0
    found = figures(capsys.readouterr().out)
    for batch in (1, 8):
        assert float(found[f"fp32_b{batch}_tokens_per_s"]) > 0
        assert float(found[f"fp32_b{batch}_kvcache_speedup"]) > 0
        assert found[f"fp32_b{batch}_same_tokens_as_uncached"] == "yes"
    assert found["new_tokens"] == "8" and not any(key.startswith("bf16") for key in found)


def test_the_train_check_is_the_124m_recipe_read_with_or_without_ruamel(monkeypatch):
    pytest.importorskip("yaml")
    args = gpu.parse_args(["train", "--steps", "300", "--global-batch-size", "128"])
    with_ruamel = gpu.train_params(args, gpu.read_recipe())

    def no_ruamel(path):
        raise ImportError("No module named 'ruamel'")

    monkeypatch.setattr(gpu, "read_yaml", no_ruamel)  # a GPU image's python3 has PyYAML, not ruamel.yaml
    assert gpu.train_params(args, gpu.read_recipe()) == with_ruamel
    model, pretrain = with_ruamel.model.build(), with_ruamel.pretrain
    assert with_ruamel.model.preset == "gpt2" and model.context_length == 1024 and model.n_layer == 12
    assert (pretrain.batch_size, pretrain.global_batch_size, pretrain.max_steps) == (32, 128, 300)
    assert pretrain.compile and pretrain.precision == "auto" and pretrain.lr == 6e-4 and pretrain.min_lr == 6e-5
    assert pretrain.init_from == "scratch" and pretrain.sample_interval == 0


# Of the project's requirements, what the GPU machines' image lacks (its package list: torch, numpy, pyarrow,
# safetensors, tiktoken, tqdm, PyYAML, pytest, but none of these), which `GPU_CHECK_PYTHON=python3
# scripts/gpu-check` runs on; an import of one of them on the check's path would fail there first.
NOT_ON_A_GPU_IMAGE = ("prefect", "mlflow", "dvc", "gguf", "ruamel")
WITHOUT = """
import importlib.abc, runpy, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {absent!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Absent())
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_without_them(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT.format(absent=NOT_ON_A_GPU_IMAGE), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_checks_run_without_the_packages_a_gpu_image_lacks():
    absent = run_without_them("mlflow")
    assert absent.returncode != 0 and "No module named 'mlflow'" in absent.stderr  # the stand-in works

    train = run_without_them("benchmarks.gpu", *TINY_TRAIN)
    assert train.returncode == 0, train.stderr[-3000:]
    assert figures(train.stdout)["loss_fell"] == "yes"
    generate = run_without_them("benchmarks.gpu", "generate", "--preset", "tiny", "--device", "cpu",
                                "--new-tokens", "4", "--repeats", "1", "--precision", "fp32")
    assert generate.returncode == 0, generate.stderr[-3000:]
    collected = run_without_them("pytest", "tests/test_cuda.py", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    assert "7 tests collected" in collected.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_a_gpu_the_script_says_so_and_exits_1(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_PYTHON": sys.executable}
    done = subprocess.run([ROOT / "scripts" / "gpu-check"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "gpu-check: no CUDA GPU" in done.stdout
    assert "no CUDA GPU" in (tmp_path / "gpu-check.log").read_text()  # the log goes to $OUT where it is set
