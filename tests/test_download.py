"""Downloads against a real HTTP server on 127.0.0.1: success, resume, retries, and failures."""

from __future__ import annotations

import hashlib
import json
import os
import socket

import pytest

from llm import download as dl
from tests.fileserver import FileServer


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch):
    monkeypatch.delenv(dl.MIRROR_ENV, raising=False)


@pytest.fixture
def body() -> bytes:
    return os.urandom(3 << 20)  # several chunks, so resumes and progress have something to do


def closed_port_url(path: str) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def test_fetch_streams_verifies_and_skips_when_present(tmp_path, body):
    with FileServer(files={"/c.txt": body}) as server:
        dest = tmp_path / "raw" / "c.txt"
        result = dl.fetch(server.url("/c.txt"), dest, sha(body))
        assert (result.origin, result.bytes, dest.read_bytes()) == ("network", len(body), body)
        again = dl.fetch(server.url("/c.txt"), dest, sha(body))
    assert again.origin == "present"
    assert len(server.requests) == 1
    assert os.listdir(dest.parent) == ["c.txt"]


def test_truncated_download_is_transient_and_resumes_with_range(tmp_path, body):
    with FileServer(files={"/c.txt": body}, truncate={"/c.txt": 1}) as server:
        dest = tmp_path / "c.txt"
        with pytest.raises(dl.TransientDownloadError, match="ended at|broke off"):
            dl.fetch(server.url("/c.txt"), dest, sha(body))
        assert not dest.exists()  # only a .tmp- part file, never the final name
        part = tmp_path / ".tmp-c.txt.part"
        assert 0 < part.stat().st_size < len(body)
        dl.fetch(server.url("/c.txt"), dest, sha(body))
    assert dest.read_bytes() == body
    assert server.requests[-1] == ("/c.txt", f"bytes={len(body) // 2}-")
    assert not part.exists()


def test_server_without_range_support_restarts_from_zero(tmp_path, body):
    (tmp_path / ".tmp-c.txt.part").write_bytes(b"garbage that is not a prefix")
    with FileServer(files={"/c.txt": body}, ranges=False) as server:
        dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body))
    assert (tmp_path / "c.txt").read_bytes() == body


def test_503_is_retried_then_succeeds(tmp_path, body):
    with FileServer(files={"/c.txt": body}, fail={"/c.txt": [503, 503]}) as server:
        path = dl.fetch_with_retries(server.url("/c.txt"), tmp_path / "c.txt", sha(body), retry_delay_s=0)
    assert path.read_bytes() == body
    assert len(server.requests) == 3


def test_404_fails_at_once_naming_the_source(tmp_path):
    with FileServer() as server:
        with pytest.raises(dl.DownloadError) as info:
            dl.fetch_with_retries(server.url("/gone.txt"), tmp_path / "gone.txt", None, label="corpus-x",
                                  retry_delay_s=0)
    assert not isinstance(info.value, dl.TransientDownloadError)
    assert str(info.value).startswith(f"corpus-x: HTTP 404 Not Found from {server.url('/gone.txt')}")
    assert len(server.requests) == 1
    assert list(tmp_path.iterdir()) == []


def test_sha256_mismatch_names_both_hashes_and_leaves_nothing(tmp_path, body):
    wrong = "0" * 64
    with FileServer(files={"/c.txt": body}) as server:
        with pytest.raises(dl.DownloadError) as info:
            dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", wrong, label="c")
    message = str(info.value)
    assert f"expected {wrong}, got {sha(body)}" in message and server.url("/c.txt") in message
    assert list(tmp_path.iterdir()) == []


def test_unreachable_url_is_transient(tmp_path):
    with pytest.raises(dl.TransientDownloadError, match="could not reach"):
        dl.fetch(closed_port_url("/c.txt"), tmp_path / "c.txt", None, timeout_s=2)


def test_mirror_is_used_with_no_network(tmp_path, body, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "c.txt").write_bytes(body)
    monkeypatch.setenv(dl.MIRROR_ENV, str(mirror))
    result = dl.fetch(closed_port_url("/path/c.txt"), tmp_path / "raw" / "c.txt", sha(body))
    assert result.origin == "mirror"
    assert (tmp_path / "raw" / "c.txt").read_bytes() == body


def test_mirror_with_wrong_hash_is_ignored(tmp_path, body):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "c.txt").write_bytes(b"stale copy")
    with FileServer(files={"/c.txt": body}) as server:
        result = dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body), mirror_dir=mirror)
    assert result.origin == "network"


def test_local_paths_and_file_urls(tmp_path, body):
    src = tmp_path / "src.txt"
    src.write_bytes(body)
    assert dl.fetch(str(src), tmp_path / "a" / "src.txt", sha(body)).origin == "local"
    assert dl.fetch(src.as_uri(), tmp_path / "b" / "src.txt", None).sha256 == sha(body)
    with pytest.raises(dl.DownloadError, match="does not exist; fix the source's url"):
        dl.fetch(str(tmp_path / "missing.txt"), tmp_path / "c" / "missing.txt", None)


# --- the stage, through Prefect's real local API ------------------------------------------------------


def write_params(path, sources, retries=2):
    lines = [f"download:\n  retries: {retries}\n  retry_delay_s: 0\n  timeout_s: 5\n  sources:"]
    for s in sources:
        lines.append("    - " + json.dumps(s))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_download_flow_retries_transient_failures_and_writes_manifests(tmp_path, body, prefect_server):
    from flows.download import download

    notes = b'[{"instruction": "i", "input": "", "output": "o"}]'
    with FileServer(files={"/c.txt": body, "/notes.json": notes}, fail={"/c.txt": [503]}) as server:
        write_params(tmp_path / "params.yaml", [
            {"name": "c", "url": server.url("/c.txt"), "sha256": sha(body)},
            {"name": "notes", "url": server.url("/notes.json"), "sha256": sha(notes), "kind": "json",
             "role": "instructions"},
        ])
        raw = tmp_path / "raw"
        (raw / "corpus").mkdir(parents=True)
        (raw / "corpus" / "old.txt").write_text("from a source since removed")
        metrics = download(str(tmp_path / "params.yaml"), str(raw), str(tmp_path / "metrics.json"))
    assert metrics == {"files": 2, "bytes": len(body) + len(notes)}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert sorted(p.name for p in (raw / "corpus").iterdir()) == ["c.txt", "manifest.json"]
    corpus = json.loads((raw / "corpus" / "manifest.json").read_text())["sources"]
    assert corpus == [{"name": "c", "role": "corpus", "kind": "text", "text_field": None, "file": "corpus/c.txt",
                       "url": server.url("/c.txt"), "sha256": sha(body), "bytes": len(body)}]
    everything = json.loads((raw / "manifest.json").read_text())["sources"]
    assert [e["name"] for e in everything] == ["c", "notes"]


@pytest.mark.slow
def test_download_flow_does_not_retry_a_404(tmp_path, prefect_server):
    from flows.download import download

    with FileServer() as server:
        write_params(tmp_path / "params.yaml", [{"name": "c", "url": server.url("/c.txt")}], retries=3)
        with pytest.raises(dl.DownloadError, match="c: HTTP 404"):
            download(str(tmp_path / "params.yaml"), str(tmp_path / "raw"), str(tmp_path / "m.json"))
    assert len(server.requests) == 1
    assert not (tmp_path / "m.json").exists()
