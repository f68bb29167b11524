"""Autoguidance: FD/KID/precision/recall of a model guided by a weaker guide against the guide
weight w, with and without a guidance interval, at DPM-Solver++ 10 and 20 steps, against the
same model unguided (also at equal cost), all from the same seeds and sample counts against
the same held-out crops, in the offline MobileNet feature space; plus each setting's network
evaluations and seconds.

    python benchmarks/autoguidance.py --model models/small-attn --guide models/small-attn-guide \
        --weights 1.5 2 2.5 3 --intervals all 200,999 --steps 10 20 --num-samples 500

    # which of a guide run's checkpoints guides best: RUN@STEP its EMA weights, RUN@STEP:raw its training weights
    python benchmarks/autoguidance.py --guide runs/guide@2000 runs/guide@3000 runs/guide@3000:raw --weights 2.5 --steps 10

Rows go to benchmarks/results/autoguidance.json as soon as each is done (settings already there
are skipped, so a stopped run can be rerun); `--plot-only` redraws the plot and prints the table.
"""

from __future__ import annotations

import argparse
import json

import torch

from common import REAL_CUB, REPO, load_guide, load_guide_name, machine, score_samples, stored_results, with_precision
from birdgen.model_folder import check_guide, load_model
from birdgen.data import CropSettings, load_crops, recover_split
from birdgen.evaluation import EvalSettings, real_features
from birdgen.features import choose_feature_space, load_extractor
from birdgen.guidance import parse_interval
from birdgen.precision import PRECISIONS, precision_text, sampling_autocast

RESULTS = REPO / "benchmarks" / "results" / "autoguidance.json"
PLOT = REPO / "benchmarks" / "results" / "autoguidance.png"


SETTING = ("guide", "steps", "guide_weight", "interval", "num_samples", "arithmetic")


def setting_of(row: dict) -> tuple:
    """What a row measured, so that a rerun skips the settings already in the results file."""
    return tuple(row[key] for key in SETTING)


def measure(model, steps: int, guide_weight: float, interval, count: int, reference, extractor) -> dict:
    settings = EvalSettings(num_samples=count, sampler="dpmpp", steps=steps, batch_size=64, memorization=False,
                            guide_weight=guide_weight, interval=interval)
    return score_samples(model, settings, reference, extractor)


def cost(model, steps: int, guide_weight: float, interval) -> dict:
    """Network evaluations per image, and the cost in main-network evaluations (guide passes weighted by FLOPs)."""
    from birdgen.pipeline import GenerationRequest, planned_evaluations

    request = GenerationRequest("dpmpp", steps, 1, guide_weight=guide_weight, interval=interval)
    total = planned_evaluations(model, request)
    guide_passes = total - steps
    ratio = model.guide.flops_per_image / model.flops_per_image if model.guide is not None else 0.0
    return {"evaluations": total, "guide_evaluations": guide_passes, "main_equivalent": round(steps + guide_passes * ratio, 2)}


