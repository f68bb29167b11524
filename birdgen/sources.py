"""Where pictures come from: CUB-200-2011's official layout, or an image folder (a folder or a
`.zip` of one), behind one interface, and the one decode every picture goes through.

A source lists `Item`s (a key that names the file, a class, a bounding box or none, the
official train/test flag or none) and reads each item's bytes; `data.load_crops` turns any
source into the same in-memory crops. An image folder is either flat (unconditional) or one
level of class folders, each a class named by the folder and searched recursively::

    PICTURES/Cardinal/0001.jpg, PICTURES/Cardinal/more/x.PNG, PICTURES/Blue_Jay/… (classes)
    PICTURES/0001.jpg, PICTURES/0002.webp, …                                        (flat)
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

CUB_METADATA_FILES = (
    "images.txt",
    "bounding_boxes.txt",
    "image_class_labels.txt",
    "classes.txt",
    "train_test_split.txt",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # matched case-insensitively
MAX_PICTURE_PIXELS = 50_000_000  # larger pictures are refused before decoding (a pixel bomb)
MAX_PICTURE_BYTES = 100 * 2**20  # one zip entry, uncompressed
MAX_ZIP_BYTES = 4 * 2**30  # all of a zip's entries, uncompressed
MAX_ZIP_RATIO = 200  # uncompressed / compressed size of an entry beyond which it is taken for a zip bomb
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}


class DatasetError(ValueError):
    """A dataset problem, with a one-line message naming the file (and line) at fault."""


class PictureError(ValueError):
    """One picture that cannot be used; the message says why (the caller names the file)."""


@dataclass(frozen=True)
class Item:
    key: str  # the picture's path inside the source, as reports name it
    image_id: int  # CUB's image id; for folders the position in sorted key order, from 1
    class_id: int  # 0 where the source has no classes
    box: tuple[float, float, float, float] | None = None  # x, y, width, height in source pixels
    is_train: bool | None = None  # the official split, where the source has one


@dataclass(frozen=True)
class Layout:
    """What a source's layout can do. Every other module asks these questions instead of
    comparing layout names, which are compared here only."""

    name: str  # "cub", "class-folders" or "flat": as crop caches and split records store it
    has_boxes: bool  # bounding boxes: square/bbox crops
    has_classes: bool  # labelled pictures: conditional models, stratified splits
    official_split: bool  # a train/test split of its own

    @property
    def class_word(self) -> str:
        """What one class is called in messages: CUB's classes are species, a folder's are classes."""
        return "species" if self.name == "cub" else "class"

    @property
    def classes_word(self) -> str:
        return "species" if self.name == "cub" else "classes"

    @property
    def default_crop(self) -> str:
        return "square" if self.has_boxes else "center"

    @property
    def default_split(self) -> str:
        return "official" if self.official_split else "stratified" if self.has_classes else "random"

    @property
    def cache_prefix(self) -> str:
        return "cub" if self.name == "cub" else "folder"

    def describe(self, num_classes: int) -> str:
        """The check report's first line."""
        if self.name == "cub":
            return "CUB-200-2011 layout (bounding boxes, official split)"
        if self.has_classes:
            return f"image folder with {num_classes} class folders"
        return "image folder without classes (unconditional)"


LAYOUTS = {layout.name: layout for layout in (Layout("cub", True, True, True), Layout("class-folders", False, True, False),
                                              Layout("flat", False, False, False))}


def layout_of(name: str | None) -> Layout:
    """The layout a crop cache or split record names; records written before folders name none: CUB."""
    return LAYOUTS[name or "cub"]


@dataclass
class Source:
    """What every layout gives: items, class names by id, the files it passed over, how to
    read an item, and a fingerprint that changes whenever any listed file does."""

    path: Path
    layout: str  # a key of LAYOUTS
    items: list[Item]
    class_names: dict[int, str]
    ignored: list[str] = field(default_factory=list)  # files that are not pictures (by extension), by key

    @property
    def name(self) -> str:
        return self.path.stem if self.path.suffix.lower() == ".zip" else self.path.name

    @property
    def kind(self) -> Layout:
        return LAYOUTS[self.layout]

    @property
    def has_boxes(self) -> bool:
        return self.kind.has_boxes

    @property
    def has_classes(self) -> bool:
        return self.kind.has_classes

    @property
    def official_split(self) -> bool:
        return self.kind.official_split

    def read(self, item: Item) -> bytes:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------- CUB


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


