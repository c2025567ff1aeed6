"""Starting `kvforge serve` as a real process on a free loopback port, for tests."""

import contextlib
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    """A loopback port nothing listens on now (whoever binds it next gets it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(*args: str, timeout_s: float = 120):
    """`kvforge serve ARGS` on a free port until /health answers; yields (process, base
    URL); the process is stopped afterwards. Its output is kept for the failure message."""
    port = free_port()  # the server binds it right after
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvforge", "serve", "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "kvforge serve did not come up"
            time.sleep(0.2)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def require_program(path: str, package: str) -> None:
    """Skip the test when Debian's `package` (`path`) is missing; fail it under CI, which
    installs it (as make test does)."""
    if os.path.exists(path):
        return
    message = f"{path} is not installed (apt-get install {package}; make test does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
