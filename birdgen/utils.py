"""Small shared helpers at the bottom of the package: atomic writes, the machine and device, and
config dataclasses from JSON. It imports nothing of birdgen."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import platform
import shutil
import types
import typing
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError



class WriteError(RuntimeError):
    """A file could not be written (a full disk, a read-only folder); the message names it and
    what was being written, and no half-written file is left behind."""


@contextlib.contextmanager
def writing(path: Path, what: str, temporary: Path | None = None):
    """Turns an OSError (or safetensors' error) while writing `what` to `path` into one
    WriteError line, removing the temporary file or folder first."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        if temporary is not None:
            if temporary.is_dir():
                shutil.rmtree(temporary, ignore_errors=True)
            else:
                temporary.unlink(missing_ok=True)
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise WriteError(f"{path}: could not write {what} ({reason})") from None


def atomic_write(path: str | os.PathLike, what: str, write: Callable[[Path], object]) -> Path:
    """The one way birdgen writes a file: `write(temporary)` fills a temporary file beside `path`
    (same suffix, so that writers that go by it still do), which then replaces `path` at once, so no
    reader ever sees half a file; a full disk or an unwritable folder is one WriteError naming
    `path` and `what`, and the temporary file is gone."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    with writing(path, what, temporary):
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "the file") -> Path:
    return atomic_write(path, what, lambda temporary: temporary.write_text(text))


def atomic_write_bytes(path: str | os.PathLike, data: bytes, what: str = "the file") -> Path:
    return atomic_write(path, what, lambda temporary: temporary.write_bytes(data))


def torch_bytes(obj) -> bytes:
    """`torch.save` into memory: its zip writer reports a full disk as a RuntimeError that names no
    file ("unexpected pos …"), while the plain write of these bytes reports it as an OSError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def duration_text(seconds: float) -> str:
    return f"about {seconds:.0f} s" if seconds < 90 else f"about {seconds / 60:.0f} min"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    text = f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return text


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The device for a --device value: "auto" (this process's GPU if there is one, else the
    CPU), "cpu", "cuda" (GPU `local_rank`, for torchrun) or "cuda:N"; a ValueError if CUDA is
    asked for and missing."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def dataclass_from_dict(cls, values: dict, ignore_unknown: bool = False):
    """`cls(**values)` for a dataclass, or a ValueError naming the unknown settings (unless
    `ignore_unknown`: left out), the missing required ones, or the first of the wrong type."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown and not ignore_unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
    values = {k: v for k, v in values.items() if k in names}
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in values
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    check_field_types(cls, values)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})  # JSON lists: tuples


def check_field_types(cls, values: dict) -> None:
    """Raises ValueError naming the first field of dataclass `cls` whose value in `values` has
    the wrong type (int, float, str, bool, tuple[int, ...], optionally "| None")."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        value, kind = values[field.name], hints[field.name]
        optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
        if optional:
            if value is None:
                continue
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
        if typing.get_origin(kind) is tuple:
            fits = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            expected = "a list of integers"
        elif kind is float:
            fits, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif kind is int:
            fits, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        else:
            fits, expected = isinstance(value, kind), {str: "a string", bool: "true or false"}.get(kind, kind.__name__)
        if not fits:
            raise ValueError(f"{field.name} must be {expected}{' or null' if optional else ''}, not {value!r}")
