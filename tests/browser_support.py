"""Start `streamlit run app.py` on localhost and drive it with Playwright in the system's
Chromium: shared by the browser test and benchmarks/app_latency.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextlib.contextmanager
def streamlit_app(env_overrides: dict[str, str] | None = None, start_timeout_s: float = 90,
                  extra_args: tuple[str, ...] = (), with_process: bool = False):
    """Yields the URL of a fresh `streamlit run app.py` on a free local port (and its process,
    if asked); `extra_args` are more `streamlit run` options."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.headless",
                                "true", "--server.port", str(port), "--server.address", "127.0.0.1",
                                "--browser.gatherUsageStats", "false", *extra_args], cwd=REPO,
                               env={**os.environ, **(env_overrides or {})},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + start_timeout_s
        while True:
            try:
                urllib.request.urlopen(url + "/_stcore/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or process.poll() is not None:
                    process.kill()
                    output = process.stdout.read().decode(errors="replace")[-2000:]
                    raise RuntimeError(f"streamlit did not start: {output}") from None
                time.sleep(0.5)
        yield (url, process) if with_process else url
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextlib.contextmanager
def chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


def generate_birds(page, steps: int = 10, seed: int = 0, count: int = 4, sampler: str | None = None,
                   fixed: bool = False) -> float:
    """On the Generate page: pick `sampler` (its label, e.g. "DDIM"; None keeps the default
    DPM-Solver++), set `steps` (unless the model's steps are `fixed`, as a distilled student's are),
    `count` images and `seed`, press Generate; returns the seconds until that grid is on screen
    (a new seed tells it apart from an earlier grid)."""
    from birdgen.ui import SAMPLER_LABELS, STEP_RANGES

    page.get_by_text("birdgen — generate birds").wait_for(timeout=60_000)
    name = next(key for key, label in SAMPLER_LABELS.items() if label == (sampler or SAMPLER_LABELS["dpmpp"]))
    if sampler is not None:
        page.get_by_label("Sampler").click()
        page.get_by_role("option", name=sampler, exact=True).click()
        page.get_by_text(str(STEP_RANGES[name][2]), exact=True).first.wait_for(timeout=10_000)  # its slider is up
    if not fixed:
        page.get_by_role("slider").first.focus()  # the steps slider, which starts at its range's low end
        page.keyboard.press("Home")
        for _ in range(steps - STEP_RANGES[name][0]):
            page.keyboard.press("ArrowRight")
        page.get_by_text(str(steps), exact=True).first.wait_for(timeout=10_000)
    for label, value in (("Images", count), ("Seed", seed)):
        field = page.get_by_role("spinbutton", name=label)
        field.fill(str(value))
        field.press("Enter")
    page.wait_for_timeout(500)  # let the rerun for the new inputs settle
    pressed = time.perf_counter()
    page.get_by_role("button", name="Generate", exact=True).click()
    page.get_by_text(f"{steps} steps · seed {seed}").wait_for(timeout=120_000)
    page.locator("[data-testid='stImage'] img").first.wait_for(state="visible", timeout=30_000)
    return time.perf_counter() - pressed
