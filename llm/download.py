"""Fetch files by URL or path, verified by sha256, resumable, never half-written.

`fetch()` makes one attempt and sorts failures into two kinds: `TransientDownloadError` (timeouts,
connection errors, truncated bodies, HTTP 5xx, 408 and 429), which are worth retrying, and
`DownloadError` (404 and other client errors, a sha256 mismatch), which are not. The download stage retries
through Prefect; library callers outside a flow use `fetch_with_retries()`.

Where it looks, in order:
1. `dest` itself: a file already there with the pinned hash is not fetched again;
2. the mirror folder (`mirror_dir`, else the `LLM_MIRROR_DIR` environment variable), by `dest`'s file name,
   used only when its hash matches: this is how CI and offline machines run without a network;
3. the URL: http(s) streams to a part file beside `dest`, which the next attempt resumes (below); file://
   URLs and local paths are copied.
The file appears under its final name only once its hash is verified.

A source with a `member` keeps one file of the zip archive at the URL; its `sha256` pins the archive and
`member_sha256` the member. Then:
1. `dest` is kept if it has the pinned `member_sha256`;
2. the mirror may hold the member itself, extracted, by the member's file name (checked by `member_sha256`);
3. else the archive is fetched as in 2 and 3 above: from the mirror by the URL's file name, else from the URL,
   to `.tmp-<dest's name>.zip` beside `dest`, verified by `sha256`. The member is extracted with `zipfile` to
   a temporary name, verified by `member_sha256` and renamed to `dest`; the archive is deleted whether that
   worked or not. A member missing from the archive, a file that is not a zip, or a hash of either that is
   not the pinned one fails for good, leaving nothing behind; a transient failure of the archive's download
   leaves its part file, which the next attempt resumes.

How an http(s) download resumes. The bytes go to `.tmp-<name>.part`; when a download starts from byte 0, the
response's validator (its strong ETag, else its Last-Modified) is written to the sidecar
`.tmp-<name>.part.json` with a hash of the URL. Both names start with `.tmp-`, so cleanup removes them. A
later attempt that finds a part and a sidecar for the same URL asks for the rest with `Range: bytes=N-` and
`If-Range: <validator>`, and then:
- 206: its `Content-Range: bytes START-END/TOTAL` must start at N, end at TOTAL - 1 and agree with
  Content-Length, and a validator of the same kind that it carries must be the recorded one (a server that
  ignores If-Range but honours Range would otherwise append another file's bytes); the rest is appended;
- 200 (the file changed, or the server ignores Range): the part is overwritten from byte 0 by this response;
- 416 (nothing past byte N: a part completed by an attempt killed before its rename): the part is hashed,
  and renamed into place, with no further request, if it has the pinned sha256.
A part that cannot be continued (a 416 when unpinned or with another hash, a 206 that does not fit) is
discarded and the file fetched from byte 0 by a second request of the same attempt, never a third; errors
(a 5xx, a timeout) are sorted as above and keep the part for the next attempt. With no validator known (the
server sent neither header) a part is not resumed: without If-Range nothing tells its bytes from those of
a file changed since.

URLs may carry `user:password@`, sent as HTTP Basic credentials (and not to another host a redirect points
at), and a query string, such as a signed URL's token. Neither ever reaches a log line, an exception
message, the manifest or MLflow: those show `redact_url(url)`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import logging
import os
import re
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import unquote, urlparse, urlsplit, urlunsplit

from tqdm import tqdm

from llm import faults
from llm.config import SOURCE_ROLES, DownloadConfig, SourceConfig, member_problem, url_file_name
from llm.validation import bulleted
from llm.files import (TMP_PREFIX, atomic_path, fsync_file, read_json, remove_temporaries, replace_durably, sha256_file,
                       write_json_atomic)

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
    archive_sha256: str | None = None  # with a member: the archive's hash, measured if fetched, else the pinned one


def mirror_folder(mirror_dir: str | Path | None = None) -> Path | None:
    """The mirror to search: `mirror_dir`, else `$LLM_MIRROR_DIR`, else none."""
    chosen = mirror_dir if mirror_dir is not None else os.environ.get(MIRROR_ENV)
    return Path(chosen).expanduser() if chosen else None


def redact_url(url: str) -> str:
    """`url` fit for logs and MLflow: without credentials, query string or fragment; a local path unchanged.

    https://user:tok@host/a/b.txt?sig=x -> https://host/a/b.txt
    """
    if not re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: show nothing that may be a secret
        return url.split("://", 1)[0] + "://(a URL that does not parse)"
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def fetch(
    url: str,
    dest: str | Path,
    sha256: str | None,
    *,
    timeout_s: float = 60.0,
    mirror_dir: str | Path | None = None,
    label: str | None = None,
    member: str | None = None,
    member_sha256: str | None = None,
) -> FetchResult:
    """Make `dest` hold the file at `url` with hash `sha256` (None: unpinned); with `member`, that file of the zip
    archive at `url`, `sha256` then pinning the archive and `member_sha256` the member. One attempt; see module doc."""
    dest = Path(dest)
    label = label or dest.name
    kept_sha256 = sha256 if member is None else member_sha256  # what the file at `dest` must hash to
    if dest.is_file() and kept_sha256 is not None and sha256_file(dest) == kept_sha256:
        return FetchResult(dest, kept_sha256, dest.stat().st_size, "present", None if member is None else sha256)
    mirror = mirror_folder(mirror_dir)
    if member is None:
        origin, actual = _fetch_file(url, dest, sha256, dest.name, mirror, timeout_s=timeout_s, label=label)
        return _result(dest, origin, actual, sha256, label)
    return _fetch_member(url, dest, sha256, member, member_sha256, mirror, timeout_s=timeout_s, label=label)


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
    member: str | None = None,
    member_sha256: str | None = None,
) -> Path:
    """`fetch()` retried with exponential backoff on transient failures, for callers outside a flow."""
    for attempt in range(retries + 1):
        try:
            return fetch(url, dest, sha256, timeout_s=timeout_s, mirror_dir=mirror_dir, label=label, member=member,
                         member_sha256=member_sha256).path
        except TransientDownloadError as exc:
            if attempt == retries:
                raise
            delay = retry_delay_s * 2**attempt
            log.warning("%s (attempt %d of %d); retrying in %.1f s", exc, attempt + 1, retries + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------


def _fetch_file(url: str, dest: Path, sha256: str | None, mirror_name: str, mirror: Path | None, *,
                timeout_s: float, label: str) -> tuple[str, str]:
    """Make `dest` hold the file at `url`, from the mirror's `mirror_name` if it has the pinned one, verified by
    `sha256`; returns (where it came from, its sha256)."""
    actual = _from_mirror(mirror, mirror_name, dest, sha256, label, url)
    if actual is not None:
        return "mirror", actual
    local = _local_path(url)
    if local is not None:
        if not local.is_file():
            raise DownloadError(f"{label}: {local} does not exist; fix the source's url in params.yaml")
        return "local", _copy_verified(local, dest, sha256, label, url)
    return "network", _http_fetch(url, dest, sha256, timeout_s=timeout_s, label=label)


def _from_mirror(mirror: Path | None, name: str, dest: Path, sha256: str | None, label: str, url: str,
                 member: str | None = None) -> str | None:
    """The sha256 of the mirror's file `name` once copied to `dest`; None where the mirror has no such file or
    another one (then the caller fetches it)."""
    if mirror is None or not (mirror / name).is_file():
        return None
    try:  # verified as it is copied: the mirror file is read once
        return _copy_verified(mirror / name, dest, sha256, label, url, member)
    except ChecksumMismatch as exc:
        log.warning("%s: mirror file %s has sha256 %s, not %s; ignoring it", label, mirror / name, exc.actual, sha256)
        return None


def _fetch_member(url: str, dest: Path, sha256: str | None, member: str, member_sha256: str | None,
                  mirror: Path | None, *, timeout_s: float, label: str) -> FetchResult:
    """Make `dest` hold `member` of the zip archive at `url`: from the mirror's copy of the member, else
    extracted from the archive (the mirror's, else fetched) to a temporary name and verified."""
    if problem := member_problem(member):  # params.yaml's are checked already; this guards other callers
        raise DownloadError(f"{label}: member of {redact_url(url)} {problem}")
    member_name = member.rsplit("/", 1)[-1]
    actual = _from_mirror(mirror, member_name, dest, member_sha256, label, url, member)
    if actual is not None:
        return _result(dest, "mirror", actual, member_sha256, label, "member_sha256", sha256)
    # Stable, so that a retry resumes its download; beside dest, so that the stage's cleanup of data/raw removes
    # what a killed attempt left.
    archive = dest.with_name(f"{TMP_PREFIX}{dest.name}.zip")
    try:
        origin, archive_sha256 = _fetch_file(url, archive, sha256, url_file_name(url), mirror, timeout_s=timeout_s,
                                             label=label)
        if sha256 is None:
            _warn_unpinned(label, "sha256", "the archive", archive_sha256)
        actual = _extract(archive, member, dest, member_sha256, label, url)
    finally:
        archive.unlink(missing_ok=True)
    return _result(dest, origin, actual, member_sha256, label, "member_sha256", archive_sha256)


def _extract(archive: Path, member: str, dest: Path, sha256: str | None, label: str, url: str) -> str:
    """Write `member` of zip file `archive` to `dest` atomically, verified by `sha256`; returns its sha256."""
    try:
        with zipfile.ZipFile(archive) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                files = [name for name in zf.namelist() if not name.endswith("/")]
                raise DownloadError(f"{label}: the archive {redact_url(url)} has no member {member!r}; fix the "
                                    f"source's member in params.yaml. Its files:{bulleted(files, 10)}") from None
            with zf.open(info) as fin:
                return _write_verified(fin, dest, sha256, label, url, member)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DownloadError(f"{label}: {redact_url(url)} is not a zip archive, or a corrupt one ({exc}); check the "
                            f"source's url in params.yaml, or remove member: if the file is not an archive") from exc


def _result(dest: Path, origin: str, actual: str, sha256: str | None, label: str, key: str = "sha256",
            archive_sha256: str | None = None) -> FetchResult:
    if sha256 is None:
        _warn_unpinned(label, key, "the member extracted" if key == "member_sha256" else "the file fetched", actual)
    return FetchResult(dest, actual, dest.stat().st_size, origin, archive_sha256)  # type: ignore[arg-type]


def _warn_unpinned(label: str, key: str, what: str, actual: str) -> None:
    log.warning("%s: no %s pinned; %s has sha256 %s: add it to params.yaml", label, key, what, actual)


def _local_path(url: str) -> Path | None:
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    return Path(url).expanduser()


def _mismatch(label: str, url: str, expected: str, actual: str, member: str | None = None) -> ChecksumMismatch:
    what, key = (redact_url(url), "sha256") if member is None else (f"member {member!r} of {redact_url(url)}",
                                                                  "member_sha256")
    return ChecksumMismatch(
        f"{label}: sha256 mismatch for {what}: expected {expected}, got {actual}. The file was not kept; "
        f"if the source changed on purpose, update its {key} in params.yaml", actual
    )


def _copy_verified(src: Path, dest: Path, sha256: str | None, label: str, url: str, member: str | None = None) -> str:
    """Copy `src` to `dest` atomically, hashing as it goes; returns the sha256."""
    with open(src, "rb") as fin:
        return _write_verified(fin, dest, sha256, label, url, member)


def _write_verified(fin: BinaryIO, dest: Path, sha256: str | None, label: str, url: str,
                    member: str | None = None) -> str:
    """Write what `fin` holds to `dest` atomically, hashing as it goes; returns the sha256. `member`: the name in
    the archive at `url` that `fin` reads, for the error message."""
    with atomic_path(dest) as tmp:
        digest = hashlib.sha256()
        with open(tmp, "wb") as fout:
            while chunk := fin.read(_CHUNK_BYTES):
                digest.update(chunk)
                fout.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise _mismatch(label, url, sha256, digest.hexdigest(), member)
        faults.pause_point("download.copy")
    return digest.hexdigest()


def _request(url: str, headers: dict[str, str]) -> urllib.request.Request:
    parts = urlsplit(url)
    if parts.username is None:
        return urllib.request.Request(url, headers=headers)
    # urllib takes `user:password@` for part of the host name: send it as Basic credentials instead, as an
    # unredirected header so that a redirect to another host does not carry it along.
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = urllib.request.Request(bare, headers=headers)
    token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    request.add_unredirected_header("Authorization", "Basic " + base64.b64encode(token).decode())
    return request


def _open_url(url: str, headers: dict[str, str], timeout_s: float, label: str):
    """The response to a GET of `url`; a 416 to a ranged request is returned too, for the caller to judge."""
    request = _request(url, {"User-Agent": "llm-pipeline/0.1", "Accept-Encoding": "identity", **headers})
    try:
        return urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and "Range" in headers:
            return exc
        what = f"{label}: HTTP {exc.code} {exc.reason} from {redact_url(url)}"
        if exc.code >= 500 or exc.code in _RETRYABLE_HTTP:
            raise TransientDownloadError(what) from exc
        raise DownloadError(f"{what}; check the source's url in params.yaml") from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise TransientDownloadError(f"{label}: could not reach {redact_url(url)}: {reason}") from exc


class _CannotResume(Exception):
    """The part file cannot be continued; the message says why. The file is fetched from byte 0 instead."""


@dataclass(frozen=True)
class _Part:
    """Where a download of `dest` keeps its bytes, and the sidecar that says what they are a prefix of."""

    dest: Path

    @property
    def path(self) -> Path:
        # A stable name (not a random one) so that the next attempt finds it and resumes.
        return self.dest.with_name(f"{TMP_PREFIX}{self.dest.name}.part")

    @property
    def sidecar(self) -> Path:
        return self.dest.with_name(f"{TMP_PREFIX}{self.dest.name}.part.json")

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)


