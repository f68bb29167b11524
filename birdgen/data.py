"""CUB-200-2011: read the official layout, crop birds to their boxes, cache the crops.

The official layout is::

    ROOT/images.txt              <image_id> <relative path>
    ROOT/bounding_boxes.txt      <image_id> <x> <y> <width> <height>   (0-based pixels)
    ROOT/image_class_labels.txt  <image_id> <class_id>
    ROOT/classes.txt             <class_id> <class folder name>
    ROOT/train_test_split.txt    <image_id> <1 = train, 0 = test>
    ROOT/images/<class folder>/<file>.jpg

Crops are cached once per settings as uint8 arrays (see `load_crops`), so training reads
images at memory speed.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

METADATA_FILES = (
    "images.txt",
    "bounding_boxes.txt",
    "image_class_labels.txt",
    "classes.txt",
    "train_test_split.txt",
)
CROP_MODES = ("square", "bbox")
SPLITS = ("official", "random")
CACHE_FORMAT_VERSION = 1


class DatasetError(ValueError):
    """A dataset problem, with a one-line message naming the file (and line) at fault."""


def cache_dir() -> Path:
    """Where birdgen keeps derived files: $BIRDGEN_CACHE_DIR, else ~/.cache/birdgen."""
    return Path(os.environ.get("BIRDGEN_CACHE_DIR") or Path.home() / ".cache" / "birdgen")


@dataclass(frozen=True)
class CubRecord:
    image_id: int
    path: str  # relative to ROOT/images
    box: tuple[float, float, float, float]  # x, y, width, height in source pixels
    class_id: int
    is_train: bool


@dataclass
class CubMetadata:
    root: Path
    records: list[CubRecord]
    class_names: dict[int, str]


def _read_table(path: Path, columns: int, parse) -> dict[int, tuple]:
    """Reads `<id> <values…>` lines into {id: parsed values}, naming file:line on any fault."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing CUB metadata file")
    table: dict[int, tuple] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=1) if columns == 2 else line.split()
            where = f"{path}:{line_no}"
            if len(parts) != columns:
                raise DatasetError(f"{where}: expected {columns} fields, got {len(parts)}: {line.strip()!r}")
            try:
                key = int(parts[0])
                values = parse(parts[1:])
            except ValueError:
                raise DatasetError(f"{where}: malformed line: {line.strip()!r}") from None
            if key in table:
                raise DatasetError(f"{where}: duplicate id {key}")
            table[key] = values
    return table


def read_metadata(root: str | os.PathLike) -> CubMetadata:
    """Reads and cross-checks the five metadata files of a CUB-200-2011 folder."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder (expected a CUB_200_2011 dataset root)")
    images = _read_table(root / "images.txt", 2, lambda v: v[0].strip())
    boxes = _read_table(root / "bounding_boxes.txt", 5, lambda v: tuple(float(x) for x in v))
    labels = _read_table(root / "image_class_labels.txt", 2, lambda v: int(v[0]))
    classes = _read_table(root / "classes.txt", 2, lambda v: v[0].strip())
    split = _read_table(root / "train_test_split.txt", 2, lambda v: _parse_split_flag(v[0]))

    for name, table in (("bounding_boxes.txt", boxes), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split)):
        missing = sorted(set(images) - set(table))
        if missing:
            raise DatasetError(f"{root / name}: no entry for image id {missing[0]} listed in images.txt"
                               f" ({len(missing)} missing)")
    # The official files list all 11,788 ids even where only some images are present, so
    # extra ids in the other files are expected; ids in images.txt must be complete.
    records = []
    for image_id, rel_path in sorted(images.items()):
        x, y, w, h = boxes[image_id]
        if w <= 0 or h <= 0:
            raise DatasetError(f"{root / 'bounding_boxes.txt'}: image id {image_id} has a zero-area or"
                               f" negative box (width {w}, height {h})")
        class_id = labels[image_id]
        if class_id not in classes:
            raise DatasetError(f"{root / 'image_class_labels.txt'}: image id {image_id} has class {class_id},"
                               f" which classes.txt does not list")
        records.append(CubRecord(image_id, rel_path, (x, y, w, h), class_id, split[image_id]))
    if not records:
        raise DatasetError(f"{root / 'images.txt'}: lists no images")
    return CubMetadata(root, records, classes)


def _parse_split_flag(value: str) -> bool:
    if value not in ("0", "1"):
        raise ValueError(value)
    return value == "1"


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


def load_crop(path: Path, box, size: int, mode: str, padding: float) -> np.ndarray:
    """Opens one image (any mode, converted to RGB), crops it and resizes it to size x size."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        region = crop_box(image.size, box, mode, padding)
        crop = image.resize((size, size), Image.Resampling.LANCZOS, box=region, reducing_gap=3.0)
    return np.asarray(crop, dtype=np.uint8)


