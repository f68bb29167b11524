"""Crops: any picture source (`sources`) turned into one in-memory set of square uint8 crops,
cached once per settings, with labels, class names and the split bookkeeping of a model.

Crops are cached as one npz per source and settings (see `load_crops`), so training reads
pictures at memory speed and a bad file can never stop a run part-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import imagehash
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .sources import DatasetError, Layout, PictureError, Source, decode_picture, layout_of, open_source, parse_background
from .images import to_model_range
from .utils import atomic_write

CROP_MODES = ("square", "bbox", "center", "full")  # square/bbox need bounding boxes (CUB)
SPLITS = ("auto", "official", "random", "stratified")
TRAIN_PARTS = ("train", "all")  # what a run trains on: the split's training part, or every picture
MIN_PICTURE_SIDE = 32  # pictures whose shorter side is smaller are refused, by name
CACHE_FORMAT_VERSION = 2


def cache_dir() -> Path:
    """Where birdgen keeps derived files: $BIRDGEN_CACHE_DIR, else ~/.cache/birdgen."""
    return Path(os.environ.get("BIRDGEN_CACHE_DIR") or Path.home() / ".cache" / "birdgen")


def resolve_split(split: str, kind: Layout) -> str:
    """'auto': the source's own split (official for CUB, stratified for class folders, random for
    a flat folder). A source asked for a split it cannot make says why not."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if split == "auto":
        return kind.default_split
    if split == "official" and not kind.official_split:
        raise DatasetError("an image folder has no official train/test split; use --split random or stratified"
                           " (seeded, --test-fraction held out)")
    if split == "stratified" and not kind.has_classes:
        raise DatasetError("a flat folder has no classes to stratify by; use --split random")
    return split


def crop_box(image_size: tuple[int, int], box, mode: str = "square", padding: float = 0.1):
    """The (left, top, right, bottom) region to cut for one bird.

    `bbox`: the bounding box itself (clipped to the image), later stretched to a square.
    `square`: a square around the box centre with side max(w, h) * (1 + padding), clipped to
    the image while staying square where the image allows, so birds keep their proportions.
    """
    width, height = image_size
    x, y, w, h = box
    left, top = max(0.0, x), max(0.0, y)
    right, bottom = min(float(width), x + w), min(float(height), y + h)
    if right - left < 1 or bottom - top < 1:
        raise ValueError(f"box {box} lies outside the {width}x{height} image")
    if mode == "bbox":
        return left, top, right, bottom
    if mode != "square":
        raise ValueError(f"unknown crop mode {mode!r}; choose one of {CROP_MODES}")
    side = min(max(right - left, bottom - top) * (1 + padding), float(min(width, height)))
    cx, cy = (left + right) / 2, (top + bottom) / 2
    left = min(max(0.0, cx - side / 2), width - side)
    top = min(max(0.0, cy - side / 2), height - side)
    return left, top, left + side, top + side


def crop_picture(image: Image.Image, box, settings: "CropSettings") -> tuple[np.ndarray, float]:
    """One upright RGB picture as a size × size uint8 crop, and the side (source pixels) the crop
    was cut from: `center` the largest centred square, `full` the whole picture padded to a square
    with the background colour, `square`/`bbox` around the bounding box (see `crop_box`)."""
    size = settings.size
    width, height = image.size
    if settings.crop == "full":
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), parse_background(settings.background))
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image, region = canvas, (0.0, 0.0, float(side), float(side))
    elif settings.crop == "center":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        region = (left, top, left + side, top + side)
    else:
        region = crop_box(image.size, box, settings.crop, settings.padding)
    crop = image.resize((size, size), Image.Resampling.LANCZOS, box=region, reducing_gap=3.0)
    return np.asarray(crop, dtype=np.uint8), min(region[2] - region[0], region[3] - region[1])


def load_crop(path: Path, box, settings: "CropSettings") -> np.ndarray:
    """Decodes one picture file (see `sources.decode_picture`) and crops it (a resolved crop mode)."""
    image = decode_picture(Path(path).read_bytes(), parse_background(settings.background)).image
    return crop_picture(image, box, settings)[0]