def _url_key(url: str) -> str:
    # A hash, not the URL: a part begun for another URL is not resumed, and the URL's credentials and token
    # stay out of data/raw.
    return hashlib.sha256(url.encode()).hexdigest()


def _validator(headers) -> str | None:
    """The response's strong ETag, else its Last-Modified: what If-Range can send back (weak ETags it cannot)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _resume_point(part: _Part, url: str, label: str) -> tuple[int, str] | None:
    """(bytes in the part, its validator) where the part can be resumed, else None."""
    if not part.path.is_file() or part.path.stat().st_size == 0:
        return None
    try:
        meta = read_json(part.sidecar)
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("url_sha256") != _url_key(url) or not meta.get("validator"):
        log.info("%s: a part file with no validator for this URL is not resumed; downloading from the start", label)
        return None
    return part.path.stat().st_size, str(meta["validator"])


def _http_fetch(url: str, dest: Path, sha256: str | None, *, timeout_s: float, label: str) -> str:
    part = _Part(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    resume = _resume_point(part, url, label)
    if resume is not None:
        try:
            return _resume(url, part, resume, sha256, timeout_s=timeout_s, label=label)
        except _CannotResume as exc:
            log.info("%s: %s; downloading from the start", label, exc)
    part.discard()
    with _open_url(url, {}, timeout_s, label) as response:
        return _receive(response, url, part, sha256, hashlib.sha256(), 0, _total(response, 0), label)


def _resume(url: str, part: _Part, resume: tuple[int, str], sha256: str | None, *, timeout_s: float,
            label: str) -> str:
    """Continue `part` from byte `offset`: one request; raises `_CannotResume` where the part is of no use."""
    offset, validator = resume
    with _open_url(url, {"Range": f"bytes={offset}-", "If-Range": validator}, timeout_s, label) as response:
        if response.status == 416:
            actual = sha256_file(part.path)
            if sha256 is None or actual != sha256:
                what = "unpinned" if sha256 is None else f"sha256 {actual}, not the pinned one"
                raise _CannotResume(f"the server has nothing past the part file's {offset:,} bytes (HTTP 416), "
                                    f"which are {what}")
            log.info("%s: the part file was complete already; keeping it", label)
            return _finish(url, part, sha256, actual, label)
        if response.status != 206:
            log.info("%s: the server sent the whole file, not the rest from byte %d (it changed, or the server "
                     "ignores Range); downloading from the start", label, offset)
            return _receive(response, url, part, sha256, hashlib.sha256(), 0, _total(response, 0), label)
        total = _check_partial(response.headers, offset, validator)
        digest = hashlib.sha256()
        with open(part.path, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                digest.update(chunk)
        return _receive(response, url, part, sha256, digest, offset, total, label)


def _check_partial(headers, offset: int, validator: str) -> int:
    """The file's full size, from a 206 that continues a part of `offset` bytes; `_CannotResume` if it does not."""
    content_range = headers.get("Content-Range") or ""
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
    if match is None:
        raise _CannotResume(f"the 206 response's Content-Range {content_range!r} is not bytes START-END/TOTAL")
    start, end = int(match.group(1)), int(match.group(2))
    if start != offset:
        raise _CannotResume(f"the server resumed at byte {start}, not at the part file's end, byte {offset} "
                            f"(Content-Range {content_range!r})")
    length = headers.get("Content-Length")
    if (end < start or (match.group(3) != "*" and end + 1 != int(match.group(3)))
            or (length is not None and int(length) != end - start + 1)):
        raise _CannotResume(f"the 206 response's Content-Range {content_range!r} and Content-Length {length} "
                            f"do not make the rest of one file")
    sent = headers.get("ETag" if validator.startswith('"') else "Last-Modified")
    if sent is not None and sent != validator:
        raise _CannotResume(f"the server ignored If-Range: its 206 is of {sent}, the part file of {validator}")
    return end + 1