def plot(results: dict, count: int | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = count or max(r["num_samples"] for r in results["rows"])
    rows_at = [r for r in results["rows"] if r["num_samples"] == count]
    figure, axis = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    def line_of(row):
        return row["guide"], row["steps"], row["interval"], row["arithmetic"]

    for guide, steps, interval, arithmetic in sorted({line_of(r) for r in rows_at if r["guide"] != "none"}):
        rows = sorted((r["guide_weight"], r["fd"]) for r in rows_at if line_of(r) == (guide, steps, interval, arithmetic))
        if len(rows) < 2:
            continue
        rows = [(1.0, r["fd"]) for r in rows_at
                if r["guide"] == "none" and (r["steps"], r["arithmetic"]) == (steps, arithmetic)] + rows
        axis.plot(*zip(*sorted(rows)), "o-", linewidth=1, label=f"{guide}, DPM++ {steps}, t {interval}, {arithmetic}")
    axis.set_xlabel("autoguidance weight w (1 = unguided)")
    axis.set_ylabel(f"FD, {results['features']} features (lower is better)")
    axis.set_title(f"{results['model']}: {count} samples vs {results['num_real']} held-out crops", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(PLOT)
    plt.close(figure)


def table(results: dict) -> str:
    lines = ["| samples | guide | DPM++ steps | arithmetic | w | interval | evaluations (main + guide) |"
             " cost (main-equivalent) | FD | KID | precision | recall | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results["rows"], key=lambda r: (r["num_samples"], r["guide"] != "none", r["guide"], r["steps"],
                                                    r["interval"], r["guide_weight"])):
        lines.append(f"| {r['num_samples']} | {r['guide']} | {r['steps']} | {r['arithmetic']} | {r['guide_weight']:g} |"
                     f" {r['interval']} | {r['steps']} + {r['guide_evaluations']} | {r['main_equivalent']:g} |"
                     f" {r['fd']:.1f} | {r['kid']:.3f} ± {r['kid_std']:.3f} | {r['precision']:.2f} | {r['recall']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/small-attn")
    parser.add_argument("--guide", nargs="+", default=["models/small-attn-guide"], help="guide model folder(s)")
    parser.add_argument("--weights", type=float, nargs="+", default=[1.5, 2.0, 2.5, 3.0])
    parser.add_argument("--intervals", nargs="+", default=["all", "200,999"], help="LOW,HIGH timesteps or all")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20], help="DPM-Solver++ steps")
    parser.add_argument("--unguided-steps", type=int, nargs="*", default=[13, 27],
                        help="extra unguided rows at about the guided rows' cost")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument("--features", default="mobilenet", choices=("auto", "inception", "mobilenet"))
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="sampling arithmetic (as BIRDGEN_PRECISION); fp32 keeps rows comparable across CPUs")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--picture", help="instead: write a same-noise picture (rows: unguided, then guided with the"
                                          " model's default guidance) to this PNG")
    args = parser.parse_args()
    if args.picture:
        same_noise_picture(args.model, args.picture)
        return
    results = stored_results(RESULTS)
    if args.plot_only:
        plot(results)
        print(table(results))
        return
    space, note = choose_feature_space(args.features)
    print(note)
    if (results.get("model"), results.get("features")) != (args.model, space):
        results = {"model": args.model, "features": space, "rows": []}
    results["machine"] = machine()
    extractor = load_extractor(space).eval()
    model = load_model(REPO / args.model, guide="none")
    crops = load_crops(REAL_CUB, CropSettings(size=model.network_config.image_size), progress=False)
    _, heldout = recover_split(model.data, crops, args.model)
    reference = real_features(crops, heldout, extractor, extractor.identity, 64, "cpu", None)
    results["num_real"] = len(heldout)
    arithmetic = precision_text(sampling_autocast(model.device, args.precision))
    done = {setting_of(r) for r in results["rows"]}
    jobs = [("none", steps, 1.0, "all") for steps in sorted(set(args.steps) | set(args.unguided_steps))]
    jobs += [(guide, steps, w, interval) for guide in args.guide for steps in args.steps for interval in args.intervals
             for w in args.weights]
    guides = {}
    for guide, steps, weight, interval in jobs:
        planned = {"guide": guide if guide == "none" else load_guide_name(guide), "steps": steps,
                   "guide_weight": weight, "interval": interval, "num_samples": args.num_samples,
                   "arithmetic": arithmetic}
        if setting_of(planned) in done:
            continue
        if guide == "none":
            model.guide = None
        else:
            if guide not in guides:
                guides[guide] = load_guide(guide)
                check_guide(model, guides[guide], guide)
            model.guide = guides[guide]
        timesteps = parse_interval(interval, model.schedule.num_steps)
        row = {**planned, **cost(model, steps, weight, timesteps),
               **with_precision(args.precision, lambda: measure(model, steps, weight, timesteps, args.num_samples,
                                                                reference, extractor))}
        print(json.dumps(row), flush=True)
        results["rows"].append(row)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    plot(results)
    print(table(results))


def same_noise_picture(folder: str, out: str, count: int = 8, rows: int = 2) -> None:
    """`rows` × `count` birds, each unguided pair above its guided twin from the same noise (DPM-Solver++ 10)."""
    from birdgen.pipeline import GenerationRequest, generate
    from birdgen.images import save_grid

    model = load_model(REPO / folder)
    grids = []
    for row in range(rows):
        request = GenerationRequest("dpmpp", 10, count, seed=row)
        grids += [generate(model, GenerationRequest("dpmpp", 10, count, seed=row, guide_weight=1.0)).images,
                  generate(model, request).images]
    save_grid(torch.cat(grids), out, columns=count)
    print(f"wrote {out}: rows alternate unguided / guided ({model.resolve_guidance().describe(False, model.guide.name)})")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
