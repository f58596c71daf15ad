"""Whether a process keeps the memory it frees (llm/hardware.py's keep_freed_memory), seen from outside.

A fresh process runs `setup`, then fills a 128 MB tensor, frees it and reports how many bytes of memory it
gave back to the kernel. Kept bytes, not page faults on a second buffer, are what is measured: where a
second buffer lands depends on what other threads allocated in between, which varies from run to run.
"""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

BUFFER_BYTES = 2**25 * 4  # the float32 tensor the process frees

_MEASURE = """
import resource
import torch
def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()
x = torch.empty(2**25).fill_(1.0)
before = resident_bytes()
del x
print(before - resident_bytes())
"""


def bytes_given_back(setup: str, *args: str) -> tuple[str, int]:
    """Run `setup` (Python, with `sys` imported and `args` in sys.argv[1:]) in a fresh process, then the
    measure; returns what `setup` printed and the bytes given back."""
    code = f"import sys\n{setup}\n{_MEASURE}"
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    *printed, given_back = out.stdout.strip().splitlines()
    return "\n".join(printed), int(given_back)
