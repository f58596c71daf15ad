"""A relative LLM_MIRROR_DIR or TIKTOKEN_CACHE_DIR names the same folder from any working directory."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

CHILD = "import os; from llm.download import mirror_folder; print(mirror_folder(), os.environ['TIKTOKEN_CACHE_DIR'])"
PARENT = f"""
import subprocess, sys
import llm  # resolves the variables against this process's working directory
print(subprocess.run([sys.executable, "-c", {CHILD!r}], cwd="/", capture_output=True, text=True, check=True).stdout)
"""


def test_the_library_makes_relative_folders_absolute_for_every_child(tmp_path):
    (tmp_path / "work").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLM_MIRROR_DIR": "../mirror", "TIKTOKEN_CACHE_DIR": "cache"}
    out = subprocess.run([sys.executable, "-c", PARENT], cwd=tmp_path / "work", env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(tmp_path / "mirror"), str(tmp_path / "work" / "cache")]


def test_the_scripts_make_relative_folders_absolute_before_they_change_directory(tmp_path):
    script = f'. {ROOT / "scripts/absolute-paths.sh"}; cd /; echo "$LLM_MIRROR_DIR $TIKTOKEN_CACHE_DIR"'
    env = {**os.environ, "LLM_MIRROR_DIR": "../shared/data", "TIKTOKEN_CACHE_DIR": ""}
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(tmp_path.parent / "shared/data")]  # an empty variable stays empty
