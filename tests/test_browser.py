"""End to end in a real browser: `streamlit run app.py` on localhost, driven by Playwright in
the system's Chromium. Screenshots land in test-artifacts/ for a person to look at."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.browser
ARTIFACTS = REPO / "test-artifacts"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    if chromium_path() is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    models = REPO / "models"
    env = {**os.environ, "BIRDGEN_RUNS_DIR": str(tmp_path_factory.mktemp("runs"))}
    if not any((p / "config.json").is_file() for p in models.glob("*")):
        from birdgen.checkpoint import build_model, save_model
        from birdgen.diffusion import DiffusionConfig
        from birdgen.networks import preset

        models = tmp_path_factory.mktemp("models")
        for name in ("small", "small-attn"):
            model = build_model(preset(name), DiffusionConfig())
            save_model(models / name, model.network, model.network_config, model.diffusion_config)
        env["BIRDGEN_MODELS_DIR"] = str(models)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(REPO / "app.py"), "--server.headless",
                                "true", "--server.port", str(port), "--server.address", "127.0.0.1",
                                "--browser.gatherUsageStats", "false"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/_stcore/health", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("streamlit did not start: " + process.stdout.read().decode(errors="replace")[-2000:])
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield url, browser
        browser.close()
    process.terminate()
    process.wait(timeout=30)


def test_generate_birds_in_the_browser(server):
    url, browser = server
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="networkidle")
    page.get_by_text("birdgen — generate birds").wait_for(timeout=60_000)
    slider = page.get_by_role("slider").first
    slider.focus()
    for _ in range(15):  # the DDIM steps slider starts at 25; bring it down to 10
        page.keyboard.press("ArrowLeft")
    page.get_by_text("10", exact=True).first.wait_for(timeout=10_000)
    images_field = page.get_by_label("Images")
    images_field.fill("4")
    images_field.press("Enter")
    pressed = time.perf_counter()
    page.get_by_role("button", name="Generate", exact=True).click()
    bird = page.locator("[data-testid='stImage'] img").first
    bird.wait_for(state="visible", timeout=120_000)
    seconds = time.perf_counter() - pressed
    page.get_by_text("4 images in").wait_for(timeout=30_000)
    assert bird.evaluate("img => img.naturalWidth") > 64
    page.screenshot(path=str(ARTIFACTS / "generate.png"), full_page=True)
    (ARTIFACTS / "generate-latency.txt").write_text(f"{seconds:.2f} s from Generate to 4 birds on screen\n")
    page.close()


def test_denoising_page_renders_a_frame(server):
    url, browser = server
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.goto(url + "/denoising", wait_until="networkidle")
    page.get_by_text("The denoising process").first.wait_for(timeout=60_000)
    frame = page.locator("[data-testid='stImage'] img").first
    frame.wait_for(state="visible", timeout=60_000)
    assert frame.evaluate("img => img.naturalWidth") >= 64
    page.screenshot(path=str(ARTIFACTS / "denoising.png"), full_page=True)
    page.close()
