"""A real HTTP server on 127.0.0.1 that speaks Ollama's /api/chat, for judge tests: canned answers,
streamed as Ollama streams them (JSON lines, the last "done": true) or in one object, slow on request."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class OllamaServer:
    answers: list[str] = field(default_factory=list)  # the answer to each request in turn; the last repeats
    stream: bool = True  # answer in JSON lines of 3 characters each, or in one JSON object
    delay_s: float = 0.0  # wait before answering
    line_delay_s: float = 0.0  # wait after each streamed line
    error: tuple[int, str] | None = None  # answer every request with this HTTP status and {"error": ...}
    requests: list[dict] = field(default_factory=list)  # {"path", **the JSON body} of each request

    def __enter__(self) -> OllamaServer:
        server = self
        self._stop = threading.Event()  # ends the waits, so a test never waits for a slow handler
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.requests.append({"path": self.path, **body})
                    turn = len(server.requests)
                if server._stop.wait(server.delay_s):
                    return
                if server.error is not None or self.path != "/api/chat":
                    status, message = server.error or (404, "404 page not found")
                    return self._send(status, [json.dumps({"error": message}).encode()])
                answer = server.answers[min(turn, len(server.answers)) - 1]
                self._send(200, server._lines(body["model"], answer))

            def _send(self, status: int, lines: list[bytes]) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-ndjson")
                self.end_headers()
                try:
                    for line in lines:
                        self.wfile.write(line + b"\n")
                        self.wfile.flush()
                        if server._stop.wait(server.line_delay_s):
                            return
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: what a timeout does
                    pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def _lines(self, model: str, answer: str) -> list[bytes]:
        def line(content: str, done: bool) -> bytes:
            message = {"role": "assistant", "content": content}
            extra = {"done_reason": "stop", "eval_count": len(answer)} if done else {}
            return json.dumps({"model": model, "created_at": "2025-01-01T00:00:00Z", "message": message,
                               "done": done, **extra}).encode()

        if not self.stream:
            return [line(answer, True)]
        return [line(answer[i:i + 3], False) for i in range(0, len(answer), 3)] + [line("", True)]

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"
