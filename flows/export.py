"""The export stage: the evaluate stage's best instruction model, as a Hugging Face folder and a GGUF file.

    python -m flows.export                                         (what `dvc repro export` runs)

Reads `data/eval/best.json` (the model the evaluate stage found best: the champion when it was
promoted) and writes `data/exports/`: `hf/` (for transformers) and `<registered model>.gguf` with its
Ollama Modelfile (for llama.cpp and Ollama), as `export.formats` asks (llm/export.py has what each holds),
and each one's size in bytes to `metrics/export.json` (`hf_bytes`, `gguf_bytes`).
MLflow logs the files as artifacts of that registered version, under `exports/` beside its MLmodel, so a
champion carries its exports; the version's `exports` tag has their URI. A stage of its own, so that a
change of export settings reruns no evaluation.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow

from flows.common import run_stage, stage_logger, tracked_run, write_metrics
from llm.config import ExportFormat, load_params
from llm.export import export as export_model
from llm.files import atomic_dir
from llm.lineage import checkpoint_input
from llm.registry import log_exports, read_best


def export_name(fmt: ExportFormat, registered_model: str) -> str:
    """The file or folder each format is written to, inside the stage's folder."""
    return "hf" if fmt == "hf" else f"{registered_model}.gguf"


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


@flow(name="export")
def export(params_file: str = "params.yaml", best_file: str = "data/eval/best.json",
           out_dir: str = "data/exports", metrics_file: str = "metrics/export.json") -> dict:
    params = load_params(params_file)
    config = params.export
    best = read_best(best_file)
    log = stage_logger()
    with tracked_run("export", out_dir=out_dir, experiment=params.tracking.experiment, params_file=params_file,
                     params_to_log={"export": dataclasses.asdict(config)}) as t:
        t.log_inputs([checkpoint_input(best.checkpoint, "exported")])
        with atomic_dir(out_dir) as tmp:
            for fmt in config.formats:
                export_model(best.checkpoint, fmt, tmp / export_name(fmt, best.registered_model), config.gguf_dtype)
        sizes = {f"{fmt}_bytes": tree_bytes(Path(out_dir) / export_name(fmt, best.registered_model))
                 for fmt in config.formats}
        t.log_metrics(sizes, step=0)
        uri = log_exports(best.registered_model, best.version, out_dir) if config.formats else None
        t.set_tags({"exported_model": f"{best.registered_model} version {best.version} ({best.stage})",
                    "exports": uri or "none (export.formats is empty)"})
    write_metrics(metrics_file, sizes)
    written = sorted(p.name for p in Path(out_dir).iterdir())
    log.info("export: %s version %s (the %s model%s) as %s in %s%s", best.registered_model, best.version,
             best.stage, ", the champion" if best.champion else "", ", ".join(config.formats) or "nothing",
             out_dir, f"; logged to {uri}" if uri else "")
    return {"model": best.registered_model, "version": best.version, "files": written, "exports": uri, **sizes}


if __name__ == "__main__":
    run_stage(export)
