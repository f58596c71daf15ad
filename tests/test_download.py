"""Downloads against a real HTTP server on 127.0.0.1: success, resume, retries, failures, and no secrets shown."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import socket
import zipfile
from pathlib import Path

import pytest

from llm import download as dl
from llm.config import DownloadConfig, SourceConfig
from llm.lineage import flatten
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
        assert not dest.exists()  # only .tmp- files, never the final name
        part = tmp_path / ".tmp-c.txt.part"
        assert part.stat().st_size == len(body) // 2
        sidecar = json.loads((tmp_path / ".tmp-c.txt.part.json").read_text())
        assert sidecar == {"url_sha256": sha(server.url("/c.txt").encode()), "validator": server.etag_of("/c.txt")}
        dl.fetch(server.url("/c.txt"), dest, sha(body))
    assert dest.read_bytes() == body
    assert server.requests == [("/c.txt", None), ("/c.txt", f"bytes={len(body) // 2}-")]
    assert server.headers[1]["If-Range"] == server.etag_of("/c.txt")
    assert os.listdir(tmp_path) == ["c.txt"]  # part and sidecar gone


def test_last_modified_is_the_validator_without_an_etag(tmp_path, body):
    with FileServer(files={"/c.txt": body}, truncate={"/c.txt": 1}, etag=False) as server:
        with pytest.raises(dl.TransientDownloadError):
            dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body))
        dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body))
    assert (tmp_path / "c.txt").read_bytes() == body
    assert server.requests[1] == ("/c.txt", f"bytes={len(body) // 2}-")
    assert server.headers[1]["If-Range"] == server.last_modified_of("/c.txt") == "Tue, 14 Nov 2023 22:13:20 GMT"


def test_a_part_without_a_validator_is_not_resumed(tmp_path, body):
    # Without If-Range nothing would tell the part's bytes from those of a file changed since.
    with FileServer(files={"/c.txt": body}, truncate={"/c.txt": 1}, etag=False, last_modified=False) as server:
        with pytest.raises(dl.TransientDownloadError):
            dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body))
        assert os.listdir(tmp_path) == [".tmp-c.txt.part"]
        dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body))
    assert (tmp_path / "c.txt").read_bytes() == body
    assert server.requests == [("/c.txt", None), ("/c.txt", None)]
    assert os.listdir(tmp_path) == ["c.txt"]


def test_server_without_range_support_restarts_from_zero(tmp_path, body):
    with FileServer(files={"/c.txt": body}, truncate={"/c.txt": 1}, ranges=False) as server:
        with pytest.raises(dl.TransientDownloadError):
            dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body))
        dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body))
    assert (tmp_path / "c.txt").read_bytes() == body
    # The 200 to the ranged request is the whole file: it is used, with no third request.
    assert server.requests == [("/c.txt", None), ("/c.txt", f"bytes={len(body) // 2}-")]
    assert os.listdir(tmp_path) == ["c.txt"]


def test_file_changed_since_the_part_was_begun_is_fetched_whole(tmp_path, body):
    new = os.urandom(len(body))
    with FileServer(files={"/c.txt": body}, truncate={"/c.txt": 1}) as server:
        with pytest.raises(dl.TransientDownloadError):
            dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body))
        old_etag = server.etag_of("/c.txt")
        server.files["/c.txt"] = new
        dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(new))
    assert (tmp_path / "c.txt").read_bytes() == new
    assert server.requests == [("/c.txt", None), ("/c.txt", f"bytes={len(body) // 2}-")]
    assert server.headers[1]["If-Range"] == old_etag != server.etag_of("/c.txt")
    assert os.listdir(tmp_path) == ["c.txt"]


def test_server_ignoring_if_range_is_caught_by_the_206s_etag(tmp_path, body, caplog):
    new = os.urandom(len(body))  # same length: only the validator tells the two files apart
    with FileServer(files={"/c.txt": body}, truncate={"/c.txt": 1}, if_range=False) as server:
        with pytest.raises(dl.TransientDownloadError):
            dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body))
        old_etag = server.etag_of("/c.txt")
        server.files["/c.txt"] = new
        with caplog.at_level("INFO", logger="llm.download"):
            dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(new), label="c")
    assert (tmp_path / "c.txt").read_bytes() == new
    assert server.requests == [("/c.txt", None), ("/c.txt", f"bytes={len(body) // 2}-"), ("/c.txt", None)]
    assert (f"c: the server ignored If-Range: its 206 is of {server.etag_of('/c.txt')}, the part file of {old_etag}; "
            "downloading from the start") in caplog.messages


class Killed(BaseException):
    """Stands for the process being killed: nothing in the library catches it."""


def kill_before_rename(monkeypatch) -> None:
    """Make the next rename of a part file into place fail as if the process died just before it."""
    replace = os.replace

    def killed(src, dst):
        if Path(src).name.endswith(".part"):
            raise Killed
        replace(src, dst)

    monkeypatch.setattr(dl.os, "replace", killed)


def test_complete_part_answered_416_is_kept_without_another_request(tmp_path, body, monkeypatch):
    with FileServer(files={"/c.txt": body}) as server:
        with monkeypatch.context() as patch:
            kill_before_rename(patch)
            with pytest.raises(Killed):
                dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body))
        assert (tmp_path / ".tmp-c.txt.part").read_bytes() == body
        result = dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body))
    assert (result.origin, (tmp_path / "c.txt").read_bytes()) == ("network", body)
    assert server.requests == [("/c.txt", None), ("/c.txt", f"bytes={len(body)}-")]
    assert server.headers[1]["If-Range"] == server.etag_of("/c.txt")
    assert os.listdir(tmp_path) == ["c.txt"]


@pytest.mark.parametrize("case", ["unpinned", "corrupt"])
def test_416_on_a_part_that_cannot_be_kept_restarts_from_zero_once(tmp_path, body, monkeypatch, caplog, case):
    pinned = None if case == "unpinned" else sha(body)
    with FileServer(files={"/c.txt": body}) as server:
        with monkeypatch.context() as patch:
            kill_before_rename(patch)
            with pytest.raises(Killed):
                dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", pinned)
        if case == "corrupt":
            (tmp_path / ".tmp-c.txt.part").write_bytes(b"x" * len(body))
        with caplog.at_level("INFO", logger="llm.download"):
            dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", pinned, label="c")
    assert (tmp_path / "c.txt").read_bytes() == body
    assert server.requests == [("/c.txt", None), ("/c.txt", f"bytes={len(body)}-"), ("/c.txt", None)]
    what = "unpinned" if case == "unpinned" else f"sha256 {sha(b'x' * len(body))}, not the pinned one"
    assert (f"c: the server has nothing past the part file's {len(body):,} bytes (HTTP 416), which are {what}; "
            "downloading from the start") in caplog.messages
    assert os.listdir(tmp_path) == ["c.txt"]


@pytest.mark.parametrize("content_range, reason", [
    ("bytes 0-{end}/{total}", "the server resumed at byte 0, not at the part file's end, byte {half} "
                              "(Content-Range 'bytes 0-{end}/{total}')"),
    ("bytes {half}-{end}/{more}", "the 206 response's Content-Range 'bytes {half}-{end}/{more}' and Content-Length "
                                  "{rest} do not make the rest of one file"),
    ("octets {half}-{end}", "the 206 response's Content-Range 'octets {half}-{end}' is not bytes START-END/TOTAL"),
])
def test_a_206_that_does_not_continue_the_part_restarts_from_zero(tmp_path, body, caplog, content_range, reason):
    numbers = {"half": len(body) // 2, "end": len(body) - 1, "total": len(body), "more": len(body) + 1,
               "rest": len(body) - len(body) // 2}
    with FileServer(files={"/c.txt": body}, truncate={"/c.txt": 1}) as server:
        with pytest.raises(dl.TransientDownloadError):
            dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body))
        server.content_range = content_range.format(**numbers)
        with caplog.at_level("INFO", logger="llm.download"):
            dl.fetch(server.url("/c.txt"), tmp_path / "c.txt", sha(body), label="c")
    assert (tmp_path / "c.txt").read_bytes() == body
    assert server.requests == [("/c.txt", None), ("/c.txt", f"bytes={len(body) // 2}-"), ("/c.txt", None)]
    assert f"c: {reason.format(**numbers)}; downloading from the start" in caplog.messages
    assert os.listdir(tmp_path) == ["c.txt"]


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


# --- a member of a zip archive ------------------------------------------------------------------------

MEMBER = "data/spam.tsv"
ROWS = b"".join(b"ham\tsee you at %d\nspam\tWIN %d NOW\n" % (i, i) for i in range(2000))


def make_zip(files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture
def archive() -> bytes:
    return make_zip({"readme": b"about the data", "data/": b"", MEMBER: ROWS})


@pytest.fixture
def raw(tmp_path) -> Path:
    """dest's folder, holding a file of another source: a failure must leave that, and only that."""
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "other.txt").write_text("another source's file")
    return folder


