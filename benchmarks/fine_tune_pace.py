"""The fine-tune's training pace on this CPU, as it is and with its vector units capped at AVX2
(`ATEN_CPU_CAPABILITY=avx2`, `ONEDNN_MAX_CPU_ISA=AVX2`: what the project's AVX2-only machines
run), in float32 and bf16 autocast, and with `--compile`: the plain command (`birdgen train
--data FOLDER --init-from models/small-attn --conditional`) for --steps steps each, in turns,
images/s as the median of the logged intervals after the first (and, compiled, after the
compilation), and the seconds from start to the first logged interval.

The folder: the 8 unseen species of `fine_tune_folder.py`. Run:
python benchmarks/fine_tune_pace.py [--steps 60] [--rounds 1] [--threads N] [--contenders …] [--label L]"""

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

from common import REPO, cpu_flags, machine, save
from fine_tune_folder import subset

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
CONTENDERS = {
    "native, auto precision": ({}, []),
    "native, fp32": ({}, ["--precision", "fp32"]),
    "AVX2 cap, fp32 (auto there)": (AVX2, ["--precision", "fp32"]),
    "AVX2 cap, fp32, --compile": (AVX2, ["--precision", "fp32", "--compile"]),
    "AVX2 cap, fp32, --freeze outer": (AVX2, ["--precision", "fp32", "--freeze", "outer"]),
    "AVX2 cap, fp32, --freeze convolutions": (AVX2, ["--precision", "fp32", "--freeze", "convolutions"]),
}
BASELINE = "AVX2 cap, fp32 (auto there)"


def one_run(name: str, steps: int, data: Path, folder: Path, threads: int) -> dict:
    env_changes, flags = CONTENDERS[name]
    run = folder / f"run-{len(list(folder.iterdir()))}"
    command = [sys.executable, "-m", "birdgen", "train", "--out", str(run), "--data", str(data), "--init-from",
               str(REPO / "models" / "small-attn"), "--conditional", "--steps", str(steps), "--log-every", "10",
               "--sample-every", str(10 ** 6), "--checkpoint-every", str(10 ** 6), "--max-minutes", "0",
               "--no-progress", "--num-threads", str(threads), *flags]
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
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (default: all cores)")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS),
                        help=f"which to run ({BASELINE!r} always is)")
    parser.add_argument("--label", default="", help="results file suffix (default: fine_tune_pace.json)")
    args = parser.parse_args()
    contenders = [BASELINE, *(name for name in args.contenders if name != BASELINE)]
    data = subset()
    description = machine()
    results = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in contenders:
                results[name].append(one_run(name, args.steps, data, Path(tmp), args.threads))
                print(name, results[name][-1], flush=True)
    base = statistics.median(r["images_per_s"] for r in results[BASELINE])
    rows = [{"contender": name, "images_per_s": round(statistics.median(r["images_per_s"] for r in runs), 1),
             "vs_avx2_fp32": round(statistics.median(r["images_per_s"] for r in runs) / base, 2),
             "first_interval_s": runs[-1]["first_interval_s"]} for name, runs in results.items()]
    save("fine_tune_pace" + (f"_{args.label}" if args.label else ""),
         {"machine": description, "cpu_flags": cpu_flags(), "threads": args.threads or "all", "steps": args.steps,
          "rows": rows})
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
