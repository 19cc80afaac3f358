"""JupyterLab as a way into the study: ``make lab`` (``python -m nycdata lab``) and the ``nycdata`` kernel.

The kernelspec ``nycdata`` runs this environment's interpreter, so the notebooks (whose metadata names it) open
in JupyterLab and run under ``papermill`` with the package and its pinned stack, whichever Jupyter finds them.
It is installed into ``sys.prefix`` (the virtualenv), never into the user's home.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import requests
from ipykernel.kernelspec import install as _install_kernelspec
from jupyter_core.paths import jupyter_runtime_dir

from nycdata.params import REPO_ROOT

KERNEL_NAME = "nycdata"
KERNEL_DISPLAY_NAME = "Python (nycdata)"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def install_kernel() -> Path:
    """Register (or refresh) the ``nycdata`` kernelspec for this interpreter in ``sys.prefix``; return its folder."""
    return Path(_install_kernelspec(prefix=sys.prefix, kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME))


class LabServer:
    """A JupyterLab subprocess serving ``root``; :func:`start_lab` returns it ready to answer.

    ``base_url`` is ``http://host:port``; ``url`` opens the notebooks folder with the token in it; ``headers``
    authorise API requests. :meth:`stop` (or leaving a ``with`` block) shuts it down, kernels included.
    """

    def __init__(self, proc: subprocess.Popen, host: str, port: int, token: str):
        self.proc, self.host, self.port, self.token = proc, host, port, token
        self.base_url = f"http://{host}:{port}"
        self.url = f"{self.base_url}/lab/tree/notebooks?token={token}"
        self.headers = {"Authorization": f"token {token}"}

    def __enter__(self) -> "LabServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """Shut the server and its kernels down; return its exit code."""
        return _stop(self.proc, timeout)


def start_lab(port: int = 8888, ip: str = "127.0.0.1", root: Path = REPO_ROOT, stdout=None, stderr=None,
              timeout: float = START_TIMEOUT_S) -> LabServer:
    """Start JupyterLab from this environment on ``ip``, serving ``root`` with a fresh random token and the
    ``nycdata`` kernel as default, and wait until it answers ``/api/status``.

    A busy ``port`` moves to a free one nearby (Jupyter's port retries), ``0`` takes any free one; the port used
    is read back from the server's info file. ``stdout``/``stderr`` take the server's log (default: this process's).
    """
    install_kernel()
    token = secrets.token_urlsafe(32)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.ip={ip}", f"--ServerApp.port={port}",
               f"--ServerApp.root_dir={root}", f"--MappingKernelManager.default_kernel_name={KERNEL_NAME}",
               "--ServerApp.log_level=WARN", "--LabApp.log_level=WARN"]  # our one line carries the URL
    if os.geteuid() == 0:  # containers and CI runners: Jupyter refuses root unless told; it listens on `ip` only
        command.append("--ServerApp.allow_root=True")
    # the token goes through the environment, not argv, where any user of the machine could read it in `ps`;
    # a session of its own keeps a terminal's Ctrl-C (meant for us) from reaching Jupyter's interactive prompt
    proc = subprocess.Popen(command, env={**os.environ, "JUPYTER_TOKEN": token}, stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        server = LabServer(proc, _url_host(ip), _wait_for_port(proc, timeout), token)
        _wait_until_answering(server, timeout)
    except BaseException:  # Ctrl-C while waiting included: no server is left behind
        _stop(proc, STOP_TIMEOUT_S)
        raise
    return server


def run_lab(port: int = 8888, ip: str = "127.0.0.1", log: Callable[[str], None] = print) -> int:
    """``make lab``: start JupyterLab, print its URL and serve until Ctrl-C or SIGTERM, then shut it down."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with start_lab(port=port, ip=ip) as server:
            log(f"JupyterLab: {server.url}")
            log("Ctrl-C stops it.")
            code = server.proc.wait()
            raise RuntimeError(f"JupyterLab exited by itself with code {code}; its log is above")
    except KeyboardInterrupt:  # leaving the `with` block above shut the server down
        log("JupyterLab: stopped")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    """SIGTERM stops ``run_lab`` the way Ctrl-C does, so the server is shut down either way."""
    raise KeyboardInterrupt


def _stop(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, which Jupyter answers by shutting its kernels down and exiting; SIGKILL after ``timeout`` s (its
    kernels, whose parent is then gone, exit by themselves)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _url_host(ip: str) -> str:
    if ip in ("", "0.0.0.0", "::"):  # listening everywhere: this machine reaches it on loopback
        return "127.0.0.1"
    return f"[{ip}]" if ":" in ip else ip


def _wait_for_port(proc: subprocess.Popen, timeout: float) -> int:
    """The port Jupyter bound, from the info file it writes once listening (``jpserver-<pid>.json``)."""
    info = Path(jupyter_runtime_dir()) / f"jpserver-{proc.pid}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_running(proc)
        try:
            return int(json.loads(info.read_text())["port"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):  # not yet written, or written half
            time.sleep(0.2)
    raise RuntimeError(f"JupyterLab wrote no {info} within {timeout:.0f} s; see its log above")


def _wait_until_answering(server: LabServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check_running(server.proc)
        try:
            if requests.get(f"{server.base_url}/api/status", headers=server.headers, timeout=5).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"JupyterLab did not answer {server.base_url}/api/status within {timeout:.0f} s; "
                       "see its log above")


def _check_running(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        raise RuntimeError(f"JupyterLab exited with code {proc.returncode} while starting; see its log above")