class CubSource(Source):
    """The official layout: metadata files, bounding boxes and the official split."""

    def __init__(self, root: Path):
        meta = read_metadata(root)
        items = [Item(r.path, r.image_id, r.class_id, r.box, r.is_train) for r in meta.records]
        super().__init__(Path(root), "cub", items, dict(meta.class_names))

    def read(self, item: Item) -> bytes:
        path = self.path / "images" / item.key
        if not path.is_file():
            raise DatasetError(f"{path}: image listed in images.txt (id {item.image_id}) is missing")
        return path.read_bytes()

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for name in CUB_METADATA_FILES:
            digest.update((self.path / name).read_bytes())
        for item in self.items:
            digest.update(_stat_line(self.path / "images" / item.key, item.key))
        return digest.hexdigest()


def _stat_line(path: Path, key: str) -> bytes:
    try:
        info = path.stat()
        return f"{key}:{info.st_size}:{info.st_mtime_ns}\n".encode()
    except FileNotFoundError:
        return f"{key}:missing\n".encode()


# ------------------------------------------------------------------------------ image folders


def is_picture_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def _hidden(parts: tuple[str, ...]) -> bool:
    """Dot files and folders, and the resource forks macOS puts in zips, are no one's pictures."""
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


def _folder_items(keys: list[str], where: Path) -> tuple[str, list[Item], dict[int, str], list[str]]:
    """The layout, items, class names and ignored keys of an image folder's files (POSIX keys
    relative to its root). Pictures directly in the root make it flat; else each first-level
    folder is a class."""
    keys = sorted(k for k in keys if not _hidden(PurePosixPath(k).parts))
    pictures = [k for k in keys if is_picture_name(k)]
    ignored = [k for k in keys if not is_picture_name(k)]
    if not pictures:
        raise DatasetError(f"{where}: no pictures found ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)},"
                           f" in any case{f'; {len(ignored)} other files' if ignored else ''})")
    top = [k for k in pictures if "/" not in k]
    if top:
        items = [Item(k, i, 0) for i, k in enumerate(pictures, 1)]
        return "flat", items, {}, ignored
    names = sorted({k.split("/", 1)[0] for k in pictures})
    class_of = {name: class_id for class_id, name in enumerate(names, 1)}
    items = [Item(k, i, class_of[k.split("/", 1)[0]]) for i, k in enumerate(pictures, 1)]
    return "class-folders", items, {class_id: name for name, class_id in class_of.items()}, ignored


class FolderSource(Source):
    """A folder of pictures, flat or in class folders, searched recursively. Symbolic links are
    not followed: a picture's bytes come from inside the folder."""

    def __init__(self, root: Path):
        keys = []
        for folder, subfolders, files in os.walk(root):
            subfolders.sort()
            for name in files:
                path = Path(folder) / name
                if not path.is_symlink():
                    keys.append(path.relative_to(root).as_posix())
        layout, items, names, ignored = _folder_items(keys, root)
        super().__init__(Path(root), layout, items, names, ignored)

    def read(self, item: Item) -> bytes:
        return (self.path / item.key).read_bytes()

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.layout.encode())
        for item in self.items:
            digest.update(_stat_line(self.path / item.key, item.key))
        return digest.hexdigest()


class ZipSource(Source):
    """A `.zip` of an image folder, read in place: nothing is extracted. Entries that would land
    outside the folder (absolute, `..`), symbolic links and entries whose sizes say zip bomb
    refuse the whole archive in one line, before anything is decoded."""

    def __init__(self, path: Path):
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as error:
            raise DatasetError(f"{path}: not a readable zip archive ({error})") from None
        with archive:
            entries = [e for e in archive.infolist() if not e.is_dir()]
            total = 0
            for entry in entries:
                name = entry.filename
                parts = PurePosixPath(name.replace("\\", "/")).parts
                if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
                    raise DatasetError(f"{path}: entry {name!r} points outside the archive's folder; refused")
                if stat.S_ISLNK(entry.external_attr >> 16):
                    raise DatasetError(f"{path}: entry {name!r} is a symbolic link; refused")
                if entry.file_size > MAX_PICTURE_BYTES or (
                        entry.compress_size and entry.file_size / entry.compress_size > MAX_ZIP_RATIO
                        and entry.file_size > 2**20):
                    raise DatasetError(f"{path}: entry {name!r} unpacks to {entry.file_size:,} bytes from"
                                       f" {entry.compress_size:,}: a zip bomb; refused")
                total += entry.file_size
            if total > MAX_ZIP_BYTES:
                raise DatasetError(f"{path}: unpacks to {total:,} bytes (over {MAX_ZIP_BYTES:,}); refused")
            self._entries = {e.filename: e for e in entries}
            self._open = threading.local()
            keys = list(self._entries)
            prefix = _common_folder(keys)  # a zip of a folder holds FOLDER/…: the folder is the root
            self._prefix = prefix
            layout, items, names, ignored = _folder_items([k[len(prefix):] for k in keys], path)
        super().__init__(Path(path), layout, items, names, ignored)

    def read(self, item: Item) -> bytes:
        entry = self._entries[self._prefix + item.key]
        if not hasattr(self._open, "archive"):  # one handle per decoding thread
            self._open.archive = zipfile.ZipFile(self.path)
        with self._open.archive.open(entry) as handle:
            data = handle.read(MAX_PICTURE_BYTES + 1)
        if len(data) > MAX_PICTURE_BYTES:
            raise PictureError(f"unpacks to more than {MAX_PICTURE_BYTES:,} bytes")
        return data

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.layout.encode())
        info = self.path.stat()
        digest.update(f"{info.st_size}:{info.st_mtime_ns}".encode())
        for key, entry in sorted(self._entries.items()):
            digest.update(f"{key}:{entry.CRC}:{entry.file_size}\n".encode())
        return digest.hexdigest()


