"""`birdgen data check` on the 2,889 real CUB pictures read as a class-folder set
(../shared/data/CUB_200_2011/images), from a cold cache, against reading the same files through
the CUB layout with the same crop mode (`center`), in turns; and whether the two give the same
crops file by file (so the same training batches of the same files). Run:
python benchmarks/data_check.py"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

from common import REAL_CUB, machine, save

from birdgen.data import CropSettings, load_crops
from birdgen.datacheck import check_dataset


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not (REAL_CUB / "images.txt").is_file():
        sys.exit(f"needs the real data at {REAL_CUB}")
    description = machine()
    seconds = {"data check of the images/ folder": [], "load_crops of the CUB layout (center)": []}
    for _ in range(args.rounds):
        for name in seconds:
            with tempfile.TemporaryDirectory() as cache, mock.patch.dict("os.environ", {"BIRDGEN_CACHE_DIR": cache}):
                started = time.perf_counter()
                if name.startswith("data check"):
                    report = check_dataset(REAL_CUB / "images", CropSettings(crop="center"), progress=False)
                else:
                    load_crops(REAL_CUB, CropSettings(crop="center"), progress=False)
                seconds[name].append(time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as cache, mock.patch.dict("os.environ", {"BIRDGEN_CACHE_DIR": cache}):
        folder = load_crops(REAL_CUB / "images", CropSettings(crop="center"), progress=False)
        layout = load_crops(REAL_CUB, CropSettings(crop="center"), progress=False)
    order = {key: index for index, key in enumerate(layout.keys.tolist())}
    aligned = np.array([order[key] for key in folder.keys.tolist()])
    medians = {name: round(statistics.median(values), 2) for name, values in seconds.items()}
    save("data_check", {
        "machine": description, "pictures": report.decoded, "classes": len(report.classes),
        "seconds_median": medians, "seconds_all": {k: [round(v, 2) for v in vs] for k, vs in seconds.items()},
        "ratio_check_over_layout": round(medians["data check of the images/ folder"]
                                         / medians["load_crops of the CUB layout (center)"], 2),
        "same_crops_per_file": bool(np.array_equal(folder.images, layout.images[aligned])),
        "same_order": bool((aligned == np.arange(len(aligned))).all()),
        "exact_duplicates": len(report.exact_duplicates), "near_duplicates": len(report.near_duplicates),
        "report": str(Path(report.report).name)})


if __name__ == "__main__":
    main()
