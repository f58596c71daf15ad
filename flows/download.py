"""The download stage: fetch every source in params.yaml's `download` section into `data/raw/`.

    python -m flows.download            (what `dvc repro download` runs)

Sources are fetched concurrently, each as a Prefect task retried with exponential backoff on transient
failures only; a 404 or a sha256 mismatch fails at once. Writes the files, their manifests and
`metrics/download.json`. What goes to MLflow (the settings, the manifest) shows each URL without its
credentials and query string (`llm.download.redact_url`).
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.tasks import exponential_backoff

from flows.common import run_stage, stage_logger, tracked_run, write_metrics
from llm import download as dl
from llm.config import SourceConfig, load_params
from llm.lineage import source_inputs


def _is_transient(task, task_run, state) -> bool:
    return isinstance(state.result(raise_on_failure=False), dl.TransientDownloadError)


@task(cache_policy=NO_CACHE, retry_condition_fn=_is_transient, task_run_name="fetch-{source.name}")
def fetch_source(source: SourceConfig, raw_dir: Path, timeout_s: float) -> dict:
    result = dl.fetch(source.url, dl.source_path(raw_dir, source), source.sha256, timeout_s=timeout_s,
                      label=source.name, member=source.member, member_sha256=source.member_sha256)
    stage_logger().info("%s: %s bytes (%s)", source.name, f"{result.bytes:,}", result.origin)
    return dl.manifest_entry(source, result, raw_dir)


@flow(name="download")
def download(
    params_file: str = "params.yaml", raw_dir: str = "data/raw", metrics_file: str = "metrics/download.json"
) -> dict:
    params = load_params(params_file)
    config, raw = params.download, Path(raw_dir)
    with tracked_run("download", out_dir=raw, experiment=params.tracking.experiment, params_file=params_file,
                     params_to_log={"download": dl.loggable_config(config)}) as tracker:
        for path in dl.prune_raw(raw, config.sources):
            stage_logger().info("removed %s: no source names it any more", path)
        fetch = fetch_source.with_options(
            retries=config.retries, retry_delay_seconds=exponential_backoff(config.retry_delay_s)
        )
        futures = [fetch.submit(source, raw, config.timeout_s) for source in config.sources]
        wait(futures)
        entries = [future.result() for future in futures]  # raises the first failure, after all finished
        dl.write_manifests(raw, entries)
        tracker.log_inputs(source_inputs(raw))
        metrics = {"files": len(entries), "bytes": sum(e["bytes"] for e in entries)}
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifact(raw / "manifest.json")
    write_metrics(metrics_file, metrics)
    return metrics


if __name__ == "__main__":
    run_stage(download)
