"""Fakes shared by the fetcher tests (test_http, test_majortom, test_worldcover): a network guard, a scripted
HTTP session for :func:`nycdata.sources.http.download`, and a recording ``sleep``."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any Python-level socket connection fails loudly: these tests must never reach the network.

    Autouse in every test module that imports it (``from http_fakes import no_network``)."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"test tried to open a network connection to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def quiet(_message):
    pass


class FakeResponse:
    def __init__(self, status, body=b"", headers=None, cut_after=None):
        self.status_code = status
        self.body = body
        self.headers = dict(headers or {})
        self.cut_after = cut_after  # raise ConnectionError after this many bytes
        self.closed = False

    def iter_content(self, chunk_size=1):
        chunk_size = 3  # small chunks, so a cut can happen mid-body
        sent = 0
        for i in range(0, len(self.body), chunk_size):
            if self.cut_after is not None and sent >= self.cut_after:
                raise ConnectionError("connection reset by peer")
            piece = self.body[i:i + chunk_size]
            sent += len(piece)
            yield piece

    def raise_for_status(self):
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}")

    def close(self):
        self.closed = True


class FakeSession:
    """Answers each get() with the next scripted item: a FakeResponse, an exception, or a callable(headers)."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = []

    def get(self, url, headers=None, stream=False, timeout=None):
        self.calls.append((url, dict(headers or {})))
        assert stream is True and timeout is not None
        if not self.script:
            raise AssertionError("unexpected extra request")
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item(headers or {}) if callable(item) else item


def range_server(content):
    """A callable answering like a server that honours Range."""
    def answer(headers):
        rng = headers.get("Range")
        if not rng:
            return FakeResponse(200, content, {"Content-Length": str(len(content))})
        start = int(rng.removeprefix("bytes=").rstrip("-"))
        return FakeResponse(206, content[start:], {"Content-Range": f"bytes {start}-{len(content) - 1}/{len(content)}",
                                                   "Content-Length": str(len(content) - start)})
    return answer


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)
