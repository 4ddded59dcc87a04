"""A real `python -m m0lite.server` process on 127.0.0.1, for the tests that need sockets."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(ckpt, log_path: Path, *flags: str):
    """Start the server on `ckpt` with `flags`; yield (base URL, process); always kill it. On exit it
    must still be alive and must never have logged an internal error (a 500)."""
    port = free_port()
    cmd = [sys.executable, "-m", "m0lite.server", "--model", str(ckpt), "--port", str(port),
           "--dtype", "float32", "--device", "cpu", *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # up to 60 s
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"server did not come up:\n{log_path.read_text()[-3000:]}")
        yield url, proc
        assert proc.poll() is None, f"server died:\n{log_path.read_text()[-3000:]}"
        assert "internal error" not in log_path.read_text(), log_path.read_text()[-5000:]  # no 500 ever
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
