"""`expert ui` serves the MLflow UI on the local store, bound to 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.support.mlflow_server import free_port

pytestmark = pytest.mark.smoke


def test_ui_serves_local_store_on_loopback(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "ui", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "mlflow ui did not start in 120 s"
                time.sleep(1)
        if shutil.which("ss"):  # not on every machine; where it is, the socket must be loopback only
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
            assert {line.split()[3].rsplit(":", 1)[0] for line in listening.splitlines()} == {"127.0.0.1"}
        assert (tmp_path / "mlflow.db").is_file(), "the UI must use the working directory's SQLite store"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