def test_archive_member_is_extracted_with_both_hashes_checked(raw, archive):
    with FileServer(files={"/a.zip": archive}) as server:
        result = dl.fetch(server.url("/a.zip"), raw / "spam.tsv", sha(archive), member=MEMBER, member_sha256=sha(ROWS))
        again = dl.fetch(server.url("/a.zip"), raw / "spam.tsv", sha(archive), member=MEMBER, member_sha256=sha(ROWS))
    assert (result.origin, result.sha256, result.archive_sha256, result.bytes) == ("network", sha(ROWS), sha(archive),
                                                                                  len(ROWS))
    assert (raw / "spam.tsv").read_bytes() == ROWS
    assert (again.origin, len(server.requests)) == ("present", 1)
    assert sorted(os.listdir(raw)) == ["other.txt", "spam.tsv"]  # no archive, part or sidecar left


def test_an_archive_download_that_broke_off_resumes_and_leaves_only_the_member(raw, archive):
    with FileServer(files={"/a.zip": archive}, truncate={"/a.zip": 1}) as server:
        with pytest.raises(dl.TransientDownloadError):
            dl.fetch(server.url("/a.zip"), raw / "spam.tsv", sha(archive), member=MEMBER, member_sha256=sha(ROWS))
        assert sorted(os.listdir(raw)) == [".tmp-.tmp-spam.tsv.zip.part", ".tmp-.tmp-spam.tsv.zip.part.json",
                                           "other.txt"]  # kept for the next attempt
        dl.fetch(server.url("/a.zip"), raw / "spam.tsv", sha(archive), member=MEMBER, member_sha256=sha(ROWS))
    assert server.requests == [("/a.zip", None), ("/a.zip", f"bytes={len(archive) // 2}-")]
    assert (raw / "spam.tsv").read_bytes() == ROWS
    assert sorted(os.listdir(raw)) == ["other.txt", "spam.tsv"]