@dataclass(frozen=True)
class CropSettings:
    """How pictures become crops: the one place their defaults and ranges live (TrainConfig's
    fields, the CLI's crop flags, the split record and the check all read them here)."""

    size: int = 64  # crop side in pixels
    crop: str = "auto"  # "auto" (the source's default: square around CUB's boxes, else center) or a CROP_MODES
    padding: float = 0.1  # square crops: margin around the box, as a fraction of its side
    background: str = "white"  # what transparent pictures (and `full` crops' borders) are filled with

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f"image size {self.size} is too small (at least 8 pixels)")
        if self.crop not in ("auto", *CROP_MODES):
            raise ValueError(f"unknown crop mode {self.crop!r}; choose one of {CROP_MODES}")
        if not 0 <= self.padding <= 2:
            raise ValueError(f"padding {self.padding} out of range [0, 2]")
        parse_background(self.background)

    def for_layout(self, kind: Layout) -> "CropSettings":
        """These settings with 'auto' made the source's own crop; a crop the source cannot cut is refused."""
        crop = kind.default_crop if self.crop == "auto" else self.crop
        if crop in ("square", "bbox") and not kind.has_boxes:
            raise DatasetError(f"crop {crop!r} needs bounding boxes, which an image folder does not have; use center"
                               " (a square from the middle) or full (the whole picture padded to a square)")
        return replace(self, crop=crop)


