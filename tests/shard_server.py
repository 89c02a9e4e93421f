"""A real HTTP file server for sharded data sets in tests and benchmarks (127.0.0.1, own thread).

``ThreadingHTTPServer`` with ``Range`` support (``http.server`` has none), a log of every request
(path and range), redirects from ``/r/<path>`` to ``/<path>`` (as HF Hub's ``resolve/main`` URLs
redirect to a CDN), and fault switches: cut the connection after N bytes of a path once, or serve other
bytes for a path (tampering).
"""

from __future__ import annotations

import http.server
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class ServerLog:
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    """(path, Range header or None) in arrival order."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        with self.lock:
            return [p for p, _ in self.requests]


class ShardServer:
    def __init__(self, root: Path, *, ranges: bool = True):
        self.root = Path(root)
        self.log = ServerLog()
        self.cut_once: dict[str, int] = {}
        """path → bytes after which the next response for it is cut (once)."""
        self.replace: dict[str, bytes] = {}
        """path → bytes served instead of the file."""
        self.ranges = ranges
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                rng = self.headers.get("Range")
                with server.log.lock:
                    server.log.requests.append((path, rng))
                if path.startswith("/r/"):  # like HF Hub's resolve/main/…: a redirect to the file
                    self.send_response(302)
                    self.send_header("Location", f"{server.url}{path[2:]}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path in server.replace:
                    data = server.replace[path]
                else:
                    file = (server.root / path.lstrip("/")).resolve()
                    if not file.is_relative_to(server.root.resolve()) or not file.is_file():
                        self.send_error(404)
                        return
                    data = file.read_bytes()
                status, start, end = 200, 0, len(data)
                m = _RANGE_RE.fullmatch(rng or "") if server.ranges else None
                if m:
                    start = int(m.group(1))
                    end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
                    if start >= len(data):
                        self.send_error(416)
                        return
                    status = 206
                body = data[start:end]
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                cut = server.cut_once.pop(path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # clients that hang up are expected
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


if __name__ == "__main__":  # a server process for benchmarks: prints its URL, serves until killed
    import sys

    with ShardServer(Path(sys.argv[1])) as srv:
        print(srv.url, flush=True)
        threading.Event().wait()
