"""The fine-tune's training pace on this CPU, as it is and with its vector units capped at AVX2
(`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`: what the project's AVX2-only machines
run), in float32 and bf16 autocast, and with `--compile`: the plain command (`birdgen train
--data FOLDER --init-from models/small-attn --conditional`) for --steps steps each, in turns,
images/s as the median of the logged intervals after the first (and, compiled, after the
compilation), and the seconds from start to the first logged interval.

The folder: the 8 unseen species of `fine_tune_folder.py`. Run:
python benchmarks/fine_tune_pace.py [--steps 60] [--rounds 1]"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine, save
from fine_tune_folder import subset

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
CONTENDERS = {
    "native, auto precision": ({}, []),
    "native, fp32": ({}, ["--precision", "fp32"]),
    "AVX2 cap, fp32 (auto there)": (AVX2, ["--precision", "fp32"]),
    "AVX2 cap, fp32, --compile": (AVX2, ["--precision", "fp32", "--compile"]),
}


def one_run(name: str, steps: int, data: Path, folder: Path) -> dict:
    env_changes, flags = CONTENDERS[name]
    run = folder / f"run-{len(list(folder.iterdir()))}"
    command = [sys.executable, "-m", "birdgen", "train", "--out", str(run), "--data", str(data), "--init-from",
               str(REPO / "models" / "small-attn"), "--conditional", "--steps", str(steps), "--log-every", "10",
               "--sample-every", str(10 ** 6), "--checkpoint-every", str(10 ** 6), "--max-minutes", "0",
               "--no-progress", *flags]
    started = time.time()
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, **env_changes}, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skip = 2 if "--compile" in flags else 1  # the first interval holds warm-up (and compilation)
    return {"images_per_s": statistics.median(r["images_per_s"] for r in records[skip:]),
            "first_interval_s": round(records[0]["time"] - started, 1), "steps": steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    data = subset()
    description = machine()
    flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0]
    isa = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags)
    results = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in CONTENDERS:
                results[name].append(one_run(name, args.steps, data, Path(tmp)))
                print(name, results[name][-1], flush=True)
    base = statistics.median(r["images_per_s"] for r in results["AVX2 cap, fp32 (auto there)"])
    rows = [{"contender": name, "images_per_s": round(statistics.median(r["images_per_s"] for r in runs), 1),
             "vs_avx2_fp32": round(statistics.median(r["images_per_s"] for r in runs) / base, 2),
             "first_interval_s": runs[-1]["first_interval_s"]} for name, runs in results.items()]
    save("fine_tune_pace", {"machine": description, "cpu_flags": isa, "steps": args.steps, "rows": rows})
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