def test_archive_member_from_a_local_path_and_a_file_url(tmp_path, archive):
    (tmp_path / "a.zip").write_bytes(archive)
    for url, folder in [(str(tmp_path / "a.zip"), tmp_path / "x"), ((tmp_path / "a.zip").as_uri(), tmp_path / "y")]:
        result = dl.fetch(url, folder / "spam.tsv", sha(archive), member=MEMBER, member_sha256=sha(ROWS))
        assert (result.origin, (folder / "spam.tsv").read_bytes()) == ("local", ROWS)
        assert os.listdir(folder) == ["spam.tsv"]


def test_unpinned_archive_and_member_warn_with_the_hashes_to_pin(tmp_path, archive, caplog):
    (tmp_path / "a.zip").write_bytes(archive)
    with caplog.at_level("WARNING", logger="llm.download"):
        dl.fetch(str(tmp_path / "a.zip"), tmp_path / "raw" / "spam.tsv", None, label="spam", member=MEMBER)
    assert caplog.messages == [
        f"spam: no sha256 pinned; the archive has sha256 {sha(archive)}: add it to params.yaml",
        f"spam: no member_sha256 pinned; the member extracted has sha256 {sha(ROWS)}: add it to params.yaml",
    ]


def test_a_mirror_holding_the_member_needs_no_archive(tmp_path, archive, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "spam.tsv").write_bytes(ROWS)
    monkeypatch.setenv(dl.MIRROR_ENV, str(mirror))
    dest = tmp_path / "raw" / "spam.tsv"
    # A port nothing listens on: only the mirror can have given the file.
    result = dl.fetch(closed_port_url("/a.zip"), dest, sha(archive), member=MEMBER, member_sha256=sha(ROWS))
    assert (result.origin, result.archive_sha256, dest.read_bytes()) == ("mirror", sha(archive), ROWS)
    assert os.listdir(dest.parent) == ["spam.tsv"]


