"""The records a model folder's config.json keeps beside its network and schedule, as frozen
dataclasses: what the weights were trained on and for how long, the only sampler a distilled
student works with, and how it was distilled. (The guidance record is `guidance.GuidanceRecord`.)
Each reads itself from JSON with a one-line error naming the record, and writes itself back in
the same form, so the file format does not change."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .data import CropSettings, SplitSettings
from .sources import Layout, layout_of
from .utils import dataclass_from_dict


class RecordError(ValueError):
    """A config.json record is malformed; the message names it."""


class Record:
    KEY = ""  # the record's key in config.json

    @classmethod
    def from_dict(cls, values: Any):
        if isinstance(values, cls):
            return values
        if not isinstance(values, dict):
            raise RecordError(f"'{cls.KEY}' must be an object, not {type(values).__name__}")
        try:  # later versions may add settings: they are left out
            return dataclass_from_dict(cls, values, ignore_unknown=True)
        except ValueError as error:
            raise RecordError(f"'{cls.KEY}': {error}") from None

    def to_dict(self) -> dict:
        """The JSON form (unset optional fields left out; tuples as the lists JSON reads back)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
                if v is not None}


@dataclass(frozen=True)
class TrainingRecord(Record):
    """How much the weights were trained (written by `birdgen export` from the checkpoint)."""
    KEY = "training"
    steps: int  # optimizer steps
    images_seen: int  # steps × batch size
    train_hours: float  # wall time of the training steps


@dataclass(frozen=True)
class DataRecord(Record):
    """The crops and split a model trained on: enough to rebuild its training and held-out crops
    exactly from the same dataset (checked by a digest of the training image ids)."""
    KEY = "data"
    dataset: str  # the dataset folder's (or zip's) name
    num_images: int
    image_size: int  # crop side in pixels
    crop: str  # "square", "bbox" (around CUB's boxes), "center" or "full"
    padding: float  # square crops' margin around the bounding box, as a fraction of its side
    split: str  # "official", "random" or "stratified"
    seed: int
    test_fraction: float  # random and stratified splits: share held out
    train_on: str  # "train" or "all"
    num_train: int
    train_ids_sha256: str
    layout: str | None = None  # a key of sources.LAYOUTS; unset in records written before folders: CUB
    background: str | None = None  # what transparent pictures were composited onto; unset: white
    path: str | None = None  # where the dataset was when the model was exported (the app looks there first)

    @property
    def kind(self) -> Layout:
        return layout_of(self.layout)

    @property
    def crop_settings(self) -> CropSettings:
        return CropSettings(self.image_size, self.crop, self.padding, self.background or CropSettings.background)

    @property
    def split_settings(self) -> SplitSettings:
        return SplitSettings(self.split, self.seed, self.test_fraction, self.train_on)


@dataclass(frozen=True)
class SamplingRecord(Record):
    """The only sampler and step count a distilled student works with."""
    KEY = "sampling"
    sampler: str
    steps: int


@dataclass(frozen=True)
class DistillationRecord(Record):
    """How a student was distilled; a student of a student names the model at the root of the
    chain as `teacher`, its direct teacher as `distilled_teacher` and keeps the earlier stage."""
    KEY = "distillation"
    method: str
    teacher: str
    teacher_steps: int
    rounds: int
    round_steps: int
    batch_size: int
    lr: float
    images_seen: int
    machine: str | None = None
    run_hours: float | None = None
    distilled_teacher: str | None = None
    images_seen_total: int | None = None
    guide: str | None = None  # the guide that autoguided the first round's teacher
    guide_weight: float | None = None  # its weight w
    guide_interval: tuple[int, ...] | None = None  # the timesteps (low, high) where it guided; None: all
    earlier: "DistillationRecord | None" = None

    @classmethod
    def from_dict(cls, values: Any) -> "DistillationRecord":
        earlier = values.get("earlier") if isinstance(values, dict) else None
        if earlier is None:
            return super().from_dict(values)
        record = super().from_dict({**values, "earlier": None})
        return dataclasses.replace(record, earlier=cls.from_dict(earlier))

    def to_dict(self) -> dict:
        values = super().to_dict()
        if self.earlier is not None:
            values["earlier"] = self.earlier.to_dict()
        return values


def record_dict(record: Record | None) -> dict | None:
    """A record's JSON form, for run.json and config.json (None stays None)."""
    return record.to_dict() if record is not None else None
