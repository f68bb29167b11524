"""What an idle browser tab costs the server, and what that does to Generate: `streamlit run
app.py` with the project's settings (.streamlit/config.toml: no file watcher) against the same
server with Streamlit's default file watcher, which polls every file under the repository,
the virtual environment included. Run: python benchmarks/idle_server.py

For each: one Chromium tab opens the Generate page and waits; the server process's CPU time
(user + system, from /proc) is read over `--idle` seconds with nothing pressed. Then the same
tab measures Generate → 4 birds on screen (DDIM 10 steps, the shipped `small`), median of
`--runs` after one warm-up."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from common import REPO, machine, save

sys.path.insert(0, str(REPO / "tests"))

from browser_support import chromium, generate_birds, streamlit_app  # noqa: E402

SETTINGS = {"project config (no file watcher)": (),
            "Streamlit default (file watcher on)": ("--server.fileWatcherType", "auto")}


def cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def measure(extra_args, idle_s: float, runs: int, model: str) -> dict:
    with streamlit_app(extra_args=extra_args, with_process=True) as (url, process), chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, wait_until="networkidle")
        page.get_by_text("birdgen — generate birds").wait_for(timeout=60_000)
        page.get_by_label("Model").click()
        page.get_by_role("option", name=model, exact=True).click()
        page.wait_for_timeout(3000)  # let the page settle before measuring
        before, started = cpu_ticks(process.pid), time.perf_counter()
        time.sleep(idle_s)
        ticks, seconds = cpu_ticks(process.pid) - before, time.perf_counter() - started
        generate_birds(page, seed=0, sampler="DDIM")  # warm-up
        latencies = [generate_birds(page, seed=run, sampler="DDIM") for run in range(1, runs + 1)]
    hz = os.sysconf("SC_CLK_TCK")
    return {"idle_ticks": ticks, "idle_seconds": round(seconds, 1),
            "idle_core_percent": round(100 * ticks / hz / seconds, 1),
            "generate_seconds_median": round(statistics.median(latencies), 2), "generate_seconds": latencies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=float, default=25.0, help="seconds with one idle tab")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="small")
    args = parser.parse_args()
    description = machine()
    results = {name: measure(extra, args.idle, args.runs, args.model) for name, extra in SETTINGS.items()}
    for name, result in results.items():
        print(f"{name}: {result}")
    save("idle_server", {"machine": description, "venv_inside_repo": (REPO / ".venv").is_dir(), **results})


if __name__ == "__main__":
    main()
