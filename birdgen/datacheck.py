"""`birdgen data check`: a look at a set of pictures before any training, through the very
decode and crop cache that training reads (so what passes the check will train).

It reports what was found, what could not be used and why, the pictures' modes, sizes and
aspects, the classes and their balance, exact and near duplicates (also across classes and
across the held-out split), the split a run would make, plain advice by size, and a preview
grid of exactly what the model will see. The report and the preview live in the cache
directory, never in the dataset folder.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import MIN_PICTURE_SIDE, CropSettings, Crops, SplitSettings, cache_dir, load_crops, random_flip, resolve_split
from .sources import layout_of
from .images import grid_image
from .utils import atomic_write, atomic_write_text

NEAR_DUPLICATE_BITS = 4  # perceptual hashes (64 bits) at most this far apart are near-duplicates
FEW_PICTURES = 1000  # below this many, fine-tuning a shipped model beats training from scratch
PREVIEW_COUNT = 64
FLAGGED_SHOWN = 20  # files named in the text report per list (the JSON has them all)
# How a reader leaves unusable pictures out, where the report is read: the advice says "{skip}".
SKIP_CHOICE = "Leave out pictures that cannot be used"  # the Train page's checkbox
SKIP_HINTS = {"terminal": "train with --skip-unreadable", "page": f"tick '{SKIP_CHOICE}'"}


@dataclass
class CheckReport:
    source: str
    layout: str  # the source's layout, a key of sources.LAYOUTS
    found: int  # pictures by extension
    decoded: int
    unusable: list[tuple[str, str]]  # (file, reason): unreadable or too small
    ignored: list[str]  # other files, passed over by extension
    modes: dict[str, int]
    width: tuple[int, int, int]  # min, median, max in pixels
    height: tuple[int, int, int]
    aspect: tuple[float, float, float]  # width / height: min, median, max
    upscaled: int  # crops cut from fewer pixels than the model's side
    image_size: int
    crop: str
    classes: list[dict]  # {"name", "count", "train", "test"}, for a set with classes
    exact_duplicates: list[list[str]]  # groups of files with the same bytes
    near_duplicates: list[dict]  # {"a", "b", "distance", "cross_class", "cross_split"}
    split: dict  # {"split", "seed", "test_fraction", "train", "test"}
    advice: list[str]  # with "{skip}" where the reader's way to leave pictures out goes (`advice_for`)
    problems: list[str]  # why training would refuse this set (empty when it would train); "{skip}" as in advice
    preview: str = ""
    report: str = ""
    cache: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def trainable(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "advice": self.advice_for("terminal"), "problems": self.problems_for("terminal"),
                "trainable": self.trainable}

    def advice_for(self, reader: str) -> list[str]:
        """The advice in the words of where it is read: "terminal" (flags) or "page" (the Train page's choices)."""
        return [line.replace("{skip}", SKIP_HINTS[reader]) for line in self.advice]

    def problems_for(self, reader: str) -> list[str]:
        return [line.replace("{skip}", SKIP_HINTS[reader]) for line in self.problems]

    def text(self) -> str:
        """The report as a person reads it in a terminal."""
        lines = [f"{self.source}: {_layout_text(self)}",
                 f"  found {self.found} pictures · decoded {self.decoded} · unusable {len(self.unusable)}"
                 f" · skipped {len(self.ignored)} other files",
                 f"  modes: {', '.join(f'{mode} {count}' for mode, count in sorted(self.modes.items()))}",
                 f"  sizes: width {self.width[0]}–{self.width[2]} (median {self.width[1]}), height"
                 f" {self.height[0]}–{self.height[2]} (median {self.height[1]}), aspect w/h {self.aspect[0]:.2f}–"
                 f"{self.aspect[2]:.2f} (median {self.aspect[1]:.2f})",
                 f"  crops: {self.crop}, {self.image_size}×{self.image_size} px; {self.upscaled} upscaled (cut from"
                 f" fewer than {self.image_size} pixels)"]
        lines += _listed("unusable", [f"{key}: {reason}" for key, reason in self.unusable])
        lines += _listed("skipped (not a picture by extension)", self.ignored)
        if self.classes:
            counts = [c["count"] for c in self.classes]
            lines.append(f"  {len(self.classes)} classes, {min(counts)}–{max(counts)} pictures each"
                         f" (imbalance {max(counts) / min(counts):.1f}×):")
            lines += [f"    {c['name']:<40} {c['count']:>5}  train {c['train']:>5}  held out {c['test']:>4}"
                      for c in self.classes[:FLAGGED_SHOWN]]
            if len(self.classes) > FLAGGED_SHOWN:
                lines.append(f"    … and {len(self.classes) - FLAGGED_SHOWN} more classes (see --json)")
        lines += _listed("exact duplicates (same bytes)", [" = ".join(group) for group in self.exact_duplicates])
        lines += _listed(f"near-duplicates (perceptual hash within {NEAR_DUPLICATE_BITS} bits)",
                         [f"{d['a']} ~ {d['b']} ({d['distance']} bits{', other class' if d['cross_class'] else ''}"
                          f"{', across the split' if d['cross_split'] else ''})" for d in self.near_duplicates])
        split = self.split
        lines.append(f"  split: {split['split']} (seed {split['seed']}"
                     + (f", {split['test_fraction']:.0%} held out" if split["split"] != "official" else "")
                     + f"): {split['train']} train, {split['test']} held out")
        lines += [f"  advice: {line}" for line in self.advice_for("terminal")]
        lines.append(f"  preview: {self.preview}")
        lines.append(f"  report: {self.report}")
        lines.append("  ready to train" if self.trainable else
                     f"  training would refuse: {'; '.join(self.problems_for('terminal'))}")
        return "\n".join(lines)


def _layout_text(report: CheckReport) -> str:
    return layout_of(report.layout).describe(len(report.classes))


def _listed(title: str, entries: list[str]) -> list[str]:
    if not entries:
        return []
    shown = [f"  {title}: {len(entries)}"] + [f"    {entry}" for entry in entries[:FLAGGED_SHOWN]]
    if len(entries) > FLAGGED_SHOWN:
        shown.append(f"    … and {len(entries) - FLAGGED_SHOWN} more (see --json)")
    return shown


def near_duplicate_pairs(hashes: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS) -> list[tuple[int, int, int]]:
    """(i, j, distance) with i < j for 64-bit hashes at most `max_bits` apart, in blocks so that
    memory stays small for tens of thousands of pictures."""
    as_bytes = hashes.astype(">u8").view(np.uint8).reshape(-1, 8)
    popcount = np.array([bin(v).count("1") for v in range(256)], np.uint8)
    pairs = []
    for start in range(0, len(as_bytes), 256):
        block = as_bytes[start:start + 256]
        distance = popcount[block[:, None, :] ^ as_bytes[None, :, :]].sum(axis=2, dtype=np.int32)
        for i, j in zip(*np.nonzero(distance <= max_bits)):
            if start + i < j:
                pairs.append((int(start + i), int(j), int(distance[i, j])))
    return pairs


def advice_for(count: int, classes: list[dict], upscaled: int, duplicates: int, unusable: int) -> list[str]:
    """Plain advice by the set's size and what the check found."""
    advice = []
    if count < FEW_PICTURES:
        advice.append(f"{count} pictures: fine-tune a shipped model (`--init-from models/small-attn"
                      f"{' --conditional' if classes else ''}`) rather than train from scratch, and read the"
                      " memorization check (`birdgen eval`): a few hundred pictures are easy to copy")
    else:
        advice.append(f"{count} pictures: fine-tuning a shipped model gives birds within minutes; from scratch, expect"
                      " no birds before about 150k images seen (hours on a CPU)")
    if classes:
        counts = {c["name"]: c["count"] for c in classes}
        small = [name for name, n in counts.items() if n < 20]
        if small:
            advice.append(f"{len(small)} classes have fewer than 20 pictures ({', '.join(small[:5])}"
                          f"{', …' if len(small) > 5 else ''}): their samples and accuracy will be weak")
        if max(counts.values()) > 3 * min(counts.values()):
            advice.append("classes are imbalanced (over 3×): the larger ones will dominate unconditional samples")
    if upscaled > 0.1 * count:
        advice.append(f"{upscaled} crops are upscaled from smaller pictures: they will look soft")
    if duplicates:
        advice.append(f"{duplicates} duplicate pair{'s' if duplicates > 1 else ''}: duplicates weigh double in"
                      " training and, across the split, make held-out numbers look better than they are; remove them")
    if unusable:
        advice.append(f"{unusable} pictures cannot be used: fix or remove them, or {{skip}}")
    return advice


def check_crops(crops: Crops, source: str, settings: SplitSettings = SplitSettings(), write: bool = True) -> CheckReport:
    """The report for crops already decoded (by `load_crops`), written with its preview beside
    the crop cache when `write`."""
    split = resolve_split(settings.split, crops.kind)
    seed, test_fraction = settings.seed, settings.test_fraction
    train, test = crops.split(settings, need_heldout=True)
    in_test = np.zeros(len(crops), bool)
    in_test[test] = True
    classes = []
    if crops.kind.has_classes:
        for class_id in np.unique(crops.labels):
            members = crops.labels == class_id
            classes.append({"name": crops.class_names.get(int(class_id), str(class_id)), "count": int(members.sum()),
                            "train": int((members & ~in_test).sum()), "test": int((members & in_test).sum())})
    groups: dict[str, list[int]] = {}
    for index, digest in enumerate(crops.sha256.tolist()):
        groups.setdefault(digest, []).append(index)
    exact = [g for g in groups.values() if len(g) > 1]
    same_bytes = {crops.sha256[i] for g in exact for i in g}
    near = [{"a": str(crops.keys[i]), "b": str(crops.keys[j]), "distance": d,
             "cross_class": bool(crops.labels[i] != crops.labels[j]), "cross_split": bool(in_test[i] != in_test[j])}
            for i, j, d in near_duplicate_pairs(crops.phash)
            if not (crops.sha256[i] == crops.sha256[j] and crops.sha256[i] in same_bytes)]
    widths, heights = crops.sizes[:, 0], crops.sizes[:, 1]
    aspects = widths / heights
    duplicate_pairs = sum(len(g) * (len(g) - 1) // 2 for g in exact) + len(near)
    problems = []
    if crops.unusable:
        problems.append(f"{len(crops.unusable)} pictures cannot be used ({{skip}} to leave them out)")
    report = CheckReport(
        source=source, layout=crops.layout, found=len(crops) + len(crops.unusable), decoded=len(crops),
        unusable=list(crops.unusable), ignored=list(crops.ignored), modes=dict(Counter(crops.modes.tolist())),
        width=_spread(widths), height=_spread(heights),
        aspect=(round(float(aspects.min()), 3), round(float(np.median(aspects)), 3), round(float(aspects.max()), 3)),
        upscaled=int(crops.upscaled.sum()), image_size=int(crops.images.shape[1]), crop=crops.settings.crop,
        classes=classes, exact_duplicates=[[str(crops.keys[i]) for i in g] for g in exact], near_duplicates=near,
        split={"split": split, "seed": seed, "test_fraction": test_fraction, "train": len(train), "test": len(test)},
        advice=advice_for(len(crops), classes, int(crops.upscaled.sum()), duplicate_pairs, len(crops.unusable)),
        problems=problems, cache=str(crops.cache_path or ""),
        extra={"min_picture_side": MIN_PICTURE_SIDE})
    if write:
        stem = crops.cache_path.stem if crops.cache_path else f"{crops.dataset}-uncached"
        folder = cache_dir() / "checks"
        report.preview = str(folder / f"{stem}-preview.png")
        report.report = str(folder / f"{stem}.json")
        save_preview(crops, train, Path(report.preview), seed)
        atomic_write_text(Path(report.report), json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _spread(values: np.ndarray) -> tuple[int, int, int]:
    return int(values.min()), int(np.median(values)), int(values.max())


def preview_indices(crops: Crops, indices: np.ndarray, count: int = PREVIEW_COUNT) -> np.ndarray:
    """Up to `count` of `indices`, taken in turn from each class so that every class shows."""
    by_class = [indices[crops.labels[indices] == c] for c in np.unique(crops.labels[indices])]
    chosen = []
    for row in range(max(len(members) for members in by_class)):
        chosen += [members[row] for members in by_class if row < len(members)]
        if len(chosen) >= count:
            break
    return np.array(chosen[:count])


def save_preview(crops: Crops, indices: np.ndarray, path: Path, seed: int = 0) -> Path:
    """A grid of training crops exactly as a batch shows them to the model: decoded, cropped,
    resized and flipped at random as training flips them."""
    chosen = preview_indices(crops, indices)
    generator = torch.Generator().manual_seed(seed)
    batch = random_flip(crops.tensor(chosen), generator)
    grid = grid_image(batch, columns=8)
    return atomic_write(path, "the preview", grid.save)


def check_dataset(path: str | os.PathLike, crop: CropSettings = CropSettings(), split: SplitSettings = SplitSettings(),
                  progress: bool = True) -> CheckReport:
    """Decodes every picture at `path` once into the crop cache and reports on the set."""
    crops = load_crops(path, crop, progress=progress)
    return check_crops(crops, str(path), split)


def refusal(crops: Crops, data: str) -> str:
    """The one line a run refuses a set with unusable pictures with, naming the report."""
    report = check_crops(crops, data)
    key, reason = crops.unusable[0]
    more = f" and {len(crops.unusable) - 1} more" if len(crops.unusable) > 1 else ""
    return (f"{data}: {len(crops.unusable)} of {report.found} pictures cannot be used ({key}: {reason}{more}; all in"
            f" {report.report}); fix them, or pass --skip-unreadable to train without them")
