"""HTTP for every fetcher: retries with backoff, failure classification (offline or not), resumable downloads.

:func:`with_retries` runs one remote call up to ``retries + 1`` times and tells
the two ways a fetch fails apart: :class:`OfflineError` (every attempt failed on
a connection error: the machine appears offline) and :class:`DownloadError`
(a server answered, but not with the data). :func:`download` writes a URL to a
file resumably (``.part`` + ``Range``); :func:`remote_size` asks a server for a
file's size, for a dry run's plan.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

from nycdata.sources.common import Log
from nycdata.sources.plan import ByteProgress

OFFLINE_HINT = ("Fetching needs internet: run the fetch on a connected machine, then copy the output folder "
                "together with its sources.csv to this one.")


class OfflineError(RuntimeError):
    """Every attempt to reach a remote source failed on a connection error: the machine appears offline."""


class DownloadError(RuntimeError):
    """A remote source answered, but not with the data (HTTP 4xx, or 5xx on every attempt)."""


# --------------------------------------------------------------------------- retries and classification

class Transient(Exception):
    """One attempt failed in a way worth retrying (raise it inside a :func:`with_retries` call to say so).
    kind: connection | server | interrupted."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


def _connection_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests

        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                  requests.exceptions.ChunkedEncodingError]
    except ImportError:  # pragma: no cover - requests is in the lock file
        pass
    try:
        import httpx

        types.append(httpx.TransportError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError

        types.append(LocalEntryNotFoundError)  # what hf_hub_download raises when it cannot reach the Hub
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


_GDAL_CONNECTION_RE = re.compile(r"could not resolve|couldn't resolve|couldn't connect|could not connect|"
                                 r"timed out|connection (reset|refused|timed)|network is unreachable|curl error",
                                 re.IGNORECASE)
_GDAL_SERVER_RE = re.compile(r"HTTP (response )?code:? ?(5\d\d|429)", re.IGNORECASE)


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the remote end could not be reached (requests, httpx, huggingface_hub, builtins)."""
    return isinstance(exc, _connection_error_types())


def _failure_kind(exc: BaseException) -> str | None:
    """``connection``, ``server`` or ``interrupted`` for a failure worth retrying, None for one that is not."""
    if isinstance(exc, Transient):
        return exc.kind
    if isinstance(exc, (OfflineError, DownloadError)):
        return None
    if is_connection_error(exc):
        return "connection"
    status = getattr(getattr(exc, "response", None), "status_code", None)  # requests / httpx / huggingface_hub HTTP errors
    if isinstance(status, int):
        return "server" if status == 429 or status >= 500 else None
    if type(exc).__module__.startswith("rasterio"):  # GDAL /vsicurl/ errors only say it in words
        message = str(exc)
        if _GDAL_SERVER_RE.search(message):
            return "server"
        if _GDAL_CONNECTION_RE.search(message):
            return "connection"
    return None


def with_retries(fn: Callable[[], Any], what: str, *, retries: int = 5, backoff: float = 1.0,
                 sleep: Callable[[float], Any] = time.sleep, log: Log | None = None) -> Any:
    """Call ``fn`` up to ``retries + 1`` times, sleeping ``backoff * 2**attempt`` between failures worth retrying.

    Raises :class:`OfflineError` when every attempt failed on a connection
    error, :class:`DownloadError` when some reached a server but all failed;
    any other exception propagates at once. A failure is worth retrying when it is a :class:`Transient`, a
    connection error (:func:`is_connection_error`), an HTTP 5xx / 429, or a GDAL error saying one of those.
    """
    kinds: list[str] = []
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified right below
            kind = _failure_kind(exc)
            if kind is None:
                raise
            kinds.append(kind)
            last = exc
            detail = exc.detail if isinstance(exc, Transient) else f"{type(exc).__name__}: {exc}"
            if attempt == retries:
                break
            delay = backoff * 2 ** attempt
            if isinstance(exc, Transient) and exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, 300.0))
            if log:
                log(f"  {what}: attempt {attempt + 1}/{retries + 1} failed ({detail}); retrying in {delay:g} s")
            sleep(delay)
    detail = last.detail if isinstance(last, Transient) else f"{type(last).__name__}: {last}"
    if all(k == "connection" for k in kinds):
        raise OfflineError(f"could not reach {what} after {len(kinds)} attempts (last: {detail}); this machine "
                           f"appears to be offline. {OFFLINE_HINT}") from last
    raise DownloadError(f"{what}: gave up after {len(kinds)} attempts (last: {detail})") from last


# --------------------------------------------------------------------------- HTTP download

class Response(Protocol):
    status_code: int
    headers: Mapping[str, str]

    def iter_content(self, chunk_size: int = ...) -> Iterable[bytes]: ...

    def raise_for_status(self) -> Any: ...


class Session(Protocol):
    """What :func:`download` needs of an HTTP session: ``requests.Session`` satisfies it as is. A ``head``
    method, when the session has one, gives :func:`remote_size` a plan's file sizes."""

    def get(self, url: str, headers: Mapping[str, str] | None = ..., stream: bool = ..., timeout: float = ...) -> Response: ...


class _HttpxResponse:
    def __init__(self, response):
        self._response = response
        self.status_code = response.status_code
        self.headers = response.headers

    def iter_content(self, chunk_size: int = 1 << 20):
        return self._response.iter_bytes(chunk_size)

    def raise_for_status(self):
        return self._response.raise_for_status()

    def close(self):
        self._response.close()


class _HttpxSession:
    """``requests``-style ``get(url, headers, stream, timeout)`` over an ``httpx.Client`` (used only without requests)."""

    def __init__(self):
        import httpx

        self._client = httpx.Client(follow_redirects=True)

    def get(self, url, headers=None, stream=True, timeout=60):
        request = self._client.build_request("GET", url, headers=headers, timeout=timeout)
        return _HttpxResponse(self._client.send(request, stream=True))

    def head(self, url, timeout=30, allow_redirects=True):
        return _HttpxResponse(self._client.head(url, timeout=timeout, follow_redirects=allow_redirects))


def default_session() -> Session:
    """A ``requests.Session`` when requests is installed, else an httpx adapter with the same ``get``."""
    try:
        import requests
    except ImportError:  # pragma: no cover - requests is in the lock file
        return _HttpxSession()
    session = requests.Session()
    session.headers["User-Agent"] = "nycdata-fetch (+https://github.com/)"
    return session


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def _content_range(headers) -> tuple[int | None, int | None]:
    """(start, total) from ``Content-Range: bytes START-END/TOTAL`` or ``bytes */TOTAL``."""
    value = _header(headers, "Content-Range") or ""
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value)
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _retry_after(headers) -> float | None:
    value = _header(headers, "Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def download(url: str, dest: str | Path, session: Session | None = None, retries: int = 5, backoff: float = 1.0,
             timeout: float = 60, sleep: Callable[[float], Any] = time.sleep, log: Log | None = None,
             chunk_size: int = 1 << 20, progress_every_s: float = 5.0) -> Path:
    """Download ``url`` to ``dest``, resumably; return ``dest``.

    * ``dest`` already there: nothing is requested.
    * Bytes go to ``dest.tif.part`` (``dest`` + ``.part``); if a part file
      exists the request carries ``Range: bytes=<size>-``. ``206`` appends,
      ``200`` (server ignored the range) starts the part over; ``416`` with the
      part already complete finishes. When the body is done (length checked
      against Content-Length / Content-Range) the part is renamed onto ``dest``.
    * Connection errors, timeouts, a stream cut short, HTTP 5xx and 429 are
      retried ``retries`` times after the first attempt, sleeping
      ``backoff * 2**attempt`` (1, 2, 4, ... s; at least ``Retry-After``);
      the part file is kept, so a retry resumes. Any other 4xx raises
      :class:`DownloadError` at once.
    * Every attempt failing on a connection error raises :class:`OfflineError`.
    * Progress goes to ``log`` through :class:`ByteProgress` (at most every
      ``progress_every_s`` seconds; bytes resumed from the part file count as
      already done), then one final line.
    """
    dest = Path(dest)
    if dest.exists():
        if log:
            log(f"  skip {dest.name}: already downloaded")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    session = session if session is not None else default_session()
    progress: list[ByteProgress] = []  # the last attempt's, for the final line

    def track(total: int | None, start: int) -> ByteProgress:
        progress[:] = [ByteProgress(dest.name, total, log, every_s=progress_every_s, start=start)]
        return progress[0]

    def attempt() -> None:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = session.get(url, headers=headers, stream=True, timeout=timeout)
        except Exception as exc:
            if is_connection_error(exc):
                raise Transient("connection", f"{type(exc).__name__}: {exc}") from exc
            raise
        try:
            _receive(response, url, part, offset, chunk_size, track, log)
        finally:
            close = getattr(response, "close", None)
            if callable(close):
                close()

    with_retries(attempt, url, retries=retries, backoff=backoff, sleep=sleep, log=log)
    os.replace(part, dest)
    if progress:
        progress[0].finish()
    return dest