@dataclass(frozen=True)
class SplitSettings:
    """Which pictures a model trains on and which it never sees: the split, its seed, the share
    held out (random and stratified splits), and whether the run trains on every picture."""

    split: str = "auto"  # "auto" (official for CUB, stratified for class folders, else random) or a SPLITS
    seed: int = 0  # seeds a random or stratified split
    test_fraction: float = 0.2  # random and stratified splits: share of images (of each class) held out
    train_on: str = "train"  # "train" part of the split, or "all" images

    def __post_init__(self):
        for name, allowed in (("split", SPLITS), ("train_on", TRAIN_PARTS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")


@dataclass
class Crops:
    """Every usable picture of a source as a uint8 HWC crop, with its labels, its official split
    (CUB only), what each file was, and the files that could not be used."""

    images: np.ndarray  # (N, size, size, 3) uint8
    image_ids: np.ndarray  # (N,) int64: CUB's ids, a folder's position in sorted key order
    labels: np.ndarray  # (N,) int64 class ids (0 where the source has no classes)
    is_train: np.ndarray  # (N,) bool, the official split (all False without one)
    class_names: dict[int, str]
    layout: str  # the source's layout, a key of sources.LAYOUTS
    dataset: str = ""  # the source's folder (or zip) name
    root: str = ""  # the source's path, resolved
    keys: np.ndarray = field(default_factory=lambda: np.array([], str))  # (N,) paths inside the source
    modes: np.ndarray = field(default_factory=lambda: np.array([], str))  # (N,) each file's own image mode
    sizes: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (N, 2) upright width, height
    sha256: np.ndarray = field(default_factory=lambda: np.array([], str))  # (N,) of each file's bytes
    phash: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # (N,) perceptual hash of the picture
    upscaled: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (N,) cut from fewer pixels than size
    unusable: list[tuple[str, str]] = field(default_factory=list)  # (key, reason): unreadable or too small
    ignored: list[str] = field(default_factory=list)  # files that are not pictures, by extension
    settings: CropSettings | None = None
    cache_path: Path | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def kind(self) -> Layout:
        return layout_of(self.layout)

    def split(self, settings: SplitSettings, need_heldout: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(training, held-out) indices of a split: 'official' (CUB's file), 'random' (a seeded share
        `test_fraction` of all pictures held out), 'stratified' (that share of each class held out)
        or 'auto' (see `resolve_split`); with train_on 'all' every picture trains. `need_heldout`: an
        empty held-out part is an error too."""
        split = resolve_split(settings.split, self.kind)
        train, heldout = np.zeros(len(self), bool), np.zeros(len(self), bool)
        if split == "official":
            train, heldout = self.is_train, ~self.is_train
        else:
            rng = np.random.default_rng(settings.seed)
            groups = [np.arange(len(self))] if split == "random" else \
                [np.flatnonzero(self.labels == label) for label in np.unique(self.labels)]
            for group in groups:
                order = group[rng.permutation(len(group))]
                n_test = int(round(len(group) * settings.test_fraction))
                train[order[n_test:]], heldout[order[:n_test]] = True, True
        if settings.train_on != "all" and not train.any():
            raise DatasetError(f"the {split} split has no train images")
        if need_heldout and not heldout.any():
            raise DatasetError(f"the {split} split has no test images")
        return (np.arange(len(self)) if settings.train_on == "all" else np.flatnonzero(train)), np.flatnonzero(heldout)

    def tensor(self, indices=None) -> torch.Tensor:
        """Images as float32 NCHW in [-1, 1], the model's pixel range."""
        images = self.images if indices is None else self.images[indices]
        return to_model_range(torch.from_numpy(images))


def ids_digest(image_ids: np.ndarray) -> str:
    return hashlib.sha256(",".join(str(int(i)) for i in sorted(image_ids)).encode()).hexdigest()


def split_record(crops: Crops, settings: SplitSettings) -> dict:
    """What a model trained on, for its model folder (`records.DataRecord`'s fields): enough to
    rebuild its training and held-out crops exactly from the same dataset (checked by a digest of
    the image ids)."""
    train = crops.split(settings)[0]
    cut = crops.settings
    return {"dataset": crops.dataset, "num_images": len(crops), "image_size": cut.size, "crop": cut.crop,
            "padding": cut.padding, "split": resolve_split(settings.split, crops.kind), "seed": settings.seed,
            "test_fraction": settings.test_fraction, "train_on": settings.train_on, "num_train": len(train),
            "train_ids_sha256": ids_digest(crops.image_ids[train]), "layout": crops.layout,
            "background": cut.background, "path": crops.root}


def require_split_record(record, where: str) -> None:
    """A one-line DatasetError when a model folder has no split record (`records.DataRecord`)."""
    if not record:
        raise DatasetError(f"{where}: the model folder does not record the crops it trained on (no 'data' in"
                           " config.json; re-export it with `birdgen export`), so its held-out crops are unknown")


def recover_split(record, crops: Crops, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices) of `crops` for a model's split record (a
    `records.DataRecord`); one-line errors when the record is missing or the dataset cannot give
    back the same split."""
    require_split_record(record, where)
    if record.num_images != len(crops):
        raise DatasetError(f"{where}: the model trained on a dataset of {record.num_images} images; this one has"
                           f" {len(crops)}, so its split cannot be rebuilt (use the dataset it was trained on)")
    if record.train_on == "all":
        raise DatasetError(f"{where}: the model trained on every image, so there are no held-out crops to"
                           " compare with")
    train, heldout = crops.split(record.split_settings, need_heldout=True)
    if ids_digest(crops.image_ids[train]) != record.train_ids_sha256:
        raise DatasetError(f"{where}: this dataset's {record.split} split (seed {record.seed}) does not give the"
                           " training images the model recorded; use the dataset it was trained on")
    return train, heldout


def model_crops(record, root: str | os.PathLike, where: str) -> tuple[Crops, np.ndarray, np.ndarray]:
    """The crops a model trained on, rebuilt from `root` with its split record's settings, and
    its (training, held-out) indices; one-line errors when `root` is not that dataset."""
    require_split_record(record, where)
    crops = load_crops(root, record.crop_settings, progress=False)
    train, heldout = recover_split(record, crops, where)
    return crops, train, heldout


def cache_path_for(source: Source, settings: CropSettings, directory: Path | None = None) -> Path:
    key = json.dumps({"root": str(source.path.resolve()), "settings": asdict(settings),
                      "format": CACHE_FORMAT_VERSION, "source": source.fingerprint()}, sort_keys=True)
    name = f"{source.kind.cache_prefix}-{settings.size}px-{settings.crop}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    return (directory or cache_dir() / "crops") / name


def load_crops(root: str | os.PathLike, settings: CropSettings = CropSettings(), strict: bool = False,
               cache: bool = True, cache_directory: Path | None = None, progress: bool = True) -> Crops:
    """Decodes and crops every picture of the source at `root` (a CUB root, a folder or a zip)
    once and caches the result; later calls load the cache. Crop 'auto': the source's default.

    A file listed by CUB's metadata that is missing always fails. An unreadable or too small
    picture fails with `strict`, else it is left out and listed in `Crops.unusable` with its
    reason (training refuses such a set unless told to skip them).
    """
    source = open_source(root)
    settings = settings.for_layout(source.kind)
    path = cache_path_for(source, settings, cache_directory) if cache else None
    if path is not None and path.is_file():
        try:
            return _read_cache(path, source, settings)
        except (OSError, ValueError, KeyError) as error:
            warnings.warn(f"{path}: unreadable crop cache ({error}); rebuilding it")
    crops = build_crops(source, settings, strict, progress)
    if path is not None:
        _write_cache(path, crops)
        crops.cache_path = path
    return crops


@dataclass(frozen=True)
class _Decoded:
    crop: np.ndarray | None
    reason: str = ""  # why the picture cannot be used
    mode: str = ""
    size: tuple[int, int] = (0, 0)
    sha256: str = ""
    phash: int = 0
    cut_from: float = 0.0


def _decode_item(source: Source, item, settings: CropSettings, background) -> _Decoded:
    data = source.read(item)
    digest = hashlib.sha256(data).hexdigest()
    try:
        decoded = decode_picture(data, background)
        if min(decoded.size) < MIN_PICTURE_SIDE:
            raise PictureError(f"only {decoded.size[0]}×{decoded.size[1]} pixels, below the {MIN_PICTURE_SIDE}-pixel"
                               " minimum side")
        crop, cut_from = crop_picture(decoded.image, item.box, settings)
    except PictureError as error:
        return _Decoded(None, str(error), sha256=digest)
    except ValueError as error:  # a CUB box that lies outside its picture
        raise DatasetError(f"{source.path}: {item.key}: {error}") from None
    phash = int(str(imagehash.phash(decoded.image)), 16)
    return _Decoded(crop, "", decoded.mode, decoded.size, digest, phash, cut_from)


def build_crops(source: Source, settings: CropSettings, strict: bool = False, progress: bool = True) -> Crops:
    """Decodes every item once (on all cores: Pillow decodes without the GIL) into `Crops`."""
    background = parse_background(settings.background)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda item: _decode_item(source, item, settings, background), source.items)
        decoded = list(tqdm(results, total=len(source.items), desc=f"Decoding {source.name}", unit="img",
                            disable=not progress))
    kept = [(item, d) for item, d in zip(source.items, decoded) if d.crop is not None]
    unusable = [(item.key, d.reason) for item, d in zip(source.items, decoded) if d.crop is None]
    if unusable and strict:
        key, reason = unusable[0]
        raise DatasetError(f"{source.path}: {key}: {reason}" + (f" (and {len(unusable) - 1} more)"
                                                               if len(unusable) > 1 else ""))
    if not kept:
        raise DatasetError(f"{source.path}: no usable pictures ({len(unusable)} unreadable or too small)")
    return Crops(
        images=np.stack([d.crop for _, d in kept]),
        image_ids=np.array([item.image_id for item, _ in kept], np.int64),
        labels=np.array([item.class_id for item, _ in kept], np.int64),
        is_train=np.array([bool(item.is_train) for item, _ in kept], bool),
        class_names=dict(source.class_names), layout=source.layout, dataset=source.name,
        root=str(source.path.resolve()),
        keys=np.array([item.key for item, _ in kept], str),
        modes=np.array([d.mode for _, d in kept], str),
        sizes=np.array([d.size for _, d in kept], np.int64).reshape(-1, 2),
        sha256=np.array([d.sha256 for _, d in kept], str),
        phash=np.array([d.phash for _, d in kept], np.uint64),
        upscaled=np.array([d.cut_from < settings.size for _, d in kept], bool),
        unusable=unusable, ignored=list(source.ignored), settings=settings)


_ARRAYS = ("images", "image_ids", "labels", "is_train", "keys", "modes", "sizes", "sha256", "phash", "upscaled")


def _write_cache(path: Path, crops: Crops) -> None:
    names = sorted(crops.class_names)
    arrays = {**{name: getattr(crops, name) for name in _ARRAYS},
              "unusable": np.array(crops.unusable, dtype=str).reshape(-1, 2),
              "ignored": np.array(crops.ignored, dtype=str), "class_ids": np.array(names, np.int64),
              "class_names": np.array([crops.class_names[c] for c in names], str),
              "layout": np.array(crops.layout), "dataset": np.array(crops.dataset)}
    atomic_write(path, "the crop cache", lambda temporary: np.savez(temporary, **arrays))


def _read_cache(path: Path, source: Source, settings: CropSettings) -> Crops:
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in _ARRAYS}
        names = dict(zip(archive["class_ids"].tolist(), archive["class_names"].tolist()))
        return Crops(**arrays, class_names=names, layout=str(archive["layout"]), dataset=str(archive["dataset"]),
                     root=str(source.path.resolve()),
                     unusable=[(str(k), str(r)) for k, r in archive["unusable"]],
                     ignored=[str(k) for k in archive["ignored"]], settings=settings, cache_path=path)


def random_flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirrors each image left-right with probability 1/2 (the only augmentation)."""
    flip = torch.rand(batch.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(batch.device)
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


def summarize(crops: Crops, settings: SplitSettings = SplitSettings()) -> str:
    """Counts per split and per class, for `birdgen data prepare`."""
    train, test = crops.split(settings, need_heldout=True)
    classes = np.unique(crops.labels)
    kind = crops.kind
    lines = [f"{len(crops)} images" + (f" in {len(classes)} {kind.classes_word}" if kind.has_classes else "")
             + f" ({resolve_split(settings.split, kind)} split: {len(train)} train, {len(test)} test)"]
    if crops.unusable:
        lines.append(f"left out {len(crops.unusable)} unreadable or too small pictures")
    if kind.has_classes:
        train_counts = np.bincount(crops.labels[train], minlength=crops.labels.max() + 1)
        test_counts = np.bincount(crops.labels[test], minlength=crops.labels.max() + 1)
        for class_id in classes:
            name = crops.class_names.get(int(class_id), str(class_id))
            lines.append(f"  {name:<40} train {train_counts[class_id]:>4}  test {test_counts[class_id]:>4}")
    lines.append(f"cache: {crops.cache_path}")
    return "\n".join(lines)
