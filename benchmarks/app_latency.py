"""App latency: seconds from pressing Generate to 8 birds on screen in a real browser, for a
distilled student (its own few DDIM steps) against its teacher with DDIM 25 (the app's old
default) and DPM-Solver++ 10 (today's default), each also called in-process (what the UI adds
on top of the model). Settings take turns, so a change of machine load hits them alike.

    python benchmarks/app_latency.py --student small-attn-4step --teacher small-attn
    python benchmarks/app_latency.py --precisions fp32 bf16     # one app server per precision

With `--precisions`, each setting runs on one app server per sampling precision
(BIRDGEN_PRECISION), the servers taking turns too, and the results go to
app_latency_precision.json.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys

from common import REPO, machine, save, with_precision

sys.path.insert(0, str(REPO / "tests"))

from browser_support import chromium, generate_birds, streamlit_app  # noqa: E402

from birdgen.model_folder import load_model  # noqa: E402
from birdgen.pipeline import GenerationRequest, generate  # noqa: E402
from birdgen.precision import PRECISION_ENV, PRECISIONS  # noqa: E402
from birdgen.ui import SAMPLER_LABELS  # noqa: E402


def label(setup: str, precision: str | None) -> str:
    return f"{setup}, {precision}" if precision else setup


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="small-attn-4step")
    parser.add_argument("--teacher", default="small-attn")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS,
                        help="one app server per sampling precision (default: one, the machine's own)")
    args = parser.parse_args()
    student = load_model(REPO / "models" / args.student)
    teacher = load_model(REPO / "models" / args.teacher)
    setups = {  # name: (model, sampler, steps, fixed)
        f"{args.student} (DDIM {student.sampling.steps}, its own)": (student, "ddim", student.sampling.steps, True),
        f"{args.teacher} DDIM 25": (teacher, "ddim", 25, False),
        f"{args.teacher} DPM-Solver++ 10": (teacher, "dpmpp", 10, False),
    }
    precisions = args.precisions or [None]
    description = machine()
    browser_s, direct_s = ({label(name, p): [] for p in precisions for name in setups} for _ in range(2))
    with contextlib.ExitStack() as stack, chromium() as browser:
        servers = {precision: stack.enter_context(streamlit_app({PRECISION_ENV: precision} if precision else None))
                   for precision in precisions}
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for run in range(args.runs + 1):  # run 0 warms up: loads each model into each app's cache
            for precision, url in servers.items():
                for name, (model, sampler, steps, fixed) in setups.items():
                    page.goto(url, wait_until="networkidle")
                    page.get_by_label("Model").click()
                    page.get_by_role("option", name=model.name, exact=True).click()
                    shown = page.get_by_text("is distilled to sample in") if fixed else page.get_by_label("Sampler")
                    shown.first.wait_for(timeout=60_000)  # the page has rerun for this model
                    seconds = generate_birds(page, steps, seed=run, count=args.count,
                                             sampler=None if fixed else SAMPLER_LABELS[sampler], fixed=fixed)
                    request = GenerationRequest(None if fixed else sampler, None if fixed else steps, args.count, run)
                    direct = with_precision(precision, lambda: generate(model, request).seconds)
                    if run:
                        browser_s[label(name, precision)].append(seconds)
                        direct_s[label(name, precision)].append(direct)
    record = {"machine": description, "images": args.count, "runs": args.runs,
              "browser_seconds_median": {name: statistics.median(v) for name, v in browser_s.items()},
              "in_process_seconds_median": {name: statistics.median(v) for name, v in direct_s.items()},
              "browser_seconds": browser_s, "in_process_seconds": direct_s}
    save("app_latency_precision" if args.precisions else "app_latency", record)


if __name__ == "__main__":
    main()