def _total(response, offset: int) -> int | None:
    length = response.headers.get("Content-Length")
    return offset + int(length) if length is not None else None


def _receive(response, url: str, part: _Part, sha256: str | None, digest, offset: int, total: int | None,
             label: str) -> str:
    """Append the response's body to the part (write it afresh from byte 0), verify and rename it into place."""
    if offset == 0:  # recorded before the first byte, so that an attempt killed at any moment can be resumed
        validator = _validator(response.headers)
        if validator is None:
            part.sidecar.unlink(missing_ok=True)
        else:
            write_json_atomic(part.sidecar, {"url_sha256": _url_key(url), "validator": validator})
    with open(part.path, "ab" if offset else "wb") as out:
        received = _stream(response, out, digest, offset, total, label, url)
    if total is not None and received != total:
        raise TransientDownloadError(f"{label}: download of {redact_url(url)} ended at {received} of {total} bytes")
    return _finish(url, part, sha256, digest.hexdigest(), label)


def _finish(url: str, part: _Part, sha256: str | None, actual: str, label: str) -> str:
    if sha256 is not None and actual != sha256:
        part.discard()
        raise _mismatch(label, url, sha256, actual)
    fsync_file(part.path)
    replace_durably(part.path, part.dest)
    part.sidecar.unlink(missing_ok=True)  # after the rename: a kill in between leaves only a stray sidecar
    return actual


