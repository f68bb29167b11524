"""Quality against network evaluations (NFE): a teacher with DDIM and DPM-Solver++ at 1, 2, 4, 8,
10, 20 and 50 steps, and its distilled students at their own steps, all at the same sample count
against the same held-out crops, in the same offline feature space; plus sampling images/s of each.

    python benchmarks/steps_and_quality.py --teacher models/small-attn \
        --students models/small-attn-4step models/small-attn-2step [--num-samples 500]

Each setting is written to benchmarks/results/steps_and_quality.json as soon as it is done, and
settings already there (same teacher, count and features) are skipped, so the script can be
stopped and rerun, or run first for the teacher and later for the students. `--plot-only`
redraws benchmarks/results/steps_and_quality.png from the JSON.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from common import REAL_CUB, REPO, alternate, machine, score_samples, stored_results
from birdgen.model_folder import load_model
from birdgen.data import CropSettings, load_crops, recover_split
from birdgen.evaluation import EvalSettings, real_features
from birdgen.features import choose_feature_space, load_extractor
from birdgen.pipeline import GenerationRequest, generate

RESULTS = REPO / "benchmarks" / "results" / "steps_and_quality.json"
PLOT = REPO / "benchmarks" / "results" / "steps_and_quality.png"
NFES = (1, 2, 4, 8, 10, 20, 50)


def measure(model, sampler: str | None, steps: int | None, count: int, reference, extractor) -> dict:
    settings = EvalSettings(num_samples=count, sampler=sampler, steps=steps, batch_size=64, memorization=False)
    return score_samples(model, settings, reference, extractor)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for sampler, label, style in (("ddim", "teacher, DDIM", "o-"), ("dpmpp", "teacher, DPM-Solver++(2M)", "s-")):
        rows = sorted((r["nfe"], r["fd"]) for r in results["rows"] if r["model"] == "teacher" and r["sampler"] == sampler)
        if rows:
            axis.plot(*zip(*rows), style, label=label, linewidth=1)
    students = sorted((r["nfe"], r["fd"], r["name"]) for r in results["rows"] if r["model"] == "student")
    if students:
        axis.plot([s[0] for s in students], [s[1] for s in students], "r*", markersize=12, label="distilled students")
        for nfe, fd, name in students:
            axis.annotate(name, (nfe, fd), textcoords="offset points", xytext=(6, 4), fontsize=7)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xticks(NFES, [str(n) for n in NFES])
    axis.set_yticks([400, 500, 600, 800, 1000], ["400", "500", "600", "800", "1000"])
    axis.minorticks_off()
    axis.set_xlabel("network evaluations per image (NFE)")
    axis.set_ylabel(f"FD, {results['features']} features (lower is better)")
    axis.set_title(f"{results['teacher']}: {results['num_samples']} samples vs {results['num_real']} held-out crops",
                   fontsize=9)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(PLOT)
    plt.close(figure)


def table(results: dict) -> str:
    lines = ["| model | sampler | NFE | FD | KID | precision | recall | img/s |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results["rows"], key=lambda r: (r["model"] != "teacher", r["sampler"], r["nfe"])):
        lines.append(f"| {r['name']} | {r['sampler']} | {r['nfe']} | {r['fd']:.1f} | {r['kid']:.3f} ± {r['kid_std']:.3f}"
                     f" | {r['precision']:.2f} | {r['recall']:.2f} | {r['images_per_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="models/small-attn")
    parser.add_argument("--students", nargs="*", default=[], help="student model folders")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--features", default="mobilenet", choices=("auto", "inception", "mobilenet"))
    parser.add_argument("--skip-teacher", action="store_true", help="only the students")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--speed", action="store_true",
                        help="also time 64 images from each student against the teacher's DDIM 50, in turns")
    args = parser.parse_args()
    results = stored_results(RESULTS)
    if args.plot_only:
        plot(results)
        print(table(results))
        return
    space, note = choose_feature_space(args.features)
    print(note)
    same = (results.get("teacher"), results.get("num_samples"), results.get("features")) == (args.teacher,
                                                                                            args.num_samples, space)
    if not same:
        results = {"teacher": args.teacher, "num_samples": args.num_samples, "features": space, "rows": []}
    results["machine"] = machine()
    extractor = load_extractor(space).eval()
    teacher = load_model(REPO / args.teacher)
    crops = load_crops(REAL_CUB, CropSettings(size=teacher.network_config.image_size), progress=False)
    _, heldout = recover_split(teacher.data, crops, args.teacher)
    reference = real_features(crops, heldout, extractor, extractor.identity, 64, "cpu", None)
    results["num_real"] = len(heldout)
    done = {(r["name"], r["sampler"], r["nfe"]) for r in results["rows"]}
    jobs = [] if args.skip_teacher else [(teacher, "teacher", s, n) for n in NFES for s in ("ddim", "dpmpp")]
    for folder in args.students:
        student = load_model(REPO / folder)
        if student.data != teacher.data:
            raise SystemExit(f"{folder}: not trained on the teacher's split; its numbers would not be comparable")
        jobs.append((student, "student", student.sampling.sampler, student.sampling.steps))
    for model, role, sampler, nfe in jobs:
        if (model.name, sampler, nfe) in done:
            continue
        row = {"model": role, "name": model.name, "sampler": sampler, "nfe": nfe,
               **measure(model, sampler if role == "teacher" else None, nfe if role == "teacher" else None,
                         args.num_samples, reference, extractor)}
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    if args.speed:
        results["speed"] = speed(teacher, [load_model(REPO / folder) for folder in args.students])
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps(results["speed"], indent=1))
    plot(results)
    print(table(results))


def speed(teacher, students: list, images: int = 64, rounds: int = 3) -> dict:
    """Sampling images/s of each student and of the teacher's DDIM 50 on the same batch of
    noise, alternated (A, B, A, B, …) so that machine load hits them alike."""
    contenders = {f"{teacher.name} DDIM 50": lambda: generate(teacher, GenerationRequest("ddim", 50, images, 0))}
    for student in students:
        contenders[f"{student.name} DDIM {student.sampling.steps}"] = \
            lambda student=student: generate(student, GenerationRequest(num_images=images, seed=0))
    measured = alternate(contenders, rounds, images)
    base = measured[f"{teacher.name} DDIM 50"]
    return {"machine": machine(), "images_per_call": images, "rounds": rounds,
            "images_per_s": {k: round(v, 2) for k, v in measured.items()},
            "ratio_vs_teacher_ddim50": {k: round(v / base, 2) for k, v in measured.items()}}


if __name__ == "__main__":
    torch.manual_seed(0)
    np.random.seed(0)
    main()
