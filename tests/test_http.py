"""nycdata.sources.http without a network: resumable downloads against a scripted session, retry classification."""

from __future__ import annotations

import socket

import pytest
from http_fakes import FakeResponse, FakeSession, Sleeps, no_network, range_server  # noqa: F401 - no_network: autouse

from nycdata.sources import http
from nycdata.sources.http import DownloadError, OfflineError, download


def test_network_guard_is_active():
    with pytest.raises(AssertionError, match="network"):
        socket.socket().connect(("198.51.100.1", 80))


CONTENT = bytes(range(256)) * 4
URL = "https://example.invalid/data/file.tif"


def test_download_fresh(tmp_path):
    session = FakeSession([range_server(CONTENT)])
    dest = download(URL, tmp_path / "a" / "file.tif", session=session, sleep=Sleeps())
    assert dest.read_bytes() == CONTENT
    assert session.calls == [(URL, {})]
    assert not (tmp_path / "a" / "file.tif.part").exists()


def test_download_resumes_with_range_206(tmp_path):
    dest = tmp_path / "file.tif"
    part = tmp_path / "file.tif.part"
    part.write_bytes(CONTENT[:100])
    session = FakeSession([range_server(CONTENT)])
    download(URL, dest, session=session, sleep=Sleeps())
    assert session.calls[0][1] == {"Range": "bytes=100-"}
    assert dest.read_bytes() == CONTENT
    assert not part.exists()


def test_download_restarts_when_server_ignores_range(tmp_path):
    dest = tmp_path / "file.tif"
    (tmp_path / "file.tif.part").write_bytes(b"GARBAGE-FROM-AN-OLD-ATTEMPT")
    session = FakeSession([FakeResponse(200, CONTENT, {"Content-Length": str(len(CONTENT))})])
    download(URL, dest, session=session, sleep=Sleeps())
    assert session.calls[0][1]["Range"] == "bytes=27-"
    assert dest.read_bytes() == CONTENT


def test_download_retries_503_with_exponential_backoff(tmp_path):
    sleeps = Sleeps()
    session = FakeSession([FakeResponse(503), FakeResponse(503), FakeResponse(502), range_server(CONTENT)])
    download(URL, tmp_path / "file.tif", session=session, sleep=sleeps, retries=5, backoff=1.0)
    assert sleeps == [1, 2, 4]
    assert len(session.calls) == 4
    assert (tmp_path / "file.tif").read_bytes() == CONTENT


def test_download_backoff_scales_and_honours_retry_after(tmp_path):
    sleeps = Sleeps()
    session = FakeSession([FakeResponse(503), FakeResponse(429, headers={"Retry-After": "7"}), range_server(CONTENT)])
    download(URL, tmp_path / "file.tif", session=session, sleep=sleeps, backoff=0.5)
    assert sleeps == [0.5, 7.0]


def test_download_404_fails_at_once(tmp_path):
    sleeps = Sleeps()
    session = FakeSession([FakeResponse(404), range_server(CONTENT)])
    with pytest.raises(DownloadError, match="404"):
        download(URL, tmp_path / "file.tif", session=session, sleep=sleeps)
    assert len(session.calls) == 1 and sleeps == []
    assert not (tmp_path / "file.tif").exists()


def test_download_all_connection_errors_is_offline_error(tmp_path):
    sleeps = Sleeps()
    session = FakeSession([ConnectionError("Name or service not known")] * 4)
    with pytest.raises(OfflineError) as info:
        download(URL, tmp_path / "file.tif", session=session, sleep=sleeps, retries=3)
    message = str(info.value)
    assert URL in message and "offline" in message and "sources.csv" in message
    assert len(session.calls) == 4 and sleeps == [1, 2, 4]
    assert not (tmp_path / "file.tif").exists()


def test_download_5xx_to_the_end_is_not_offline(tmp_path):
    session = FakeSession([FakeResponse(500)] * 3)
    with pytest.raises(DownloadError, match="gave up after 3 attempts"):
        download(URL, tmp_path / "file.tif", session=session, sleep=Sleeps(), retries=2)


def test_download_existing_dest_is_skipped(tmp_path):
    dest = tmp_path / "file.tif"
    dest.write_bytes(b"already here")
    session = FakeSession([])  # any request would raise
    assert download(URL, dest, session=session, sleep=Sleeps()) == dest
    assert session.calls == [] and dest.read_bytes() == b"already here"


def test_download_stream_cut_resumes_from_kept_bytes(tmp_path):
    sleeps = Sleeps()
    cut = FakeResponse(200, CONTENT, {"Content-Length": str(len(CONTENT))}, cut_after=300)
    session = FakeSession([cut, range_server(CONTENT)])
    download(URL, tmp_path / "file.tif", session=session, sleep=sleeps)
    assert session.calls[1][1] == {"Range": "bytes=300-"}
    assert (tmp_path / "file.tif").read_bytes() == CONTENT
    assert sleeps == [1] and cut.closed


def test_download_short_body_is_retried(tmp_path):
    short = FakeResponse(200, CONTENT[:10], {"Content-Length": str(len(CONTENT))})
    session = FakeSession([short, range_server(CONTENT)])
    download(URL, tmp_path / "file.tif", session=session, sleep=Sleeps())
    assert session.calls[1][1] == {"Range": "bytes=10-"}
    assert (tmp_path / "file.tif").read_bytes() == CONTENT


def test_download_416_with_complete_part_finishes(tmp_path):
    (tmp_path / "file.tif.part").write_bytes(CONTENT)
    session = FakeSession([FakeResponse(416, headers={"Content-Range": f"bytes */{len(CONTENT)}"})])
    download(URL, tmp_path / "file.tif", session=session, sleep=Sleeps())
    assert (tmp_path / "file.tif").read_bytes() == CONTENT


def test_download_reports_bytes_counting_the_resumed_part(tmp_path):
    (tmp_path / "file.tif.part").write_bytes(CONTENT[:100])
    lines = []
    download(URL, tmp_path / "file.tif", session=FakeSession([range_server(CONTENT)]), sleep=Sleeps(),
             log=lines.append, progress_every_s=0)
    assert lines[0].startswith("  file.tif: 103 B of 1.0 KiB (10%)")  # 100 resumed + the first 3-byte chunk
    assert lines[-1].startswith("  file.tif: 1.0 KiB of 1.0 KiB (100%)") and lines[-1].endswith(" done")


# --------------------------------------------------------------------------- retry classification

def test_retry_classifies_gdal_http_errors():
    from rasterio.errors import RasterioIOError

    sleeps = Sleeps()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RasterioIOError("HTTP response code: 503")
        return "ok"

    assert http.with_retries(flaky, "cog", sleep=sleeps) == "ok" and sleeps == [1, 2]
    with pytest.raises(RasterioIOError):
        http.with_retries(lambda: (_ for _ in ()).throw(RasterioIOError("HTTP response code: 404")), "cog", sleep=sleeps)
    with pytest.raises(OfflineError, match="cog"):
        http.with_retries(lambda: (_ for _ in ()).throw(RasterioIOError("CURL error: Could not resolve host: x")), "cog",
                     retries=1, sleep=Sleeps())
