"""Species guidance: species accuracy (top-1/top-5 of a logistic-regression classifier on MobileNet
features, against the held-out real crops' accuracy on the same classifier) and FD/KID/precision/
recall of a species model against its classifier-free guidance weight, with and without a guidance
interval, unguided or autoguided by a conditional guide (`--guide`, a model folder or a run's RUN@STEP
checkpoint, at each of `--guide-weights`); the samples follow the held-out crops' species in turn,
same seeds and counts for all.

    python benchmarks/species_guidance.py --model models/small-attn-species --weights 1 2 3 4.5 6 \
        --intervals all 200,999 --num-samples 500
    python benchmarks/species_guidance.py --weights 5 --guide models/small-attn-species-guide --guide-weights 1.5 2

Rows go to benchmarks/results/species_guidance.json as each is done (rows already there are
skipped); `--plot-only` prints the table again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import warnings

import torch

from common import REAL_CUB, REPO, load_guide, load_guide_name, machine
from birdgen.model_folder import check_guide, load_model
from birdgen.data import CropSettings, load_crops
from birdgen.evaluation import EvalSettings, evaluate
from birdgen.features import choose_feature_space, load_extractor
from birdgen.guidance import parse_interval

RESULTS = REPO / "benchmarks" / "results" / "species_guidance.json"


def table(results: dict) -> str:
    lines = ["| model | sampler | species w | guide | guide w | interval | species top-1 | top-5 | top-1 / real | FD |"
             " KID | precision | recall |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results["rows"], key=lambda r: (r["model"], r["interval"], guide_of(r), r["species_weight"])):
        guide, guide_weight = guide_of(r)
        lines.append(f"| {r['model']} | {r['sampler']} | {r['species_weight']:g} | {guide} | {guide_weight:g} |"
                     f" {r['interval']} | {r['top1']:.1%} |"
                     f" {r['top5']:.1%} | {r['relative_top1']:.0%} | {r['fd']:.1f} | {r['kid']:.3f} | {r['precision']:.2f} |"
                     f" {r['recall']:.2f} |")
    real = results.get("heldout")
    if real:
        lines.append(f"\nHeld-out real crops on the same classifier: top-1 {real['top1']:.1%}, top-5 {real['top5']:.1%}"
                     f" ({real['classes']} species, chance {1 / real['classes']:.1%}).")
    return "\n".join(lines)


def guide_of(row: dict) -> tuple[str, float]:
    """(guide name, guide weight) of a row; rows from before autoguidance was measured had none."""
    return row.get("guide", "none"), row.get("guide_weight", 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["models/small-attn-species"])
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.5, 6.0])
    parser.add_argument("--intervals", nargs="+", default=["all", "200,999"])
    parser.add_argument("--sampler", default="dpmpp")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--guide", nargs="*", default=[], help="conditional guide folder(s) or RUN@STEP checkpoints")
    parser.add_argument("--guide-weights", type=float, nargs="+", default=[2.0], help="autoguidance w for each guide")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.plot_only:
        print(table(results))
        return
    space, note = choose_feature_space("mobilenet")
    print(note)
    if results.get("num_samples") != args.num_samples:
        results = {"num_samples": args.num_samples, "features": space, "rows": []}
    results["machine"] = machine()
    extractor = load_extractor(space).eval()
    done = {(r["model"], r["sampler"], r["steps"], r["species_weight"], r["interval"], *guide_of(r))
            for r in results["rows"]}
    guidings = [(None, 1.0)] if not args.guide else [(spec, w) for spec in args.guide for w in args.guide_weights]
    guides = {spec: load_guide(spec) for spec in args.guide}
    for folder in args.model:
        model = load_model(REPO / folder, guide="none")
        crops = load_crops(REAL_CUB, CropSettings(size=model.network_config.image_size), progress=False)
        for spec, guide in guides.items():
            check_guide(model, guide, spec)
        for (spec, guide_weight), interval, weight in itertools.product(guidings, args.intervals, args.weights):
            guide_name = load_guide_name(spec) if spec else "none"
            key = (model.name, args.sampler, args.steps, weight, interval, guide_name, guide_weight)
            if key in done:
                continue
            model.guide = guides.get(spec)
            settings = EvalSettings(num_samples=args.num_samples, sampler=args.sampler, steps=args.steps,
                                    memorization=False, guidance=weight, guide_weight=guide_weight,
                                    interval=parse_interval(interval, model.schedule.num_steps))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = evaluate(model, crops, settings, extractor, extractor.identity, space).metrics
            accuracy = m["species_accuracy"]
            results["heldout"] = {"top1": accuracy["heldout_top1"], "top5": accuracy["heldout_top5"],
                                  "classes": accuracy["classes"]}
            row = {"model": model.name, "sampler": args.sampler, "steps": args.steps, "species_weight": weight,
                   "guide": guide_name, "guide_weight": guide_weight, "interval": interval,
                   "top1": accuracy["generated_top1"], "top5": accuracy["generated_top5"],
                   "relative_top1": accuracy["relative_top1"], "fd": round(m["fid"], 2),
                   "kid": round(m["kid_mean"], 4), "precision": round(m["precision"], 3),
                   "recall": round(m["recall"], 3), "seconds": m["wall_time_s"]}
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
            RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
