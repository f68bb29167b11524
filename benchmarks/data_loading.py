"""Data loading: training batches from birdgen's crop cache versus decoding and cropping the
JPEGs on the fly (what a plain torchvision Dataset does each epoch). Run:
python benchmarks/data_loading.py"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from common import REAL_CUB, alternate, machine, save

from birdgen.data import CropSettings, load_crop, load_crops, random_flip
from birdgen.images import to_model_range
from birdgen.sources import read_metadata
from birdgen.run_folder import BatchStream

BATCH = 32


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches-per-round", type=int, default=10)
    args = parser.parse_args()
    if not (REAL_CUB / "images.txt").is_file():
        sys.exit(f"needs the real data at {REAL_CUB}")
    meta = read_metadata(REAL_CUB)
    images = torch.from_numpy(load_crops(REAL_CUB, progress=False).images)
    stream = BatchStream(len(images), BATCH, seed=0)
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)

    def from_cache():
        for _ in range(args.batches_per_round):
            random_flip(to_model_range(images[stream.next()]), generator)

    def on_the_fly():
        for _ in range(args.batches_per_round):
            picks = rng.choice(len(meta.records), BATCH, replace=False)
            crops = [load_crop(REAL_CUB / "images" / meta.records[i].path, meta.records[i].box,
                               CropSettings(64, "square", 0.1))
                     for i in picks]
            random_flip(to_model_range(torch.from_numpy(np.stack(crops))), generator)

    description = machine()
    speed = alternate({"crop cache": from_cache, "decode + crop JPEGs": on_the_fly}, args.rounds,
                      BATCH * args.batches_per_round)
    save("data_loading", {"machine": description, "batch": BATCH, "images_per_s": speed,
                          "ratio": speed["crop cache"] / speed["decode + crop JPEGs"]})


if __name__ == "__main__":
    main()
