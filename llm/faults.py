"""Named points in the code where the fault-injection tests stop a real stage, to kill it right there.

A kill at a random moment rarely lands inside the few milliseconds of a checkpoint or shard write, which
is where a careless writer leaves half a file. So the writers call `pause_point(name)` at those moments;
it does nothing unless the environment asks for that point:

    LLM_PAUSE_AT=checkpoint.write:2   pause the second time the point is reached (":1" is the first)
    LLM_PAUSE_FILE=/tmp/paused         written with the point's name once paused, so the test knows when

The paused process sleeps until it is killed. tests/test_faults.py is the user.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

PAUSE_ENV = "LLM_PAUSE_AT"
PAUSE_FILE_ENV = "LLM_PAUSE_FILE"

_reached: Counter[str] = Counter()


def pause_point(name: str) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] != int(nth or 1):
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if marker:
        Path(marker).write_text(name)
    while True:  # until the test kills the process
        time.sleep(60)
