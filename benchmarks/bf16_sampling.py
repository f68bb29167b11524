"""bf16 against float32 sampling on this CPU: speed and sample quality at the app's default
setting (the model's own sampler and guidance), from the same seeds.

Speed: the model's forward pass at batch 8 and one default generation of 8 birds, float32 and
bf16 autocast (channels_last, as the app runs) alternated in this process, medians and their
ratio. Quality: FD/KID/precision/recall of `--num-samples` birds in MobileNet features against
the held-out crops, float32 with seed A and seed B (the noise between two float32 runs), and
bf16 with seed A; bf16 passes where each of its differences from float32 at seed A is within
the float32 seed-to-seed difference. Names the CPU's bf16 flags, since the answer depends on them,
and keeps one speed record per kind of CPU (with and without native bf16) in the results file;
`--speed-only` updates this CPU's and keeps the quality record.

    python benchmarks/bf16_sampling.py --num-samples 1000
"""

from __future__ import annotations

import argparse

import torch

from common import REAL_CUB, REPO, alternate, machine, save, score_samples, stored_results, with_precision
from birdgen.data import CropSettings, load_crops, recover_split
from birdgen.evaluation import EvalSettings, real_features
from birdgen.features import choose_feature_space, load_extractor
from birdgen.model_folder import load_model
from birdgen.pipeline import DEFAULT_SAMPLING, GenerationRequest, generate
from birdgen.precision import NATIVE_BF16_FLAGS, cpu_flags

METRICS = ("fd", "kid", "precision", "recall")
RESULTS = REPO / "benchmarks" / "results" / "bf16_sampling.json"


def forward_speed(model, rounds: int) -> dict:
    x = torch.randn(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    t = torch.full((8,), 500)

    def forward(dtype):
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                return model.network(x, t).float()
        return run

    difference = (forward(torch.bfloat16)() - forward(None)()).abs().max().item()
    speeds = alternate({"fp32": forward(None), "bf16": forward(torch.bfloat16)}, rounds, 8)
    return {"forward_images_per_s": {k: round(v, 2) for k, v in speeds.items()},
            "forward_bf16_speedup": round(speeds["bf16"] / speeds["fp32"], 3),
            "forward_max_abs_difference": round(difference, 4)}


def generation_speed(model, rounds: int) -> dict:
    request = GenerationRequest(num_images=8, seed=0)
    speeds = alternate({setting: (lambda s=setting: with_precision(s, lambda: generate(model, request)))
                        for setting in ("fp32", "bf16")}, rounds, 8)
    return {"generation_images_per_s": {k: round(v, 2) for k, v in speeds.items()},
            "generation_bf16_speedup": round(speeds["bf16"] / speeds["fp32"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/small-attn")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1], help="seed A and seed B")
    parser.add_argument("--rounds", type=int, default=5, help="alternations for the speed medians")
    parser.add_argument("--speed-only", action="store_true")
    args = parser.parse_args()
    flags = cpu_flags()
    native = sorted(set(NATIVE_BF16_FLAGS) & flags)
    record = stored_results(RESULTS)
    if record.get("model") != args.model:
        record = {"model": args.model, "speed": {}}
    speed = {"machine": machine(), "cpu_bf16_flags": native or "none", "avx512f": "avx512f" in flags}
    model = load_model(REPO / args.model)
    speed.update(forward_speed(model, args.rounds))
    speed.update(generation_speed(model, max(1, args.rounds // 2)))
    print(speed)
    # one speed record per kind of CPU, so a run on the other kind does not replace this one's
    record["speed"][f"native bf16 ({', '.join(native)})" if native else "no native bf16"] = speed
    if not args.speed_only:
        space, _ = choose_feature_space("mobilenet")
        extractor = load_extractor(space).eval()
        crops = load_crops(REAL_CUB, CropSettings(size=64), progress=False)
        _, heldout = recover_split(model.data, crops, args.model)
        reference = real_features(crops, heldout, extractor, extractor.identity, 64, "cpu", None)
        seed_a, seed_b = args.seeds

        def score(setting: str, seed: int) -> dict:
            settings = EvalSettings(num_samples=args.num_samples, sampler=DEFAULT_SAMPLING[0], steps=DEFAULT_SAMPLING[1],
                                    seed=seed, memorization=False)
            row = with_precision(setting, lambda: score_samples(model, settings, reference, extractor))
            print(setting, seed, row)
            return row

        rows = {"fp32_seed_a": score("fp32", seed_a), "fp32_seed_b": score("fp32", seed_b),
                "bf16_seed_a": score("bf16", seed_a)}
        noise = {m: round(abs(rows["fp32_seed_a"][m] - rows["fp32_seed_b"][m]), 4) for m in METRICS}
        change = {m: round(abs(rows["bf16_seed_a"][m] - rows["fp32_seed_a"][m]), 4) for m in METRICS}
        record["quality"] = {"machine": speed["machine"], "num_samples": args.num_samples, "num_real": len(heldout),
                             "seeds": args.seeds, "rows": rows, "fp32_seed_to_seed": noise,
                             "bf16_vs_fp32_same_seed": change,
                             "bf16_within_noise": all(change[m] <= noise[m] for m in METRICS)}
    save("bf16_sampling", record)


if __name__ == "__main__":
    main()