def test_a_mirror_holding_the_archive_gives_the_member(raw, tmp_path, archive, caplog):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "a.zip").write_bytes(archive)
    (mirror / "spam.tsv").write_bytes(b"a stale copy of the member")  # not the pinned one: passed over
    with caplog.at_level("WARNING", logger="llm.download"):
        result = dl.fetch(closed_port_url("/path/a.zip?sig=x"), raw / "spam.tsv", sha(archive), mirror_dir=mirror,
                          label="spam", member=MEMBER, member_sha256=sha(ROWS))
    assert (result.origin, result.archive_sha256, (raw / "spam.tsv").read_bytes()) == ("mirror", sha(archive), ROWS)
    assert caplog.messages == [f"spam: mirror file {mirror / 'spam.tsv'} has sha256 "
                               f"{sha(b'a stale copy of the member')}, not {sha(ROWS)}; ignoring it"]
    assert sorted(os.listdir(raw)) == ["other.txt", "spam.tsv"]


def test_a_member_missing_from_the_archive_is_named_with_the_archives_files(raw):
    files = {f"f{i:02}.txt": b"x" for i in range(12)}
    archive = make_zip({"docs/": b"", **files})
    with FileServer(files={"/a.zip": archive}) as server:
        with pytest.raises(dl.DownloadError) as info:
            dl.fetch_with_retries(server.url("/a.zip?sig=s3cr3t-sig"), raw / "spam.tsv", sha(archive), label="spam",
                                  member="spam.tsv", retry_delay_s=0)
    assert not isinstance(info.value, dl.TransientDownloadError) and len(server.requests) == 1
    listed = "".join(f"\n  f{i:02}.txt" for i in range(10))
    assert str(info.value) == (f"spam: the archive {server.url('/a.zip')} has no member 'spam.tsv'; fix the source's "
                               f"member in params.yaml. Its files:{listed}\n  and 2 more")
    assert os.listdir(raw) == ["other.txt"]


def corrupted(archive: bytes, name: str) -> bytes:
    """`archive` with a byte in the middle of `name`'s stored data changed."""
    info = zipfile.ZipFile(io.BytesIO(archive)).getinfo(name)
    at = info.header_offset + 30 + len(info.filename.encode()) + info.compress_size // 2  # no extra field written
    return archive[:at] + bytes([archive[at] ^ 0xFF]) + archive[at + 1:]


