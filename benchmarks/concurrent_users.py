"""People press Generate at once: `streamlit run app.py` with `--users` browser sessions
(separate Chromium contexts) on the Generate page, each asking for the same 4 birds (DDIM 10
steps, seed 0). Reports each session's seconds from its click to its answer, whether every grid
equals the one a single user gets (the same image bytes), and whether a waiting session said so.

With `--public`, the server runs in public mode (BIRDGEN_PUBLIC=1, `--max-waiting` its queue
limit): every session must be answered with birds or the busy message, with no error on any
page; it also reports the server's peak resident memory and any file the server wrote or
changed in the repository or the cache folder while the sessions ran.

    python benchmarks/concurrent_users.py                      # 4 users, private mode
    python benchmarks/concurrent_users.py --public --users 8 --model small-attn
    python benchmarks/concurrent_users.py --public --users 8 --max-waiting 3 --model small-attn
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import REPO, machine, save
from birdgen.data import cache_dir
from birdgen.ui import STEP_RANGES

sys.path.insert(0, str(REPO / "tests"))

from browser_support import chromium, streamlit_app  # noqa: E402

STEPS, SEED = 10, 0
BUSY = "The server is busy"


def files_state() -> dict[str, tuple[int, float]]:
    """(size, mtime) of every file in the repository (but .git and benchmark results) and the cache."""
    state = {}
    for root in (REPO, cache_dir()):
        if not root.is_dir():
            continue
        for path in root.rglob("*"):
            parts = path.relative_to(root).parts
            if parts and parts[0] in (".git", ".venv") or "results" in parts or not path.is_file():
                continue
            stat = path.stat()
            state[str(path)] = (stat.st_size, stat.st_mtime)
    return state


def peak_memory_mb(pid: int) -> float:
    """A process's peak resident memory (VmHWM), MiB."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


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
    page.get_by_text(str(STEP_RANGES["ddim"][2]), exact=True).first.wait_for(timeout=10_000)  # DDIM's slider is up
    page.get_by_role("slider").first.focus()
    page.keyboard.press("Home")
    for _ in range(STEPS - STEP_RANGES["ddim"][0]):
        page.keyboard.press("ArrowRight")
    page.get_by_text(str(STEPS), exact=True).first.wait_for(timeout=10_000)
    for label, value in (("Images", 4), ("Seed", SEED)):
        field = page.get_by_role("spinbutton", name=label)
        field.fill(str(value))
        field.press("Enter")
    page.wait_for_timeout(800)


def generate_alone(page, seed: int) -> float:
    """Presses Generate on a prepared page for `seed`; the seconds until its grid shows."""
    field = page.get_by_role("spinbutton", name="Seed")
    field.fill(str(seed))
    field.press("Enter")
    page.wait_for_timeout(500)
    pressed = time.perf_counter()
    page.get_by_role("button", name="Generate", exact=True).click()
    page.get_by_text(f"{STEPS} steps · seed {seed}").wait_for(timeout=120_000)
    page.locator("[data-testid='stImage'] img").first.wait_for(state="visible", timeout=30_000)
    return time.perf_counter() - pressed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--model", default="small")
    parser.add_argument("--public", action="store_true", help="run the server in public mode")
    parser.add_argument("--max-waiting", type=int, default=8, help="public mode's queue limit")
    args = parser.parse_args()
    description = machine()
    env = {"BIRDGEN_PUBLIC": "1", "BIRDGEN_PUBLIC_MAX_WAITING": str(args.max_waiting)} if args.public else {}
    with streamlit_app(env, with_process=True) as (url, server), chromium() as browser:
        single = browser.new_context().new_page()
        prepare(single, url, args.model)
        generate_alone(single, SEED)  # warm-up, loads the model
        solo_s = generate_alone(single, SEED + 1)
        generate_alone(single, SEED)
        reference = grid_bytes(single)
        pages = [browser.new_context().new_page() for _ in range(args.users)]
        for page in pages:
            prepare(page, url, args.model)
        before = files_state()
        clicked = []
        for page in pages:  # the clicks land within a fraction of a second of each other
            page.get_by_role("button", name="Generate", exact=True).click(no_wait_after=True)
            clicked.append(time.perf_counter())
        waited, busy = [False] * len(pages), [False] * len(pages)
        finished = [None] * len(pages)
        deadline = time.perf_counter() + 600
        while None in finished and time.perf_counter() < deadline:
            for index, page in enumerate(pages):
                if finished[index] is not None:
                    continue
                if page.get_by_text("Waiting for").count():
                    waited[index] = True
                if page.get_by_text(BUSY).count():
                    busy[index] = True
                    finished[index] = time.perf_counter() - clicked[index]
                elif page.get_by_text(f"{STEPS} steps · seed {SEED}").count():
                    finished[index] = time.perf_counter() - clicked[index]
            time.sleep(0.05)
        errors = sum(page.locator("[data-testid='stException']").count() + page.get_by_text("Traceback").count()
                     for page in pages)
        same = [grid_bytes(page) == reference for page, told_busy in zip(pages, busy) if not told_busy]
        memory_mb = peak_memory_mb(server.pid)
        after = files_state()
    written = sorted(path for path in after if before.get(path) != after[path])
    served = [round(s, 2) for s, told_busy in zip(finished, busy) if s is not None and not told_busy]
    record = {"machine": description, "mode": "public" if args.public else "private", "users": args.users,
              "model": args.model, "request": f"DDIM {STEPS} steps, 4 images, seed {SEED}",
              "single_user_seconds": round(solo_s, 2), "seconds_each": served,
              "seconds_min": min(served), "seconds_median": statistics.median(served), "seconds_max": max(served),
              "all_answered": None not in finished, "told_busy": sum(busy),
              "busy_seconds": [round(s, 2) for s, told_busy in zip(finished, busy) if told_busy],
              "results_equal_single_user": all(same), "sessions_told_they_wait": sum(waited),
              "errors_on_pages": errors, "server_peak_memory_mb": round(memory_mb), "files_written": written}
    if args.public:
        record["max_waiting"] = args.max_waiting
    save(f"concurrent_users{'_public' if args.public else ''}"
         f"{f'_waiting{args.max_waiting}' if args.public and args.max_waiting != 8 else ''}", record)


if __name__ == "__main__":
    main()
