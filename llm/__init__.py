"""A GPT built from scratch in PyTorch, and the library behind every pipeline stage.

Plain functions and classes over paths, tensors and dataclasses: nothing here imports Prefect, and MLflow
is reached only through `llm.tracking` (runs), `llm.store` (where the store is), `llm.lineage` (what made a
run) and `llm.registry` (models), so every function runs and tests without a server.

The package is flat, one module per concern named after what it does, as nanochat keeps its library at
this size. Subpackages by concern (data, model, training, evaluation, serving) were weighed and left out:
most stages cross all of them (a training stage reads data, builds the model, trains and registers), so
subpackages would lengthen every import without separating anything, and a concern that grows past a
module can become a package of its own without moving the others. The README's "Layout" lists the
modules by concern:

- settings: validation (the loader and its checks), config (the params.yaml sections)
- data: files, lock, download, documents, tokenizer, tokenize, shards, sampler, instructions
- model: model_config (shapes and presets, torch-free), model, dropout, loss, lora, gpt2_weights, export,
  checkpoint (the one owner of checkpoint folders), starting
- training: hardware, distributed, optim, train (the loop), masking (the encoder's objective), pretrain,
  finetune, classify, preference
- evaluation: perplexity, generate, fill, responses, scores, judge, report, plots, evaluate, hellaswag, chat
- tracking and serving: store, lineage, tracking, registry, pyfunc, pyfunc_chat, pyfunc_classifier, pyfunc_fill
- the pipeline's own: imports (the code a stage runs), faults (fault injection for the tests)
"""

import os as _os

# A relative mirror or tiktoken cache folder means the working directory the process started in; a
# stage run later from another directory (a DVC experiment's copy, a child process) must see the same
# folder, so it is made absolute once, here, before anything reads it or starts a child.
for _var in ("LLM_MIRROR_DIR", "TIKTOKEN_CACHE_DIR"):
    if _os.environ.get(_var):
        _os.environ[_var] = _os.path.abspath(_os.path.expanduser(_os.environ[_var]))
