"""A loopback HTTP server for tests: serves a directory on 127.0.0.1 only, with Range requests,
and can be told to answer 503 a few times, cut a response short, or demand a bearer token.
It stops itself after `lifetime` seconds even if a test forgets to."""
from __future__ import annotations

import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class LoopbackServer:
    def __init__(self, root: str | Path, lifetime: float = 120.0):
        self.root = Path(root).resolve()
        self.fail_times: dict[str, int] = {}  # path -> 503 answers left before it is served
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before the connection drops
        self.tokens: dict[str, str] = {}  # path prefix -> bearer token it requires
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "LoopbackServer":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._timer.cancel()
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
                server.requests.append((rel, self.headers.get("Range")))
                for prefix, token in server.tokens.items():
                    if rel.startswith(prefix) and self.headers.get("Authorization") != f"Bearer {token}":
                        return self._status(401)
                if server.fail_times.get(rel, 0) > 0:
                    server.fail_times[rel] -= 1
                    return self._status(503)
                path = (server.root / rel).resolve()
                if server.root not in path.parents or not path.is_file():
                    return self._status(404)
                data = path.read_bytes()
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and int(match.group(1)) < len(data):
                    start = int(match.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut_after.pop(rel, None)
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.close_connection = True

            def _status(self, code: int) -> None:
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler
