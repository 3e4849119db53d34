"""Start `app.py` in a subprocess, wait until it answers, stop it with everything it forked: the one copy of
this idea, used by the load test, the screenshots, the benchmark's start-up timing and the end-to-end tests.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .data import PROJECT_ROOT

STARTUP_TIMEOUT = 120.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = STARTUP_TIMEOUT,
               path: str = "config", poll: float = 0.5) -> None:
    """Poll `url + path` until it answers 200; raises if the process died first or the timeout passed."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"app.py exited with code {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url + path, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(poll)
    raise TimeoutError(f"the app did not answer on {url} within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop the app and every process of its group (ZeroGPU workers outlive a terminated parent)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone
            break
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived the app
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def start(cmd: list[str], port: int, log: str | Path, cwd: str | Path = PROJECT_ROOT, env: dict | None = None,
          timeout: float = STARTUP_TIMEOUT) -> tuple[subprocess.Popen, str]:
    """Run `cmd` (an app listening on `port`) in its own process group, output to `log`; (process, url) once
    it answers. A failed start stops it and raises with the log's tail. The caller must `stop` it."""
    out = open(log, "w+")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.stdout = out  # closed with the process object; tests read the log from it
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_ready(url, proc, timeout)
    except Exception as e:
        stop(proc)
        out.seek(0)
        raise RuntimeError(f"{e}\n--- app log ---\n{out.read()[-4000:]}") from e
    return proc, url


@contextlib.contextmanager
def app_server(args: list[str], log: str | Path, env: dict | None = None,
               timeout: float = STARTUP_TIMEOUT) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python app.py ARGS` on a free loopback port; yields (url, process); always stops it."""
    port = free_port()
    full_env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, str(PROJECT_ROOT / "app.py"), "--host", "127.0.0.1", "--port", str(port), *args]
    proc, url = start(cmd, port, log, env=full_env, timeout=timeout)
    try:
        yield url, proc
    finally:
        stop(proc)
        proc.stdout.close()
