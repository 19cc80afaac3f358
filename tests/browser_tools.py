"""Machinery of tests/test_browser.py: JupyterLab started as ``make lab`` starts it, code run in one of its kernels
over the Jupyter websocket protocol, and headless Chromium driven through the DevTools protocol (CDP).

Only the standard library, requests and websocket-client: no browser-automation package to pin.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import requests
import websocket

from nycdata.params import REPO_ROOT

CHROMIUM_NAMES = ("chromium", "chromium-browser")
NO_CHROMIUM = "no chromium on PATH: apt-get install chromium (Debian) to run the browser checks"


def chromium_path() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


# --- JupyterLab, started through `python -m nycdata lab` (what `make lab` runs)


class LabProcess:
    """``python -m nycdata lab --port 0`` as a subprocess; the URL comes from the line it prints."""

    def __init__(self, workdir: Path, timeout: float = 120.0):
        self.log_file = workdir / "lab.log"
        self._log = open(self.log_file, "w")
        # a page that opens Lab saves its layout as a workspace: into workdir, not the user's ~/.jupyter
        env = {**os.environ, "JUPYTERLAB_WORKSPACES_DIR": str(workdir / "workspaces")}
        self.proc = subprocess.Popen([sys.executable, "-m", "nycdata", "lab", "--port", "0"], cwd=REPO_ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self.stdout: list[str] = []
        self.url = self._wait_for_url(timeout)
        parts = urlsplit(self.url)
        self.base_url = f"{parts.scheme}://{parts.netloc}"
        self.token = parse_qs(parts.query)["token"][0]
        self.headers = {"Authorization": f"token {self.token}"}

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"`nycdata lab` exited ({self.proc.wait()}) before printing its URL: "
                                     f"{self.stdout} {self.log_file.read_text()[-3000:]}")
            self.stdout.append(line)
            if line.startswith("JupyterLab: http"):
                return line.split(" ", 1)[1]
        self.stop()
        raise AssertionError(f"`nycdata lab` printed no URL within {timeout:.0f} s: {self.stdout}")

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        response = requests.request(method, f"{self.base_url}{path}", headers=self.headers, timeout=30, **kwargs)
        response.raise_for_status()
        return response

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as a service manager would stop ``make lab``; the rest of its stdout is in ``self.stdout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        while (line := self.lines.get(timeout=10)) is not None:
            self.stdout.append(line)
        self._log.close()
        return self.proc.returncode


@dataclass
class CellResult:
    """What the kernel sent on IOPub about one execute_request (every message) and its reply's status."""
    messages: list[dict] = field(default_factory=list)
    reply_status: str | None = None

    def of_type(self, *msg_types: str) -> list[dict]:
        return [m for m in self.messages if m["msg_type"] in msg_types]

    @property
    def errors(self) -> list[dict]:
        return self.of_type("error")

    @property
    def stderr(self) -> str:
        return "".join(m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stderr")

    @property
    def stdout(self) -> str:
        return "".join(m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stdout")


class KernelChannel:
    """A kernel's websocket (``/api/kernels/<id>/channels``) in the legacy JSON framing (no subprotocol): one
    message per frame with a ``channel`` key."""

    def __init__(self, lab: LabProcess, kernel_id: str):
        ws_url = lab.base_url.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels?token={lab.token}"
        self.ws = websocket.create_connection(ws_url, timeout=30)
        self.session = uuid.uuid4().hex

    def close(self) -> None:
        self.ws.close()

    def execute(self, code: str, timeout: float = 300.0) -> CellResult:
        """Run ``code``; return once the kernel went idle after it and replied (or fail after ``timeout`` s)."""
        msg_id = uuid.uuid4().hex
        self.ws.send(json.dumps({
            "header": {"msg_id": msg_id, "session": self.session, "username": "test", "msg_type": "execute_request",
                       "version": "5.3", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "parent_header": {}, "metadata": {}, "buffers": [], "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        result, idle = CellResult(), False
        deadline = time.monotonic() + timeout
        while not (idle and result.reply_status):
            self.ws.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                message = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                raise AssertionError(f"no idle status within {timeout:.0f} s after running:\n{code}") from None
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            if message["channel"] == "iopub":
                result.messages.append(message)
                idle = idle or (message["msg_type"] == "status" and message["content"]["execution_state"] == "idle")
            elif message["channel"] == "shell" and message["msg_type"] == "execute_reply":
                result.reply_status = message["content"]["status"]
        return result


# --- headless Chromium over the DevTools protocol


class Chromium:
    """Headless Chromium with one page driven through CDP; collects console errors, uncaught exceptions and
    failed loads of every page it navigates to."""

    def __init__(self, profile: Path, timeout: float = 60.0):
        profile.mkdir(parents=True, exist_ok=True)
        # --no-sandbox: CI and containers run as root, where Chromium's sandbox refuses to start. No host name
        # resolves but this machine's 127.0.0.1: every page is checked as if offline, the same with or without a
        # network, and a page that needs one shows it
        self.proc = subprocess.Popen(
            [chromium_path() or "chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = self._devtools_port(profile / "DevToolsActivePort", timeout)
            targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            page = next(t for t in targets if t["type"] == "page")
            # suppress_origin: Chromium refuses DevTools websockets from an origin not in --remote-allow-origins
            self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        except BaseException:
            self.close()
            raise
        self._next_id = 0
        self.events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    def _devtools_port(self, active_port: Path, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited with code {self.proc.returncode} on start")
            lines = active_port.read_text().splitlines() if active_port.is_file() else []
            if lines and lines[0].isdigit():
                return int(lines[0])
            time.sleep(0.1)
        raise AssertionError(f"chromium wrote no {active_port} within {timeout:.0f} s")

    def send(self, method: str, timeout: float = 60.0, **params) -> dict:
        """One CDP command; the events that arrive meanwhile go to ``self.events``."""
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline, method)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise AssertionError(f"CDP {method} failed: {message['error']}")
                return message["result"]

    def _receive(self, deadline: float, waiting_for: str) -> dict:
        self.ws.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            message = json.loads(self.ws.recv())
        except websocket.WebSocketTimeoutException:
            raise AssertionError(f"chromium: no answer to {waiting_for} in time") from None
        if "method" in message:
            self.events.append(message)
        return message

    def load(self, url: str, timeout: float = 60.0) -> None:
        """Navigate to ``url`` and wait for its load event (images included); ``problems()`` and ``requested()``
        then tell what happened on the page since."""
        self.events.clear()
        result = self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise AssertionError(f"chromium could not open {url}: {result['errorText']}")
        deadline = time.monotonic() + timeout
        while not any(e["method"] == "Page.loadEventFired" for e in self.events):
            self._receive(deadline, f"the load event of {url}")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads since the last ``load``."""
        return page_problems(self.events)

    def requested(self) -> list[str]:
        """Every URL the page requested since the last ``load``."""
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def wait_for(self, expression: str, timeout: float = 60.0) -> bool:
        """Whether the JS ``expression`` became true within ``timeout`` s (polled)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return True
            time.sleep(0.25)
        return False

    def evaluate(self, expression: str):
        """The value of a JS expression in the page (awaited when it is a promise)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"JS failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        if getattr(self, "ws", None):
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def page_problems(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions and failed loads among CDP events, one line each."""
    problems = []
    urls = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in events
            if e["method"] == "Network.requestWillBeSent"}
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            problems.append(f"exception: {details.get('exception', {}).get('description') or details['text']}")
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            args = (str(a.get("value", a.get("description"))) for a in params["args"])
            problems.append("console.error: " + " ".join(args))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            if entry["source"] == "network":  # a failed load, which Network.loadingFailed names already
                continue
            problems.append(f"log ({entry['source']}): {entry['text']} {entry.get('url', '')}".rstrip())
        elif method == "Network.loadingFailed" and not params.get("canceled"):
            problems.append(f"load failed: {params['errorText']} {urls.get(params['requestId'], '?')[:200]}")
    return problems
