"""Start the real server (`python -m app`, or another command serving app.main) as a subprocess on a free loopback port, for the benchmarks and the
end-to-end tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(checkpoint: str, tmp_path: Path, timeout: float = 60, args: Sequence[str] = ("-m", "app"),
                   **env):
    """Yields (base_url, process); the server is stopped with SIGTERM (graceful) at exit. `args`: the Python
    command line, "{port}" standing for the port (e.g. -m uvicorn app.main:app --port {port})."""
    port = free_port()
    environ = {**os.environ, "CMN_CHECKPOINT": str(checkpoint), "CMN_PORT": str(port), "CMN_HOST": "127.0.0.1",
               "CMN_FEEDBACK_PATH": str(tmp_path / "feedback.sqlite3"),
               **{f"CMN_{k.upper()}": str(v) for k, v in env.items()}}
    log = open(tmp_path / f"server-{port}.log", "ab")
    proc = subprocess.Popen([sys.executable, *(a.format(port=port) for a in args)], cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout)
        yield url, proc
    finally:
        stop(proc)
        log.close()


def server_log(tmp_path: Path, url: str) -> str:
    """What the server `running_server(..., tmp_path)` started at `url` has logged so far."""
    port = url.rsplit(":", 1)[1]
    return (tmp_path / f"server-{port}.log").read_text(errors="replace")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (a graceful drain), then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} not healthy after {timeout} s")


def wait_until(condition, what: str, timeout: float = 10):
    """condition()'s first true value within `timeout` s (an upper bound for what must happen, never an
    expectation of speed), else AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout} s: {what}")