@dataclass(frozen=True)
class CropSettings:
    size: int = 64
    crop: str = "square"
    padding: float = 0.1

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f"image size {self.size} is too small (at least 8 pixels)")
        if self.crop not in CROP_MODES:
            raise ValueError(f"unknown crop mode {self.crop!r}; choose one of {CROP_MODES}")
        if not 0 <= self.padding <= 2:
            raise ValueError(f"padding {self.padding} out of range [0, 2]")


@dataclass
class CubCrops:
    """All crops of a dataset as uint8 HWC arrays, with labels and the official split."""

    images: np.ndarray  # (N, size, size, 3) uint8
    image_ids: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64, official class ids
    is_train: np.ndarray  # (N,) bool, the official split
    class_names: dict[int, str]
    cache_path: Path | None = None
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def split_indices(self, split: str = "official", part: str = "train", seed: int = 0,
                      test_fraction: float = 0.2) -> np.ndarray:
        """Indices of one part ('train', 'test' or 'all') of a split ('official' or 'random')."""
        if part == "all":
            return np.arange(len(self))
        if part not in ("train", "test"):
            raise ValueError(f"unknown split part {part!r}; choose train, test or all")
        if split == "official":
            mask = self.is_train if part == "train" else ~self.is_train
        elif split == "random":
            order = np.random.default_rng(seed).permutation(len(self))
            n_test = int(round(len(self) * test_fraction))
            mask = np.zeros(len(self), bool)
            mask[order[n_test:] if part == "train" else order[:n_test]] = True
        else:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        indices = np.flatnonzero(mask)
        if len(indices) == 0:
            raise DatasetError(f"the {split} split has no {part} images")
        return indices

    def tensor(self, indices=None) -> torch.Tensor:
        """Images as float32 NCHW in [-1, 1], the model's pixel range."""
        images = self.images if indices is None else self.images[indices]
        return to_model_range(torch.from_numpy(images))


def ids_digest(image_ids: np.ndarray) -> str:
    return hashlib.sha256(",".join(str(int(i)) for i in sorted(image_ids)).encode()).hexdigest()


def split_record(crops: CubCrops, root: str | os.PathLike, crop: str, padding: float, split: str, seed: int,
                 test_fraction: float, train_on: str) -> dict:
    """What a model trained on, for its model folder: enough to rebuild its training and
    held-out crops exactly from the same dataset (checked by a digest of the image ids)."""
    train = crops.split_indices(split, "all" if train_on == "all" else "train", seed, test_fraction)
    return {"dataset": Path(root).name, "num_images": len(crops), "image_size": int(crops.images.shape[1]),
            "crop": crop, "padding": padding, "split": split, "seed": seed, "test_fraction": test_fraction,
            "train_on": train_on, "num_train": len(train), "train_ids_sha256": ids_digest(crops.image_ids[train])}


def require_split_record(record, where: str) -> None:
    """A one-line DatasetError when a model folder has no split record (`records.DataRecord`)."""
    if not record:
        raise DatasetError(f"{where}: the model folder does not record the crops it trained on (no 'data' in"
                           " config.json; re-export it with `birdgen export`), so its held-out crops are unknown")


def recover_split(record, crops: CubCrops, where: str) -> tuple[np.ndarray, np.ndarray]:
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
    train = crops.split_indices(record.split, "train", record.seed, record.test_fraction)
    heldout = crops.split_indices(record.split, "test", record.seed, record.test_fraction)
    if ids_digest(crops.image_ids[train]) != record.train_ids_sha256:
        raise DatasetError(f"{where}: this dataset's {record.split} split (seed {record.seed}) does not give the"
                           " training images the model recorded; use the dataset it was trained on")
    return train, heldout