def _common_folder(keys: list[str]) -> str:
    """'birds/' when every entry lies under birds/ (and some folder below it or a picture in it)."""
    visible = [k for k in keys if not _hidden(PurePosixPath(k).parts)]
    first = {k.split("/", 1)[0] for k in visible}
    if len(first) == 1 and all("/" in k for k in visible):
        return first.pop() + "/"
    return ""


def open_source(path: str | os.PathLike) -> Source:
    """The source at `path`: a CUB root (it has any of CUB's metadata files, so that one missing
    file is named), a folder of pictures, or a .zip of one; anything else is one line saying why not."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".zip":
        return ZipSource(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such folder or zip file")
    if not path.is_dir():
        raise DatasetError(f"{path}: not a folder or a .zip of pictures")
    if any((path / name).is_file() for name in CUB_METADATA_FILES):
        return CubSource(path)
    return FolderSource(path)


# ------------------------------------------------------------------------------------ decoding


def parse_background(text: str) -> tuple[int, int, int]:
    """'white', 'black', 'gray' or '#rrggbb': what transparent pictures are composited onto."""
    if text in BACKGROUNDS:
        return BACKGROUNDS[text]
    if len(text) == 7 and text.startswith("#"):
        try:
            return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))
        except ValueError:
            pass
    raise ValueError(f"background {text!r}: use {', '.join(BACKGROUNDS)} or a colour like #ffffff")


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # RGB, upright
    mode: str  # the file's own mode, before conversion (e.g. "P", "RGBA", "I;16", "CMYK")
    size: tuple[int, int]  # upright width, height in pixels


def decode_picture(data: bytes, background: tuple[int, int, int] = BACKGROUNDS["white"]) -> Decoded:
    """One picture as upright sRGB: EXIF orientation applied, an embedded ICC profile (and CMYK)
    converted to sRGB, palette and alpha composited onto `background`, 16-bit scaled to 8 bits,
    grayscale to RGB, a GIF's first frame. Raises PictureError with the reason."""
    if not data:
        raise PictureError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_PICTURE_PIXELS:
                raise PictureError(f"{width}×{height} pixels, over the {MAX_PICTURE_PIXELS // 10**6}-megapixel"
                                   " limit (a pixel bomb?)")
            mode = opened.mode
            opened.seek(0)
            image = ImageOps.exif_transpose(opened)  # a loaded copy: truncation fails here
            image.load()
            image = _to_rgb(image, background)
    except PictureError:
        raise
    except Image.DecompressionBombError as error:
        raise PictureError(f"over the pixel limit ({error})") from None
    except UnidentifiedImageError:
        raise PictureError("not a picture Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise PictureError(f"corrupt or truncated ({str(error).splitlines()[0] if str(error) else type(error).__name__})") \
            from None
    return Decoded(image, mode, image.size)


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale: scaled to 8 bits (Pillow's own conversion clips at 255)
        pixels = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 1.0
        image = Image.fromarray(np.clip(np.round(pixels / scale), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")  # a palette's transparency becomes alpha
    elif image.mode in ("LA", "La", "PA"):
        image = image.convert("RGBA")
    profile = image.info.get("icc_profile")
    if profile or image.mode == "CMYK":
        image = _to_srgb(image, profile)
    if image.mode in ("RGBA", "RGBa"):
        canvas = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _to_srgb(image: Image.Image, profile: bytes | None) -> Image.Image:
    """Colour-managed conversion to sRGB where the file embeds a profile; a CMYK picture without
    one gets Pillow's plain conversion."""
    if not profile:
        return image.convert("RGB")
    output = "RGBA" if image.mode in ("RGBA", "LA") else "RGB"
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=output)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image.convert(output)  # an unreadable profile: the pixels as they are
