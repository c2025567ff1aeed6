"""A real `redis-server` (Debian's package) on a free loopback port, for tests."""

import contextlib
import shutil
import subprocess
import time

import redis

from process_util import free_port, require_program

SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@contextlib.contextmanager
def redis_server(*args: str):
    """`redis-server` bound to 127.0.0.1 on a free port, nothing saved to disk, evicting
    least recently used keys when full (as the docs tell users to set it); yields its URL.
    ARGS override. Stopped afterwards."""
    require_program(SERVER, "redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--maxmemory", "512mb", "--maxmemory-policy", "allkeys-lru", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not come up"
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
