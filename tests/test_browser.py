"""End to end in a real browser: `streamlit run app.py` on localhost, driven by Playwright in
the system's Chromium. Screenshots land in test-artifacts/ for a person to look at."""

import pytest

from browser_support import REPO, chromium, chromium_path, generate_four_birds, streamlit_app

pytestmark = pytest.mark.browser
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def browser_and_url(tmp_path_factory):
    pytest.importorskip("playwright.sync_api")
    if chromium_path() is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    env = {"BIRDGEN_RUNS_DIR": str(tmp_path_factory.mktemp("runs"))}
    if not any((p / "config.json").is_file() for p in (REPO / "models").glob("*")):
        from birdgen.checkpoint import build_model, save_model
        from birdgen.diffusion import DiffusionConfig
        from birdgen.networks import preset

        models = tmp_path_factory.mktemp("models")
        for name in ("small", "small-attn"):
            model = build_model(preset(name), DiffusionConfig())
            save_model(models / name, model.network, model.network_config, model.diffusion_config)
        env["BIRDGEN_MODELS_DIR"] = str(models)
    with streamlit_app(env) as url, chromium() as browser:
        yield browser, url


def test_generate_birds_in_the_browser(browser_and_url):
    browser, url = browser_and_url
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="networkidle")
    seconds = generate_four_birds(page, steps=10)
    assert page.get_by_text("ddim · 10 steps").count() == 1  # the slider change reached the run
    bird = page.locator("[data-testid='stImage'] img").first
    assert bird.evaluate("img => img.naturalWidth") > 64
    page.screenshot(path=str(ARTIFACTS / "generate.png"), full_page=True)
    (ARTIFACTS / "generate-latency.txt").write_text(f"{seconds:.2f} s from Generate to 4 birds on screen\n")
    page.close()


def test_denoising_page_renders_a_frame(browser_and_url):
    browser, url = browser_and_url
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.goto(url + "/denoising", wait_until="networkidle")
    page.get_by_text("The denoising process").first.wait_for(timeout=60_000)
    frame = page.locator("[data-testid='stImage'] img").first
    frame.wait_for(state="visible", timeout=60_000)
    assert frame.evaluate("img => img.naturalWidth") >= 64
    page.screenshot(path=str(ARTIFACTS / "denoising.png"), full_page=True)
    page.close()
