"""End to end in a real browser: `streamlit run app.py` on localhost, driven by Playwright in
the system's Chromium. Screenshots land in test-artifacts/ for a person to look at."""

import contextlib
import re
import time

import pytest

from browser_support import REPO, chromium, chromium_path, generate_birds, streamlit_app

pytestmark = pytest.mark.browser
ARTIFACTS = REPO / "test-artifacts"


def require_browser() -> None:
    pytest.importorskip("playwright.sync_api")
    if chromium_path() is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium)")
    ARTIFACTS.mkdir(exist_ok=True)


@contextlib.contextmanager
def fresh_server_page(browser, env: dict, height: int = 1000):
    """A new `streamlit run app.py` that nothing has visited yet, and a page of the module's
    browser to visit it with (one Playwright per thread: a second would clash with the first)."""
    with streamlit_app(env) as url:
        page = browser.new_page(viewport={"width": 1400, "height": height})
        try:
            yield url, page
        finally:
            page.close()


@pytest.fixture(scope="module")
def browser_and_url(tmp_path_factory):
    require_browser()
    env = {"BIRDGEN_RUNS_DIR": str(tmp_path_factory.mktemp("runs"))}
    if not any((p / "config.json").is_file() for p in (REPO / "models").glob("*")):
        from birdgen.model_folder import build_model, save_model
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
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url, wait_until="networkidle")
    seconds = generate_birds(page, steps=10, sampler="DDIM")
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


def test_a_page_link_opened_first_on_a_fresh_server_shows_the_app_navigation(browser_and_url, tmp_path):
    with fresh_server_page(browser_and_url[0], {"BIRDGEN_RUNS_DIR": str(tmp_path / "runs")}) as (url, page):
        page.goto(url + "/compare", wait_until="networkidle")  # a bookmark: the server has run nothing yet
        page.get_by_text("Compare models").first.wait_for(timeout=60_000)
        nav = page.locator("[data-testid='stSidebarNav']")
        nav.get_by_text("Denoising process").wait_for(timeout=30_000)
        labels = nav.inner_text()
        assert all(title in labels for title in ("Generate", "Denoising process", "Compare models", "Metrics", "Train"))
        assert "compare\n" not in labels.lower().replace("compare models", "")  # no raw file names
        page.screenshot(path=str(ARTIFACTS / "deep-link.png"), full_page=True)


def test_the_train_page_updates_by_itself_while_a_run_is_live(browser_and_url, tmp_path):
    from conftest import make_cub

    data = make_cub(tmp_path / "CUB_200_2011")
    env = {"BIRDGEN_RUNS_DIR": str(tmp_path / "runs"), "BIRDGEN_DATA": str(data),
           "BIRDGEN_CACHE_DIR": str(tmp_path / "cache")}
    with fresh_server_page(browser_and_url[0], env, height=1400) as (url, page):
        page.goto(url + "/train", wait_until="networkidle")
        page.get_by_role("button", name="Start training").wait_for(timeout=60_000)
        page.get_by_role("button", name="Start training").click()
        started = time.perf_counter()
        try:
            status = page.get_by_text(re.compile(r"step \d+ of 3,000 · [\d.]+ images/s · about"))
            status.wait_for(timeout=90_000)  # no button pressed since Start
            first = status.inner_text()
            seen_after_s = time.perf_counter() - started
            step = re.search(r"step \d+ of", first).group(0)
            page.wait_for_function(  # a later step shows up, still without any button pressed
                "text => !document.body.innerText.includes(text)", arg=step, timeout=90_000)
            page.screenshot(path=str(ARTIFACTS / "train-live.png"), full_page=True)
            (ARTIFACTS / "train-live.txt").write_text(f"progress on screen {seen_after_s:.1f} s after Start\n")
        finally:
            page.get_by_role("button", name="Stop (saves a checkpoint)").click()
        page.get_by_text("Stopped.").wait_for(timeout=90_000)


