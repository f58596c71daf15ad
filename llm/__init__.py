"""A GPT built from scratch in PyTorch, and the library behind every pipeline stage.

Plain functions and classes over paths, tensors and dataclasses: nothing here imports Prefect, and MLflow
is reached only through `llm.tracking`, so every function runs and tests without a server.
"""
