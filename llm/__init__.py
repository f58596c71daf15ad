"""A GPT built from scratch in PyTorch, and the library behind every pipeline stage.

Plain functions and classes over paths, tensors and dataclasses: nothing here imports Prefect, and MLflow
is reached only through `llm.tracking`, so every function runs and tests without a server.
"""

import os as _os

# A relative mirror or tiktoken cache folder means the working directory the process started in; a
# stage run later from another directory (a DVC experiment's copy, a child process) must see the same
# folder, so it is made absolute once, here, before anything reads it or starts a child.
for _var in ("LLM_MIRROR_DIR", "TIKTOKEN_CACHE_DIR"):
    if _os.environ.get(_var):
        _os.environ[_var] = _os.path.abspath(_os.path.expanduser(_os.environ[_var]))