def _stream(response: BinaryIO, out: BinaryIO, digest, offset: int, total: int | None, label: str, url: str) -> int:
    received = offset
    with tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=label, disable=None, leave=False) as bar:
        while True:
            try:
                chunk = response.read(_CHUNK_BYTES)
            except (TimeoutError, ConnectionError, HTTPException) as exc:
                out.flush()  # keep what arrived: the next attempt resumes from it
                broke = f"{label}: download of {redact_url(url)} broke off at {received} bytes: {exc}"
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
        "label_field": source.label_field,
        "columns": source.columns,
        "file": result.path.relative_to(raw_dir).as_posix(),
        "url": redact_url(source.url),  # the manifest goes to MLflow as an artifact
        "member": source.member,
        "sha256": result.sha256,  # of the file stored: the member, where there is one
        "archive_sha256": result.archive_sha256,
        "bytes": result.bytes,
    }


def loggable_config(config: DownloadConfig) -> dict:
    """`config` as the download stage logs it to MLflow: every source's url through `redact_url`."""
    logged = dataclasses.asdict(config)
    for source in logged["sources"]:
        source["url"] = redact_url(source["url"])
    return logged


def write_manifests(raw_dir: str | Path, entries: list[dict]) -> None:
    """One manifest per role folder (what the next stage reads) and `manifest.json` over all sources.

    Per-role manifests keep the stages apart: new instruction data changes `raw/instructions/` only,
    so DVC does not retokenize the corpus.
    """
    raw_dir = Path(raw_dir)
    for role in SOURCE_ROLES:
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
    for role in SOURCE_ROLES:
        folder = raw_dir / role
        remove_temporaries(folder)
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            if path.is_file() and path.name != "manifest.json" and path not in keep:
                path.unlink()
                removed.append(path)
    return removed


def read_sources_manifest(raw_dir: str | Path, role: str) -> list[dict]:
    """The sources of `role` that the download stage fetched; says how to get them if it has not run."""
    path = Path(raw_dir) / role / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the download stage first (`dvc repro download`)")
    return read_json(path)["sources"]


def downloaded_source(raw_dir: str | Path, role: str, name: str, key: str) -> tuple[Path, dict]:
    """The downloaded file of source `name` (of `role`) and its manifest entry; `key` is the params key
    that names it, for the error when no such source was downloaded."""
    entries = read_sources_manifest(raw_dir, role)
    for entry in entries:
        if entry["name"] == name:
            return Path(raw_dir) / entry["file"], entry
    names = ", ".join(e["name"] for e in entries) or "none"
    raise FileNotFoundError(f"{key}: no downloaded source {name!r} with role {role} (downloaded: {names}); add it "
                            f"to download.sources or fix the name")
