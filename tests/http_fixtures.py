"""A static HTTP server on the loopback interface that serves a directory, with faults chosen by
the first path component (so processes that only know the URL get the fault too):

  /ok/NAME       the file
  /drop/NAME     a .tar file's first GET sends the full Content-Length, half the bytes, then
                 closes the connection; later GETs are served normally (Range honoured)
  /norange/NAME  like /drop/, and Range headers are ignored (always 200 with the whole file)
  /corrupt/NAME  train .tar files with one byte flipped inside the first sample's tokens
  /gone/NAME     404 for train .tar files
  /short/NAME    train .tar files served complete but 1000 bytes short (a truncated upload)

Every request is recorded (`server.requests`: (mode, name, Range header or None)).
"""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

MODES = ("ok", "drop", "norange", "corrupt", "gone", "short")


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        mode, _, name = self.path.lstrip("/").partition("/")
        rng = self.headers.get("Range")
        with self.server.lock:
            self.server.requests.append((mode, name, rng))
            first = (mode, name) not in self.server.seen
            self.server.seen.add((mode, name))
        path = self.server.root / name
        shard = name.endswith(".tar")
        train_shard = shard and name.startswith("train-")
        if mode not in MODES or not path.is_file() or (mode == "gone" and train_shard):
            self.send_error(404)
            return
        data = path.read_bytes()
        if mode == "corrupt" and train_shard:
            data = bytearray(data)
            data[512 + 2] ^= 0x01
            data = bytes(data)
        if mode == "short" and train_shard:
            data = data[:-1000]
        start = 0
        if rng and mode != "norange":
            start = int(rng.split("=")[1].split("-")[0])
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if mode in ("drop", "norange") and shard and first:
            self.wfile.write(data[start:start + (len(data) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(data[start:])


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str | None]] = []
        self.seen: set[tuple[str, str]] = set()

    def url(self, mode: str = "ok") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{mode}/"


def serve(root: Path) -> _Server:
    """Start serving `root` on 127.0.0.1 (a free port); call `.shutdown()` when done."""
    server = _Server(root)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
