"""Four people press Generate at once: `streamlit run app.py` with four browser sessions
(separate Chromium contexts) on the Generate page, each asking for the same 4 birds (DDIM 10
steps, the shipped `small`, seed 0). Reports each session's seconds from its click to its
grid, whether every grid equals the one a single user gets (the same image bytes), and
whether a waiting session said so. Run: python benchmarks/concurrent_users.py"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import REPO, machine, save

sys.path.insert(0, str(REPO / "tests"))

from browser_support import chromium, generate_birds, streamlit_app  # noqa: E402

STEPS, SEED = 10, 0


def grid_bytes(page) -> bytes:
    source = page.locator("[data-testid='stImage'] img").first.get_attribute("src")
    return page.request.get(source).body()


def prepare(page, url: str, model: str) -> None:
    """Opens Generate and sets the request, leaving only the click."""
    page.goto(url, wait_until="networkidle")
    page.get_by_text("birdgen — generate birds").wait_for(timeout=60_000)
    page.get_by_label("Model").click()
    page.get_by_role("option", name=model, exact=True).click()
    page.get_by_label("Sampler").click()
    page.get_by_role("option", name="DDIM", exact=True).click()
    page.get_by_role("slider").first.focus()
    page.keyboard.press("Home")
    for _ in range(STEPS - 1):
        page.keyboard.press("ArrowRight")
    for label, value in (("Images", 4), ("Seed", SEED)):
        field = page.get_by_role("spinbutton", name=label)
        field.fill(str(value))
        field.press("Enter")
    page.wait_for_timeout(800)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--model", default="small")
    args = parser.parse_args()
    description = machine()
    with streamlit_app() as url, chromium() as browser:
        single = browser.new_context().new_page()
        prepare(single, url, args.model)
        generate_birds(single, steps=STEPS, seed=SEED, sampler="DDIM")  # warm-up, loads the model
        solo_s = generate_birds(single, steps=STEPS, seed=SEED + 1, sampler="DDIM")
        generate_birds(single, steps=STEPS, seed=SEED, sampler="DDIM")
        reference = grid_bytes(single)
        pages = [browser.new_context().new_page() for _ in range(args.users)]
        for page in pages:
            prepare(page, url, args.model)
        clicked = []
        for page in pages:  # the clicks land within a fraction of a second of each other
            page.get_by_role("button", name="Generate", exact=True).click(no_wait_after=True)
            clicked.append(time.perf_counter())
        waited = [False] * len(pages)
        finished = [None] * len(pages)
        deadline = time.perf_counter() + 600
        while None in finished and time.perf_counter() < deadline:
            for index, page in enumerate(pages):
                if finished[index] is not None:
                    continue
                if page.get_by_text("Waiting for").count():
                    waited[index] = True
                if page.get_by_text(f"{STEPS} steps · seed {SEED}").count():
                    finished[index] = time.perf_counter() - clicked[index]
            time.sleep(0.05)
        same = [grid_bytes(page) == reference for page in pages]
    latencies = [round(s, 2) for s in finished if s is not None]
    record = {"machine": description, "users": args.users, "request": f"DDIM {STEPS} steps, 4 images, seed {SEED}",
              "single_user_seconds": round(solo_s, 2), "seconds_each": latencies,
              "seconds_min": min(latencies), "seconds_median": statistics.median(latencies),
              "seconds_max": max(latencies), "all_finished": len(latencies) == args.users,
              "results_equal_single_user": all(same), "sessions_told_they_wait": sum(waited)}
    save("concurrent_users", record)


if __name__ == "__main__":
    main()
