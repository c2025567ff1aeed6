"""Take the README's screenshots of the KV cache inspector: `kvforge inspect` on the default
model under three settings, each with its demonstration workload, photographed by headless
Chromium (Debian's `chromium`, driven by Playwright) once the page has drawn a few seconds
of it.

    python docs/inspector/screenshots.py [--out docs/inspector] [--model M]
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

SHOTS = {
    "shared-prefix": ["--demo", "shared-prefix", "--host-cache-memory", "8MiB"],
    "int2": ["--demo", "shared-prefix", "--kv-dtype", "int2"],
    "streaming": ["--demo", "long", "--kv-policy", "streaming", "--kv-budget", "256"],
}
# what the picture must show before it is taken
READY = {
    "shared-prefix": "window.kvforge.last && window.kvforge.last.tiers.host_blocks > 0",
    "int2": "window.kvforge.last && window.kvforge.last.requests.length > 2",
    "streaming": "window.kvforge.last && window.kvforge.last.requests.some("
    "(r) => r.regions.dropped.length > 0)",
}
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]  # fmt: skip


def start(model: str | None, options: list[str]) -> tuple[subprocess.Popen, str]:
    """`kvforge inspect` on a free port: the process, and its page's address."""
    command = [sys.executable, "-m", "kvforge", "inspect", "--no-browser", "--port", "0",
               "--kv-memory", "48MiB", *options]  # fmt: skip
    if model:
        command += ["--model", model]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        found = re.search(r"inspector is at (\S+)", line)
        if found:
            return proc, found.group(1)
    raise RuntimeError(f"kvforge inspect exited with code {proc.wait()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent))
    parser.add_argument("--model", help="default: kvforge's default model")
    parser.add_argument("--seconds", type=float, default=20, help="load before the picture")
    args = parser.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for name, options in SHOTS.items():
            proc, url = start(args.model, options)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(url)
                time.sleep(args.seconds)
                page.wait_for_function(READY[name], timeout=300_000)
                path = Path(args.out) / f"{name}.png"
                page.screenshot(path=str(path), full_page=True)
                # a page of flat colours: a 64-colour palette keeps it readable and small
                Image.open(path).convert("RGB").quantize(64).save(path, optimize=True)
                print(f"{path}", file=sys.stderr)
                page.close()
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        browser.close()


if __name__ == "__main__":
    main()
