"""Start a real ``mlflow server`` subprocess for tests.

    with mlflow_server(tmp_path) as uri:          # "http://127.0.0.1:PORT"
        client = mlflow.MlflowClient(uri)

The server uses a SQLite backend store and proxied artifact serving
(``--artifacts-destination``), both under ``workdir``, so runs, registered
models and artifacts all live in the test's temp directory.  Its stdout and
stderr go to ``workdir/mlflow-server.log``; that log's tail is included in the
error when the server fails to come up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["mlflow_server", "free_port", "server_command"]

LOG_NAME = "mlflow-server.log"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(workdir: Path, port: int) -> list[str]:
    workdir = Path(workdir).resolve()
    return [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", str(workdir / "artifacts"),
        "--workers", "1",
    ]


def _tail(path: Path, n: int = 60) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    return "\n".join(lines[-n:])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def _stop(proc: subprocess.Popen, grace: float = 15) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@contextmanager
def mlflow_server(workdir: Path, timeout: float = 180) -> Iterator[str]:
    """Run ``mlflow server`` on a free port; yield its tracking URI."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "artifacts").mkdir(exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = workdir / LOG_NAME
    env = dict(os.environ)
    # no job runner: its six huey consumers (~270 MB each) serve MLflow's GenAI jobs, which no test uses
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    # A tracking URI inherited from the test environment must not redirect the
    # server's own client-side code paths.
    env.pop("MLFLOW_TRACKING_URI", None)

    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            server_command(workdir, port),
            cwd=workdir, env=env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with code {proc.returncode} before becoming "
                    f"healthy; log tail ({log_path}):\n{_tail(log_path)}"
                )
            if _healthy(f"{uri}/health"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server not healthy at {uri} after {timeout:.0f}s; "
                    f"log tail ({log_path}):\n{_tail(log_path)}"
                )
            time.sleep(0.5)
        yield uri
    finally:
        _stop(proc)
