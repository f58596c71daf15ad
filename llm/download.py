"""Fetch files by URL or path, verified by sha256, resumable, never half-written.

`fetch()` makes one attempt and sorts failures into two kinds: `TransientDownloadError` (timeouts,
connection errors, truncated bodies, HTTP 5xx, 408 and 429), which are worth retrying, and
`DownloadError` (404 and other client errors, a sha256 mismatch), which are not. The download stage retries
through Prefect; library callers outside a flow use `fetch_with_retries()`.

Where it looks, in order:
1. `dest` itself: a file already there with the pinned hash is not fetched again;
2. the mirror folder (`mirror_dir`, else the `LLM_MIRROR_DIR` environment variable), by `dest`'s file name,
   used only when its hash matches: this is how CI and offline machines run without a network;
3. the URL: http(s) streams to a `.tmp-` part file beside `dest` and resumes it with an HTTP Range request
   on the next attempt; file:// URLs and local paths are copied.
The file appears under its final name only once its hash is verified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import unquote, urlparse

from tqdm import tqdm

from llm import faults
from llm.config import SourceConfig
from llm.files import TMP_PREFIX, atomic_path, read_json, remove_temporaries, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

MIRROR_ENV = "LLM_MIRROR_DIR"
_CHUNK_BYTES = 1 << 20
_RETRYABLE_HTTP = {408, 429}


class DownloadError(RuntimeError):
    """A download that failed for good: retrying would fail the same way."""


class TransientDownloadError(DownloadError):
    """A download that failed for a passing reason: retrying may succeed."""


class ChecksumMismatch(DownloadError):
    """The bytes are not the pinned ones (permanent); `actual` is their sha256."""

    def __init__(self, message: str, actual: str):
        super().__init__(message)
        self.actual = actual


@dataclass(frozen=True)
class FetchResult:
    path: Path
    sha256: str
    bytes: int
    origin: Literal["present", "mirror", "local", "network"]


def mirror_folder(mirror_dir: str | Path | None = None) -> Path | None:
    """The mirror to search: `mirror_dir`, else `$LLM_MIRROR_DIR`, else none."""
    chosen = mirror_dir if mirror_dir is not None else os.environ.get(MIRROR_ENV)
    return Path(chosen).expanduser() if chosen else None


def fetch(
    url: str,
    dest: str | Path,
    sha256: str | None,
    *,
    timeout_s: float = 60.0,
    mirror_dir: str | Path | None = None,
    label: str | None = None,
) -> FetchResult:
    """Make `dest` hold the file at `url` with hash `sha256` (None: unpinned). One attempt; see module doc."""
    dest = Path(dest)
    label = label or dest.name
    if dest.is_file() and sha256 is not None and sha256_file(dest) == sha256:
        return FetchResult(dest, sha256, dest.stat().st_size, "present")

    mirror = mirror_folder(mirror_dir)
    if mirror is not None and (mirror / dest.name).is_file():
        candidate = mirror / dest.name
        try:  # verified as it is copied: the mirror file is read once
            return _result(dest, "mirror", _copy_verified(candidate, dest, sha256, label, url), sha256, label)
        except ChecksumMismatch as exc:
            log.warning("%s: mirror file %s has sha256 %s, not %s; ignoring it", label, candidate, exc.actual, sha256)

    local = _local_path(url)
    if local is not None:
        if not local.is_file():
            raise DownloadError(f"{label}: {local} does not exist; fix the source's url in params.yaml")
        return _result(dest, "local", _copy_verified(local, dest, sha256, label, url), sha256, label)

    actual = _http_fetch(url, dest, sha256, timeout_s=timeout_s, label=label)
    return _result(dest, "network", actual, sha256, label)


def fetch_with_retries(
    url: str,
    dest: str | Path,
    sha256: str | None,
    *,
    retries: int = 3,
    retry_delay_s: float = 2.0,
    timeout_s: float = 60.0,
    mirror_dir: str | Path | None = None,
    label: str | None = None,
) -> Path:
    """`fetch()` retried with exponential backoff on transient failures, for callers outside a flow."""
    for attempt in range(retries + 1):
        try:
            return fetch(url, dest, sha256, timeout_s=timeout_s, mirror_dir=mirror_dir, label=label).path
        except TransientDownloadError as exc:
            if attempt == retries:
                raise
            delay = retry_delay_s * 2**attempt
            log.warning("%s (attempt %d of %d); retrying in %.1f s", exc, attempt + 1, retries + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------


def _result(dest: Path, origin: str, actual: str, sha256: str | None, label: str) -> FetchResult:
    if sha256 is None:
        log.warning("%s: no sha256 pinned; the file fetched has sha256 %s: add it to params.yaml", label, actual)
    return FetchResult(dest, actual, dest.stat().st_size, origin)  # type: ignore[arg-type]


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    return Path(url).expanduser()


def _mismatch(label: str, url: str, expected: str, actual: str) -> ChecksumMismatch:
    return ChecksumMismatch(
        f"{label}: sha256 mismatch for {url}: expected {expected}, got {actual}. The file was not kept; "
        f"if the source changed on purpose, update its sha256 in params.yaml", actual
    )


def _copy_verified(src: Path, dest: Path, sha256: str | None, label: str, url: str) -> str:
    """Copy `src` to `dest` atomically, hashing as it goes; returns the sha256."""
    with atomic_path(dest) as tmp:
        digest = hashlib.sha256()
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_CHUNK_BYTES):
                digest.update(chunk)
                fout.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise _mismatch(label, url, sha256, digest.hexdigest())
        faults.pause_point("download.copy")
    return digest.hexdigest()


def _open_url(url: str, offset: int, timeout_s: float, label: str):
    headers = {"User-Agent": "llm-pipeline/0.1", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        what = f"{label}: HTTP {exc.code} {exc.reason} from {url}"
        if exc.code >= 500 or exc.code in _RETRYABLE_HTTP or (exc.code == 416 and offset):
            raise TransientDownloadError(what) from exc
        raise DownloadError(f"{what}; check the source's url in params.yaml") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientDownloadError(f"{label}: could not reach {url}: {reason}") from exc


def _http_fetch(url: str, dest: Path, sha256: str | None, *, timeout_s: float, label: str) -> str:
    # A stable part name (not a random one) so that the next attempt finds it and resumes.
    part = dest.with_name(f"{TMP_PREFIX}{dest.name}.part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    response = _open_url(url, offset, timeout_s, label)
    with response:
        resumed = offset > 0 and response.status == 206
        if offset and not resumed:
            log.info("%s: server ignored the Range request; downloading from the start", label)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        digest = hashlib.sha256()
        if resumed:
            with open(part, "rb") as f:
                while chunk := f.read(_CHUNK_BYTES):
                    digest.update(chunk)
        with open(part, "ab" if resumed else "wb") as out:
            received = _stream(response, out, digest, offset, total, label, url)
    if total is not None and received != total:
        raise TransientDownloadError(f"{label}: download of {url} ended at {received} of {total} bytes")
    actual = digest.hexdigest()
    if sha256 is not None and actual != sha256:
        part.unlink(missing_ok=True)
        raise _mismatch(label, url, sha256, actual)
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    return actual


def _stream(response: BinaryIO, out: BinaryIO, digest, offset: int, total: int | None, label: str, url: str) -> int:
    received = offset
    with tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=label, disable=None, leave=False) as bar:
        while True:
            try:
                chunk = response.read(_CHUNK_BYTES)
            except (TimeoutError, ConnectionError, HTTPException) as exc:
                out.flush()  # keep what arrived: the next attempt resumes from it
                broke = f"{label}: download of {url} broke off at {received} bytes: {exc}"
                raise TransientDownloadError(broke) from exc
            if not chunk:
                return received
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))


# ---------------------------------------------------------------------------------------------------
# The download stage's layout: data/raw/<role>/<file name>, a manifest per role and one for all.


def source_path(raw_dir: str | Path, source: SourceConfig) -> Path:
    return Path(raw_dir) / source.role / source.file_name


def manifest_entry(source: SourceConfig, result: FetchResult, raw_dir: str | Path) -> dict:
    return {
        "name": source.name,
        "role": source.role,
        "kind": source.kind,
        "text_field": source.text_field,
        "file": result.path.relative_to(raw_dir).as_posix(),
        "url": source.url,
        "sha256": result.sha256,
        "bytes": result.bytes,
    }


def write_manifests(raw_dir: str | Path, entries: list[dict]) -> None:
    """One manifest per role folder (what the next stage reads) and `manifest.json` over all sources.

    Per-role manifests keep the stages apart: new instruction data changes `raw/instructions/` only,
    so DVC does not retokenize the corpus.
    """
    raw_dir = Path(raw_dir)
    for role in ("corpus", "instructions"):
        role_entries = [e for e in entries if e["role"] == role]
        (raw_dir / role).mkdir(parents=True, exist_ok=True)
        write_json_atomic(raw_dir / role / "manifest.json", {"sources": role_entries})
        faults.pause_point("download.manifest")
    write_json_atomic(raw_dir / "manifest.json", {"sources": entries})


def prune_raw(raw_dir: str | Path, sources: list[SourceConfig]) -> list[Path]:
    """Delete files under `raw_dir/<role>/` that no source names any more (and killed writers' leftovers)."""
    raw_dir = Path(raw_dir)
    keep = {source_path(raw_dir, s) for s in sources}
    removed = []
    for role in ("corpus", "instructions"):
        folder = raw_dir / role
        remove_temporaries(folder)
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.is_file() and path.name != "manifest.json" and path not in keep:
                path.unlink()
                removed.append(path)
    return removed


def read_manifest(raw_dir: str | Path, role: str) -> list[dict]:
    """The sources of `role` that the download stage fetched; says how to get them if it has not run."""
    path = Path(raw_dir) / role / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the download stage first (`dvc repro download`)")
    return read_json(path)["sources"]
