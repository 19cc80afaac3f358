"""A local HTTP server on 127.0.0.1 that the real client libraries talk to (pystac-client, huggingface_hub, GDAL).

Static files are served with ``HEAD`` and ``Range`` support (GDAL's /vsicurl/ and
``HfFileSystem`` read by ranges); dynamic routes answer JSON APIs (a STAC API's
``/search``, the Hub's ``/api/...``). Every request is recorded, so a test can
assert what a client asked for.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

# handler(method, path, query, body) -> (status, headers, body) or None to fall through to the static files
Route = Callable[[str, str, dict, bytes], "tuple[int, dict, bytes] | None"]


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict
    body: bytes


@dataclass
class LocalServer:
    files: dict[str, bytes] = field(default_factory=dict)  # URL path ("/a/b.tif") -> content
    routes: list[tuple[str, Route]] = field(default_factory=list)  # (path regex, handler), first match wins
    file_headers: dict[str, dict] = field(default_factory=dict)  # extra headers per static path (ETag, X-Repo-Commit)
    requests: list[Request] = field(default_factory=list)
    base_url: str = ""

    def add_file(self, path: str, content: bytes, **headers) -> str:
        self.files[path] = content
        if headers:
            self.file_headers[path] = {k.replace("_", "-"): v for k, v in headers.items()}
        return self.base_url + path

    def route(self, pattern: str, handler: Route) -> None:
        self.routes.append((pattern, handler))

    def json(self, status: int, payload) -> tuple[int, dict, bytes]:
        return status, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def _handler(server: LocalServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def _answer(self, method: str) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            query = {k: v if len(v) > 1 else v[0] for k, v in parse_qs(url.query).items()}
            server.requests.append(Request(method, url.path, query, dict(self.headers), body))
            for pattern, handle in server.routes:
                if re.fullmatch(pattern, url.path):
                    answer = handle(method, url.path, query, body)
                    if answer is not None:
                        return self._send(method, *answer)
            content = server.files.get(url.path)
            if content is None:
                return self._send(method, 404, {"Content-Type": "text/plain"}, b"not found")
            headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                       **server.file_headers.get(url.path, {})}
            wanted = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "") or "")
            if wanted and content:
                start = int(wanted.group(1)) if wanted.group(1) else max(0, len(content) - int(wanted.group(2)))
                end = int(wanted.group(2)) if wanted.group(1) and wanted.group(2) else len(content) - 1
                end = min(end, len(content) - 1)
                if start >= len(content):
                    return self._send(method, 416, {"Content-Range": f"bytes */{len(content)}"}, b"")
                headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
                return self._send(method, 206, headers, content[start:end + 1])
            return self._send(method, 200, headers, content)

        def _send(self, method: str, status: int, headers: dict, body: bytes) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, str(value))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(body)

        def do_GET(self):
            self._answer("GET")

        def do_HEAD(self):
            self._answer("HEAD")

        def do_POST(self):
            self._answer("POST")

    return Handler


class running:
    """``with running(LocalServer()) as server:`` serves on a free 127.0.0.1 port until the block ends."""

    def __init__(self, server: LocalServer):
        self.server = server

    def __enter__(self) -> LocalServer:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.server))
        self._httpd.daemon_threads = True
        self.server.base_url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self.server

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def allow_only_loopback(monkeypatch) -> None:
    """Python-level connections to anything but 127.0.0.1 fail loudly (GDAL's C sockets are not covered:
    tests give it only 127.0.0.1 URLs)."""
    connect, connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guarded(original):
        def check(self, address, *args, **kwargs):
            host = address[0] if isinstance(address, tuple) else address
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise AssertionError(f"test tried to open a network connection to {address}")
            return original(self, address, *args, **kwargs)
        return check

    monkeypatch.setattr(socket.socket, "connect", guarded(connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(connect_ex))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
