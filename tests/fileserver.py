"""A real HTTP file server on 127.0.0.1 for download tests, with faults on request.

It serves `files` by path (a query string is recorded but not part of the lookup) with a strong ETag, taken
from the body's hash, and a Last-Modified. It honours `Range: bytes=N-` with a 206 and its Content-Range,
answers 416 with `Content-Range: bytes */LEN` when N is at or past the end, and honours `If-Range`: a
validator that is not the file's current one gets the whole file, 200, as RFC 9110 says. Every request's
headers are recorded, for tests to assert on what the client sent.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MODIFIED = 1_700_000_000.0  # every file's Last-Modified unless `modified` says otherwise


@dataclass
class FileServer:
    files: dict[str, bytes] = field(default_factory=dict)
    fail: dict[str, list[int]] = field(default_factory=dict)  # path -> statuses to answer first, in order
    truncate: dict[str, int] = field(default_factory=dict)  # path -> how many responses to cut in half
    ranges: bool = True  # honour Range requests with 206
    if_range: bool = True  # honour If-Range; False: a server that resumes whatever the validator says
    etag: bool = True  # send an ETag
    last_modified: bool = True  # send a Last-Modified
    modified: dict[str, float] = field(default_factory=dict)  # path -> Last-Modified, seconds since the epoch
    content_range: str | None = None  # sent on every 206 instead of the true Content-Range: a broken server
    auth: str | None = None  # "user:password" that every request must send as HTTP Basic credentials, else 401
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path and query, Range header)
    headers: list[dict[str, str]] = field(default_factory=list)  # each request's headers, in order

    def etag_of(self, path: str) -> str:
        return '"' + hashlib.sha256(self.files[path]).hexdigest()[:16] + '"'

    def last_modified_of(self, path: str) -> str:
        return formatdate(self.modified.get(path, MODIFIED), usegmt=True)

    def __enter__(self) -> FileServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                server.headers.append(dict(self.headers.items()))
                path = urlsplit(self.path).path
                if server.auth is not None:
                    expected = "Basic " + base64.b64encode(server.auth.encode()).decode()
                    if self.headers.get("Authorization") != expected:
                        self.send_error(401)
                        return
                pending = server.fail.get(path)
                if pending:
                    self.send_error(pending.pop(0))
                    return
                body = server.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                validators = []
                if server.etag:
                    validators.append(("ETag", server.etag_of(path)))
                if server.last_modified:
                    validators.append(("Last-Modified", server.last_modified_of(path)))
                if_range = self.headers.get("If-Range")
                current = if_range is None or not server.if_range or if_range in [v for _, v in validators]
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start, extra = 0, []
                if match and server.ranges and current:
                    start = int(match.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        for name, value in [("Content-Range", f"bytes */{len(body)}"), ("Content-Length", "0"),
                                            *validators]:
                            self.send_header(name, value)
                        self.end_headers()
                        return
                    self.send_response(206)
                    extra = [("Content-Range", server.content_range or f"bytes {start}-{len(body) - 1}/{len(body)}")]
                else:
                    self.send_response(200)
                payload = body[start:]
                for name, value in [("Content-Length", str(len(payload))), *validators, *extra]:
                    self.send_header(name, value)
                self.end_headers()
                if server.truncate.get(path, 0) > 0:
                    server.truncate[path] -= 1
                    payload = payload[: len(payload) // 2]
                    self.close_connection = True
                self.wfile.write(payload)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def url(self, path: str, credentials: str | None = None) -> str:
        """The URL of `path` (which may carry a query), with `user:password@` before the host if given."""
        host, port = self._httpd.server_address[:2]
        userinfo = f"{credentials}@" if credentials else ""
        return f"http://{userinfo}{host}:{port}{path}"
