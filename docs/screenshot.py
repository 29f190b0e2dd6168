"""Refresh docs/web_app.png: start `latentdiff serve` on a trained model, generate in headless Chromium, screenshot.

    python docs/screenshot.py --model runs/demo/ldm --runs runs/demo --prompt "a large red circle in the center"

Needs Debian's chromium and the playwright package (make setup-test installs both); no browser download.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def main() -> None:
    """Serve, draw one batch in the page, write the screenshot."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--runs", default=None)
    ap.add_argument("--prompt", default="a large red circle in the center")
    ap.add_argument("--n-samples", default="4")
    ap.add_argument("--out", default=str(Path(__file__).parent / "web_app.png"))
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "latentdiff", "serve", "--model", args.model, "--port", str(port),
           "--out", "/tmp/latentdiff-screenshot", "--preview-every", "2"] + (["--runs", args.runs] if args.runs else [])
    server = subprocess.Popen(cmd)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "api/models", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.goto(url)
            page.fill("#prompt", args.prompt)
            page.fill("#steps", "25")
            page.fill("#seed", "0")
            page.fill("#n_samples", args.n_samples)
            page.click("#generate")
            expect(page.locator("#status")).to_have_text("Done (seed 0).", timeout=120_000)
            page.wait_for_function("[...document.images].every((i) => i.complete)")
            page.screenshot(path=args.out)
            browser.close()
        print(f"wrote {args.out}")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
