"""Shared by the benchmarks: alternate two contenders, report medians and ratios, and say
which machine (and what else was running on it) produced the numbers."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from birdgen.precision import PRECISION_ENV  # noqa: E402
from birdgen.utils import machine_description  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REAL_CUB = REPO.parent / "shared" / "data" / "CUB_200_2011"


def cpu_flags() -> str:
    """The vector extensions of this CPU that decide training speed (a benchmark row names them)."""
    flags = open("/proc/cpuinfo").read().split("flags", 1)[1].split("\n", 1)[0].split()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def machine(device="cpu") -> str:
    load = os.getloadavg()[0]
    return f"{machine_description(device)}, {torch.get_num_threads()} torch threads, load average {load:.1f} at start"


def alternate(contenders: dict, rounds: int, work_per_call: float, warmup: int = 1) -> dict[str, float]:
    """Calls each contender `rounds` times in turn (A, B, A, B, …) after `warmup` calls each;
    returns the median throughput (work_per_call / seconds) of each."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            started = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append(work_per_call / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in samples.items()}


class RssPeak:
    """Samples this process's resident memory every few ms; `growth_mb` is the peak above
    the level at entry (what the measured work itself needed)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20

    def rss_mb(self) -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page_mb

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        import threading

        self.start = self.peak = self.rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_mb())
        self.growth_mb = self.peak - self.start


def peak_rss_mb_in_child(script: str, *args: str) -> float:
    """Runs `script args` in a fresh interpreter that prints a memory figure in MiB last."""
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True,
                            cwd=REPO)
    return float(result.stdout.strip().splitlines()[-1])


def save(name: str, record: dict) -> None:
    out = REPO / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def score_samples(model, settings, reference, extractor) -> dict:
    """Generates settings.num_samples birds and scores them against the reference features:
    FD, KID, precision/recall, images/s and seconds (the quality benchmarks' one measurement)."""
    import warnings

    from birdgen.evaluation import extract_features, generate_uint8, kid_and_fid, precision_recall

    started = time.perf_counter()
    images = generate_uint8(model, settings)
    seconds = time.perf_counter() - started
    features = extract_features(extractor, images, 64, "cpu", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = {**kid_and_fid(reference, features), **precision_recall(reference, features)}
    return {"fd": round(scores["fid"], 2), "kid": round(scores["kid_mean"], 4), "kid_std": round(scores["kid_std"], 4),
            "precision": round(scores["precision"], 3), "recall": round(scores["recall"], 3),
            "images_per_s": round(settings.num_samples / seconds, 2), "seconds": round(seconds, 1)}


def with_precision(setting: str | None, work):
    """Runs `work()` with BIRDGEN_PRECISION set to `setting` (the model reads it per generation);
    None leaves it as it is."""
    if setting is None:
        return work()
    with mock.patch.dict(os.environ, {PRECISION_ENV: setting}):
        return work()


def stored_results(path: Path) -> dict:
    """A benchmark's results file, or {} before its first run."""
    return json.loads(path.read_text()) if path.is_file() else {}


def load_guide_name(spec: str) -> str:
    """A guide's row name: its folder's name, or RUN@STEP[:raw] for a run's checkpoint."""
    if "@" in spec:
        run, step = spec.rsplit("@", 1)
        return f"{Path(run).name}@{step}"
    return Path(spec).name


def load_guide(spec: str):
    """A guide model folder, or RUN@STEP: the EMA weights of a training run's checkpoint at that step
    (RUN@STEP:raw: its training weights, as `birdgen export --raw-weights` writes them), written to a
    temporary model folder without a card, to compare checkpoints quickly."""
    import tempfile

    from birdgen.model_folder import load_model
    from birdgen.export import export_run

    if "@" not in spec:
        return load_model(REPO / spec, guide="none")
    run, step = spec.rsplit("@", 1)
    step, _, raw = step.partition(":")
    folder = Path(tempfile.mkdtemp()) / load_guide_name(spec)
    export_run(REPO / run, folder, half=True, step=int(step), averaged=raw != "raw")
    guide = load_model(folder, guide="none")
    guide.path = folder
    return guide
