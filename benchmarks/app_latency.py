"""App latency: seconds from pressing Generate to 4 birds on screen (DDIM, 10 steps, the
shipped `small` model) in a real browser, against the same generation called in-process
(the peer: what the UI adds on top of the model). Run: python benchmarks/app_latency.py"""

from __future__ import annotations

import argparse
import statistics
import sys

from common import REPO, machine, save

sys.path.insert(0, str(REPO / "tests"))

from browser_support import chromium, generate_four_birds, streamlit_app  # noqa: E402

from birdgen.checkpoint import load_model  # noqa: E402
from birdgen.pipeline import GenerationRequest, generate  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="small")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    model = load_model(REPO / "models" / args.model)
    request = GenerationRequest("ddim", 10, 4, 0)
    generate(model, request)  # warm-up
    description = machine()
    browser_s, direct_s = [], []
    with streamlit_app() as url, chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, wait_until="networkidle")
        page.get_by_label("Model").click()
        page.get_by_role("option", name=args.model, exact=True).click()
        generate_four_birds(page, seed=0)  # warm-up: loads the model into the app's cache
        for run in range(1, args.runs + 1):
            browser_s.append(generate_four_birds(page, seed=run))
            direct_s.append(generate(model, request).seconds)
    record = {"machine": description, "model": args.model, "request": "DDIM 10 steps, 4 images",
              "browser_seconds_median": statistics.median(browser_s), "browser_seconds": browser_s,
              "in_process_seconds_median": statistics.median(direct_s),
              "ratio_browser_vs_in_process": statistics.median(browser_s) / statistics.median(direct_s)}
    save("app_latency", record)


if __name__ == "__main__":
    main()