@pytest.mark.parametrize("case", ["not a zip", "truncated", "stored bytes changed", "deflated bytes changed"])
def test_a_file_that_is_not_a_zip_or_is_corrupt_fails_for_good(raw, archive, case):
    bad = {
        "not a zip": lambda: b"<html>a page, not the archive</html>",
        "truncated": lambda: archive[: len(archive) // 2],
        "stored bytes changed": lambda: corrupted(make_zip({MEMBER: ROWS}, zipfile.ZIP_STORED), MEMBER),
        "deflated bytes changed": lambda: corrupted(archive, MEMBER),
    }[case]()
    with FileServer(files={"/a.zip": bad}) as server:
        with pytest.raises(dl.DownloadError) as info:  # pinned as served: the bytes are what the source holds
            dl.fetch(server.url("/a.zip"), raw / "spam.tsv", sha(bad), label="spam", member=MEMBER,
                     member_sha256=sha(ROWS))
    assert not isinstance(info.value, (dl.TransientDownloadError, dl.ChecksumMismatch))
    assert str(info.value).startswith(f"spam: {server.url('/a.zip')} is not a zip archive, or a corrupt one (")
    assert str(info.value).endswith("); check the source's url in params.yaml, or remove member: if the file is not "
                                    "an archive")
    assert os.listdir(raw) == ["other.txt"]


@pytest.mark.parametrize("where", ["http", "local"])
def test_an_archive_of_another_hash_fails_for_good(raw, tmp_path, archive, where):
    wrong = "0" * 64
    (tmp_path / "a.zip").write_bytes(archive)
    with FileServer(files={"/a.zip": archive}) as server:
        url = server.url("/a.zip") if where == "http" else str(tmp_path / "a.zip")
        with pytest.raises(dl.ChecksumMismatch) as info:
            dl.fetch(url, raw / "spam.tsv", wrong, label="spam", member=MEMBER, member_sha256=sha(ROWS))
    assert str(info.value) == (f"spam: sha256 mismatch for {url}: expected {wrong}, got {sha(archive)}. The file was "
                               "not kept; if the source changed on purpose, update its sha256 in params.yaml")
    assert os.listdir(raw) == ["other.txt"]


@pytest.mark.parametrize("where", ["http", "local"])
def test_a_member_of_another_hash_fails_for_good(raw, tmp_path, archive, where):
    wrong = "0" * 64
    (tmp_path / "a.zip").write_bytes(archive)
    (raw / "spam.tsv").write_bytes(b"the member as it was")  # kept: a failed fetch replaces nothing
    with FileServer(files={"/a.zip": archive}) as server:
        url = server.url("/a.zip") if where == "http" else str(tmp_path / "a.zip")
        with pytest.raises(dl.ChecksumMismatch) as info:
            dl.fetch(url, raw / "spam.tsv", sha(archive), label="spam", member=MEMBER, member_sha256=wrong)
    assert str(info.value) == (f"spam: sha256 mismatch for member {MEMBER!r} of {url}: expected {wrong}, got "
                               f"{sha(ROWS)}. The file was not kept; if the source changed on purpose, update its "
                               "member_sha256 in params.yaml")
    assert sorted(os.listdir(raw)) == ["other.txt", "spam.tsv"]
    assert (raw / "spam.tsv").read_bytes() == b"the member as it was"


def test_an_entry_named_to_escape_the_folder_is_refused_and_a_safe_one_beside_it_kept(raw, tmp_path):
    archive = make_zip({"../evil": b"outside", "/etc/evil": b"absolute", "good.tsv": ROWS})
    (tmp_path / "a.zip").write_bytes(archive)
    for member in ("../evil", "/etc/evil"):
        with pytest.raises(dl.DownloadError) as info:  # params.yaml refuses these; fetch's other callers too
            dl.fetch(str(tmp_path / "a.zip"), raw / "evil", sha(archive), label="x", member=member)
        assert str(info.value) == (f"x: member of {tmp_path / 'a.zip'} must be a relative path inside the archive, "
                                   f"with '/' between folders and no '..' parts, got {member!r}; write it as the "
                                   "archive lists it (python -m zipfile -l ARCHIVE), e.g. data/file.csv")
    assert os.listdir(raw) == ["other.txt"]
    result = dl.fetch(str(tmp_path / "a.zip"), raw / "good.tsv", sha(archive), member="good.tsv",
                      member_sha256=sha(ROWS))
    assert result.path.read_bytes() == ROWS
    assert sorted(os.listdir(raw)) == ["good.tsv", "other.txt"]
    assert sorted(os.listdir(tmp_path)) == ["a.zip", "raw"]  # nothing written beside the folder either


def test_the_manifest_entry_of_a_member_pins_the_stored_file_and_the_archive(tmp_path, archive):
    (tmp_path / "a.zip").write_bytes(archive)
    source = SourceConfig(name="spam", url=str(tmp_path / "a.zip"), sha256=sha(archive), member=MEMBER,
                          member_sha256=sha(ROWS), kind="tsv", columns=["label", "text"], text_field="text",
                          label_field="label", role="classification")
    raw = tmp_path / "raw"
    result = dl.fetch(source.url, dl.source_path(raw, source), source.sha256, member=source.member,
                      member_sha256=source.member_sha256)
    assert dl.manifest_entry(source, result, raw) == {
        "name": "spam", "role": "classification", "kind": "tsv", "text_field": "text", "label_field": "label",
        "columns": ["label", "text"], "file": "classification/spam.tsv", "url": source.url, "member": MEMBER,
        "sha256": sha(ROWS), "archive_sha256": sha(archive), "bytes": len(ROWS),
    }
    dl.write_manifests(raw, [dl.manifest_entry(source, result, raw)])
    assert [e["name"] for e in dl.read_sources_manifest(raw, "classification")] == ["spam"]
    assert dl.read_sources_manifest(raw, "corpus") == [] and dl.read_sources_manifest(raw, "instructions") == []
    (raw / "classification" / "gone.tsv").write_text("a source since removed")
    assert dl.prune_raw(raw, [source]) == [raw / "classification" / "gone.tsv"]


SECRETS = ("s3cr3t-pw", "s3cr3t-sig")


def test_redact_url():
    assert dl.redact_url("https://user:tok@host/a/b.txt?sig=x") == "https://host/a/b.txt"
    assert dl.redact_url("http://u:pw@127.0.0.1:8080/c.txt?a=1&sig=s#frag") == "http://127.0.0.1:8080/c.txt"
    assert dl.redact_url("https://user@[::1]:99/x") == "https://[::1]:99/x"
    assert dl.redact_url("file:///data/c.txt?x=1") == "file:///data/c.txt"
    assert dl.redact_url("https://[::1/x?sig=s3cr3t-sig") == "https://(a URL that does not parse)"
    for path in ("/data/odd?name#1.txt", "data/c.txt", "~/c.txt", "C:/data/c.txt"):
        assert dl.redact_url(path) == path


def test_credentials_and_query_reach_the_server_but_no_log_manifest_or_error(tmp_path, body, caplog):
    with FileServer(files={"/c.txt": body}, truncate={"/c.txt": 1}, auth="user:s3cr3t-pw") as server:
        url = server.url("/c.txt?sig=s3cr3t-sig", credentials="user:s3cr3t-pw")
        source = SourceConfig(name="c", url=url)
        dest = dl.source_path(tmp_path, source)
        errors = []
        with caplog.at_level("DEBUG", logger="llm.download"):
            with pytest.raises(dl.TransientDownloadError) as broke:
                dl.fetch(url, dest, None, label="c")  # unpinned, for the warning that prints its hash
            errors.append(str(broke.value))
            sidecar = (dest.parent / ".tmp-c.txt.part.json").read_text()  # a hash of the URL, not the URL
            result = dl.fetch(url, dest, None, label="c")
            for path, credentials, status in [("/gone.txt", "user:s3cr3t-pw", 404), ("/c.txt", "user:wrong", 401)]:
                with pytest.raises(dl.DownloadError) as failed:
                    dl.fetch(server.url(path + "?sig=s3cr3t-sig", credentials), tmp_path / "x" / "x.txt", None,
                             label="c")
                reason = {404: "Not Found", 401: "Unauthorized"}[status]
                assert str(failed.value) == (f"c: HTTP {status} {reason} from {server.url(path)}; "
                                             "check the source's url in params.yaml")
                errors.append(str(failed.value))
    assert dest.read_bytes() == body and dest == tmp_path / "corpus" / "c.txt"
    token = "Basic " + base64.b64encode(b"user:s3cr3t-pw").decode()
    assert [h.get("Authorization") for h in server.headers] == [token, token, token, "Basic dXNlcjp3cm9uZw=="]
    assert [r[0] for r in server.requests] == ["/c.txt?sig=s3cr3t-sig"] * 2 + ["/gone.txt?sig=s3cr3t-sig",
                                                                             "/c.txt?sig=s3cr3t-sig"]
    assert server.headers[1]["If-Range"] == server.etag_of("/c.txt")  # the resume works with credentials too
    entry = dl.manifest_entry(source, result, tmp_path)
    assert (entry["url"], entry["file"]) == (server.url("/c.txt"), "corpus/c.txt")
    assert caplog.messages and errors[0].startswith(f"c: download of {server.url('/c.txt')} ")
    shown = [json.dumps(entry), *caplog.messages, *errors, sidecar, *(p.name for p in tmp_path.rglob("*"))]
    assert not [secret for secret in SECRETS for text in shown if secret in text]


def test_logged_download_params_show_no_credentials():
    config = DownloadConfig(sources=[SourceConfig(name="c", url="https://u:s3cr3t-pw@h/c.txt?sig=s3cr3t-sig"),
                                     SourceConfig(name="d", url="/data/d.txt")])
    logged = dl.loggable_config(config)
    assert [s["url"] for s in logged["sources"]] == ["https://h/c.txt", "/data/d.txt"]
    assert logged["timeout_s"] == config.timeout_s and config.sources[0].url.endswith("s3cr3t-sig")  # not mutated
    flat = flatten({"download": logged})
    assert not [secret for secret in SECRETS if secret in flat["download.sources"]]


# --- the stage, through Prefect's real local API ------------------------------------------------------


def write_params(path, sources, retries=2, experiment="llm-pipeline"):
    lines = [f"tracking:\n  experiment: {experiment}",
             f"download:\n  retries: {retries}\n  retry_delay_s: 0\n  timeout_s: 5\n  sources:"]
    for s in sources:
        lines.append("    - " + json.dumps(s))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_download_flow_retries_transient_failures_and_writes_manifests(tmp_path, body, prefect_server):
    from flows.download import download

    import mlflow

    notes = b'[{"instruction": "i", "input": "", "output": "o"}]'
    spam = make_zip({MEMBER: ROWS})
    with FileServer(files={"/c.txt": body, "/notes.json": notes, "/spam.zip": spam},
                    fail={"/c.txt": [503], "/spam.zip": [503]}) as server:
        write_params(tmp_path / "params.yaml", [
            {"name": "c", "url": server.url("/c.txt?sig=s3cr3t-sig", "user:s3cr3t-pw"), "sha256": sha(body)},
            {"name": "notes", "url": server.url("/notes.json"), "sha256": sha(notes), "kind": "json",
             "role": "instructions"},
            {"name": "spam", "url": server.url("/spam.zip"), "sha256": sha(spam), "member": MEMBER,
             "member_sha256": sha(ROWS), "kind": "tsv", "columns": ["label", "text"], "text_field": "text",
             "label_field": "label", "role": "classification"},
        ], experiment="test-download")
        raw = tmp_path / "raw"
        (raw / "corpus").mkdir(parents=True)
        (raw / "corpus" / "old.txt").write_text("from a source since removed")
        metrics = download(str(tmp_path / "params.yaml"), str(raw), str(tmp_path / "metrics.json"))
    assert metrics == {"files": 3, "bytes": len(body) + len(notes) + len(ROWS)}
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert sorted(p.name for p in (raw / "corpus").iterdir()) == ["c.txt", "manifest.json"]
    corpus = json.loads((raw / "corpus" / "manifest.json").read_text())["sources"]
    assert corpus == [{"name": "c", "role": "corpus", "kind": "text", "text_field": None, "label_field": None,
                       "columns": None, "file": "corpus/c.txt", "url": server.url("/c.txt"), "member": None,
                       "sha256": sha(body), "archive_sha256": None, "bytes": len(body)}]
    assert sorted(p.name for p in (raw / "classification").iterdir()) == ["manifest.json", "spam.tsv"]
    (classified,) = dl.read_sources_manifest(raw, "classification")
    assert (classified["file"], classified["sha256"], classified["archive_sha256"]) == ("classification/spam.tsv",
                                                                                         sha(ROWS), sha(spam))
    everything = json.loads((raw / "manifest.json").read_text())["sources"]
    assert [e["name"] for e in everything] == ["c", "notes", "spam"]
    # The sources are fetched concurrently: only c's requests (a 503, then the file) carry its credentials.
    assert [path for path, _ in server.requests if path.startswith("/c.txt")] == ["/c.txt?sig=s3cr3t-sig"] * 2
    assert sum("Authorization" in headers for headers in server.headers) == 2

    # What the run logged to MLflow (the session's store, see conftest): the settings and the manifest.
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("test-download").experiment_id])
    assert run.info.status == "FINISHED"
    logged = run.data.params["download.sources"]
    assert server.url("/c.txt") in logged and server.url("/notes.json") in logged
    (artifact,) = client.list_artifacts(run.info.run_id)
    manifest = Path(client.download_artifacts(run.info.run_id, artifact.path, str(tmp_path / "artifacts")))
    assert json.loads(manifest.read_text())["sources"] == everything
    shown = [*run.data.params.values(), manifest.read_text()]
    assert not [secret for secret in SECRETS for text in shown if secret in text]


@pytest.mark.slow
def test_download_flow_does_not_retry_a_404(tmp_path, prefect_server):
    from flows.download import download

    with FileServer() as server:
        write_params(tmp_path / "params.yaml", [{"name": "c", "url": server.url("/c.txt")}], retries=3)
        with pytest.raises(dl.DownloadError, match="c: HTTP 404"):
            download(str(tmp_path / "params.yaml"), str(tmp_path / "raw"), str(tmp_path / "m.json"))
    assert len(server.requests) == 1
    assert not (tmp_path / "m.json").exists()