def test_pictures_of_your_own_fine_tuned_exported_and_generated_in_the_browser(browser_and_url, tmp_path):
    from birdgen.diffusion import DiffusionConfig
    from birdgen.model_folder import build_model, save_model
    from birdgen.networks import preset
    from test_own_pictures import class_folder

    models = tmp_path / "models"
    tiny = build_model(preset("small-attn", channels=(8, 16)), DiffusionConfig(num_steps=100))
    save_model(models / "small-attn", tiny.network, tiny.network_config, tiny.diffusion_config)
    env = {"BIRDGEN_RUNS_DIR": str(tmp_path / "runs"), "BIRDGEN_DATA": str(class_folder(tmp_path / "my-birds")),
           "BIRDGEN_CACHE_DIR": str(tmp_path / "cache"), "BIRDGEN_MODELS_DIR": str(models)}
    with fresh_server_page(browser_and_url[0], env, height=1800) as (url, page):
        page.goto(url + "/train", wait_until="networkidle")
        page.get_by_text("What the model will see").wait_for(timeout=60_000)  # the check's preview
        for label, value in (("Steps (at most)", 6), ("Checkpoint and preview every (steps)", 3)):
            field = page.get_by_role("spinbutton", name=label)
            field.fill(str(value))
            field.press("Enter")
        page.get_by_role("button", name="Start training").click()
        page.get_by_text("Not running.").wait_for(timeout=180_000)  # 6 steps, then the run ends by itself
        page.get_by_label("Model name").fill("browser-birds")
        page.get_by_role("button", name="Export", exact=True).click()
        page.get_by_text("Exported").wait_for(timeout=180_000)
        page.screenshot(path=str(ARTIFACTS / "train-export.png"), full_page=True)
        page.goto(url, wait_until="networkidle")
        page.get_by_text("birdgen — generate birds").wait_for(timeout=60_000)
        page.get_by_label("Model").first.click()
        page.get_by_role("option", name="browser-birds", exact=True).click()
        page.get_by_text("Class guidance").first.wait_for(timeout=30_000)  # its class picker and guidance slider
        seconds = generate_birds(page, steps=5, count=2)
        assert seconds < 120 and (models / "browser-birds" / "model.safetensors").is_file()
        page.screenshot(path=str(ARTIFACTS / "generate-own-model.png"), full_page=True)


def test_explore_page_interpolates_in_the_browser(browser_and_url):
    browser, url = browser_and_url
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.goto(url + "/explore", wait_until="networkidle")
    page.get_by_text("Explore and edit").first.wait_for(timeout=60_000)
    page.get_by_role("button", name="Interpolate", exact=True).click()
    page.get_by_role("button", name="Download GIF").wait_for(timeout=180_000)
    strip = page.locator("[data-testid='stImage'] img").first
    assert strip.evaluate("img => img.naturalWidth") > 9 * 64
    page.screenshot(path=str(ARTIFACTS / "explore.png"), full_page=True)
    page.close()


def test_public_mode_in_the_browser(browser_and_url, tmp_path):
    env = {"BIRDGEN_RUNS_DIR": str(tmp_path / "runs"), "BIRDGEN_PUBLIC": "1",
           "BIRDGEN_PUBLIC_MAX_EVALUATIONS": "40"}
    with fresh_server_page(browser_and_url[0], env) as (url, page):
        page.goto(url + "/train", wait_until="networkidle")
        page.get_by_text("Training is off on this server").wait_for(timeout=60_000)
        nav = page.locator("[data-testid='stSidebarNav']")
        nav.get_by_text("Metrics").wait_for(timeout=30_000)
        assert "Train" not in nav.inner_text()
        assert page.get_by_role("button", name="Start training").count() == 0
        assert page.get_by_text("Deploy", exact=True).count() == 0
        page.goto(url, wait_until="networkidle")
        page.get_by_text("birdgen — generate birds").wait_for(timeout=60_000)
        page.get_by_role("button", name="Generate", exact=True).click()  # 8 images × 10 steps > 40
        page.get_by_text("is more than this public server allows per request (40)").wait_for(timeout=60_000)
        assert page.locator("[data-testid='stImage'] img").count() == 0
        page.screenshot(path=str(ARTIFACTS / "public-mode.png"), full_page=True)