def _receive(response: Response, url: str, part: Path, offset: int, chunk_size: int,
             track: Callable[[int | None, int], ByteProgress], log: Log | None) -> None:
    """One attempt's answer into ``part``: checks the status and the length, raises :class:`Transient` to retry."""
    status = int(response.status_code)
    if status == 416 and offset:
        _, total = _content_range(response.headers)
        if total == offset:
            track(total, offset)
            return  # the part file already holds everything
        part.unlink()
        raise Transient("server", f"HTTP 416 for range from byte {offset}; starting over")
    if status == 429 or 500 <= status < 600:
        raise Transient("server", f"HTTP {status}", _retry_after(response.headers))
    if status >= 300:
        raise DownloadError(f"{url}: HTTP {status}; not retried")
    expected: int | None = None
    start, total = _content_range(response.headers)
    if status == 206:
        if start is not None and start != offset:
            part.unlink(missing_ok=True)
            raise Transient("server", f"asked for byte {offset}, server sent from byte {start}; starting over")
        mode, expected = ("ab" if offset else "wb"), total
    else:
        if offset and log:
            log(f"  {part.name}: server ignored the Range request; restarting from byte 0")
        mode = "wb"
        length = _header(response.headers, "Content-Length")
        encoding = (_header(response.headers, "Content-Encoding") or "identity").lower()
        if length is not None and encoding == "identity":
            expected = int(length)
    progress = track(expected, offset if mode == "ab" else 0)
    with open(part, mode) as fh:
        try:
            for chunk in response.iter_content(chunk_size=chunk_size):
                if chunk:
                    fh.write(chunk)
                    progress(len(chunk))
        except Exception as exc:
            if is_connection_error(exc):
                raise Transient("interrupted", f"stream cut: {type(exc).__name__}: {exc}") from exc
            raise
    size = part.stat().st_size
    if expected is not None and size != expected:
        if size > expected:
            part.unlink()
        raise Transient("interrupted", f"got {size} of {expected} bytes")


def remote_size(url: str, session: Session | None = None, timeout: float = 30, log: Log | None = None) -> int | None:
    """The size a server announces for ``url`` (``Content-Length`` of a HEAD request), or None when it does not
    say or cannot be reached: a dry-run plan is still printed, with the size unknown."""
    session = session if session is not None else default_session()
    head = getattr(session, "head", None)
    if head is None:
        return None
    try:
        response = head(url, timeout=timeout, allow_redirects=True)
    except Exception as exc:  # noqa: BLE001 - a plan must not fail on a size
        if log:
            log(f"  {url}: size unknown (HEAD failed: {type(exc).__name__}: {exc})")
        return None
    try:
        length = _header(response.headers, "Content-Length")
        encoding = (_header(response.headers, "Content-Encoding") or "identity").lower()
        if int(response.status_code) >= 300 or length is None or encoding != "identity":
            if log:
                log(f"  {url}: size unknown (HEAD answered HTTP {response.status_code})")
            return None
        return int(length)
    finally:
        close = getattr(response, "close", None)
        if callable(close):
            close()