def to_model_range(images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
    return images_uint8_nhwc.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-range NCHW images to uint8 NHWC on the CPU."""
    return images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _source_fingerprint(meta: CubMetadata) -> str:
    """Changes whenever a metadata file or any listed image file changes."""
    digest = hashlib.sha256()
    for name in METADATA_FILES:
        digest.update((meta.root / name).read_bytes())
    for record in meta.records:
        path = meta.root / "images" / record.path
        try:
            stat = path.stat()
            digest.update(f"{record.path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        except FileNotFoundError:
            digest.update(f"{record.path}:missing\n".encode())
    return digest.hexdigest()


def cache_path_for(meta: CubMetadata, settings: CropSettings, directory: Path | None = None) -> Path:
    key = json.dumps({"root": str(meta.root.resolve()), "settings": asdict(settings),
                      "format": CACHE_FORMAT_VERSION, "source": _source_fingerprint(meta)}, sort_keys=True)
    name = f"cub-{settings.size}px-{settings.crop}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    return (directory or cache_dir() / "crops") / name


def load_crops(root: str | os.PathLike, size: int = 64, crop: str = "square", padding: float = 0.1,
               strict: bool = False, cache: bool = True, cache_directory: Path | None = None,
               progress: bool = True) -> CubCrops:
    """Crops every listed image once and caches the result; later calls load the cache.

    A listed image that is missing always fails. A corrupt or truncated image fails with
    `strict`, else it is skipped with a warning and listed in `CubCrops.skipped`.
    """
    settings = CropSettings(size, crop, padding)
    meta = read_metadata(root)
    path = cache_path_for(meta, settings, cache_directory) if cache else None
    if path is not None and path.is_file():
        try:
            return _read_cache(path, meta)
        except (OSError, ValueError, KeyError) as error:
            warnings.warn(f"{path}: unreadable crop cache ({error}); rebuilding it")
    crops = _build_crops(meta, settings, strict, progress)
    if path is not None:
        _write_cache(path, crops)
        crops.cache_path = path
    return crops


def _build_crops(meta: CubMetadata, settings: CropSettings, strict: bool, progress: bool) -> CubCrops:
    images, kept, skipped = [], [], []
    for record in tqdm(meta.records, desc="Cropping CUB images", unit="img", disable=not progress):
        path = meta.root / "images" / record.path
        if not path.is_file():
            raise DatasetError(f"{path}: image listed in images.txt (id {record.image_id}) is missing")
        try:
            images.append(load_crop(path, record.box, settings.size, settings.crop, settings.padding))
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            message = f"{path}: corrupt or truncated image ({error})"
            if strict:
                raise DatasetError(message) from None
            warnings.warn(message + "; skipped")
            skipped.append(str(path))
            continue
        except ValueError as error:
            raise DatasetError(f"{path}: {error}") from None
        kept.append(record)
    if not kept:
        raise DatasetError(f"{meta.root}: no readable images")
    return CubCrops(
        images=np.stack(images),
        image_ids=np.array([r.image_id for r in kept], np.int64),
        labels=np.array([r.class_id for r in kept], np.int64),
        is_train=np.array([r.is_train for r in kept], bool),
        class_names=dict(meta.class_names),
        skipped=skipped,
    )


def _write_cache(path: Path, crops: CubCrops) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(temporary, images=crops.images, image_ids=crops.image_ids, labels=crops.labels,
             is_train=crops.is_train, skipped=np.array(crops.skipped, dtype=str))
    os.replace(temporary, path)


def _read_cache(path: Path, meta: CubMetadata) -> CubCrops:
    with np.load(path, allow_pickle=False) as archive:
        return CubCrops(
            images=archive["images"], image_ids=archive["image_ids"], labels=archive["labels"],
            is_train=archive["is_train"], class_names=dict(meta.class_names), cache_path=path,
            skipped=[str(s) for s in archive["skipped"]],
        )


def random_flip(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirrors each image left-right with probability 1/2 (the only augmentation)."""
    flip = torch.rand(batch.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(batch.device)
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


def summarize(crops: CubCrops, split: str = "official", seed: int = 0) -> str:
    """Counts per split and per species, for `birdgen data prepare`."""
    train = crops.split_indices(split, "train", seed)
    test = crops.split_indices(split, "test", seed)
    lines = [f"{len(crops)} images in {len(np.unique(crops.labels))} species"
             f" ({split} split: {len(train)} train, {len(test)} test)"]
    if crops.skipped:
        lines.append(f"skipped {len(crops.skipped)} unreadable images")
    train_counts = np.bincount(crops.labels[train], minlength=crops.labels.max() + 1)
    test_counts = np.bincount(crops.labels[test], minlength=crops.labels.max() + 1)
    for class_id in sorted(np.unique(crops.labels)):
        name = crops.class_names.get(int(class_id), str(class_id))
        lines.append(f"  {name:<40} train {train_counts[class_id]:>4}  test {test_counts[class_id]:>4}")
    lines.append(f"cache: {crops.cache_path}")
    return "\n".join(lines)
