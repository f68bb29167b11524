"""A model folder's metrics.json: every evaluation `birdgen eval` stored, as `EvaluationRecord`s.

    {"inception": {...}, "mobilenet": {...},      the shown record of each feature space
     "evaluations": [{...}, {...}, …]}            every record, oldest first

Older files hold only the shown records (or, older still, one Inception record at the top).
This module is the file's one owner: what makes two evaluations the same measurement
(`EvaluationRecord.key`), reading, adding or replacing a record, and which one is shown."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .utils import atomic_write_text

METRICS_FILE = "metrics.json"
# The original report's headline (InceptionV3 features; its sample count and real set are not stated).
REPORT_FID, REPORT_KID = 92.47, 0.2089
# What makes two evaluations the same measurement: a new one with another of these is added beside
# the stored ones; one with all of them equal replaces a stored one only when asked.
KEY_FIELDS = ("feature_space", "reference", "num_generated", "sampler", "steps", "eta", "seed", "guidance",
              "guide", "guide_weight", "interval")
# How a record says whether the model followed the real crops' species (the file keeps it as text).
CONDITIONAL_TEXT = "those of the real crops, in turn"
UNCONDITIONAL_TEXT = "none (unconditional)"


class MetricsFileError(ValueError):
    """metrics.json cannot be read; the message names it."""


@dataclass(frozen=True)
class EvaluationRecord:
    """One stored evaluation: the figures pages and cards show, typed, and the record as the file
    keeps it (`values`, every figure, written back unchanged)."""

    feature_space: str
    num_generated: int
    num_real: int
    sampler: str
    steps: int
    fid: float
    kid_mean: float
    kid_std: float
    conditional: bool  # the samples followed the real crops' species in turn
    precision: float | None = None
    recall: float | None = None
    guidance: float | None = None  # the species weight (a conditional model's)
    guide: str | None = None  # the autoguidance guide that took part, if any
    guide_weight: float | None = None
    interval: tuple[int, int] | None = None
    feature_label: str = ""
    reference_split: str = ""  # which real crops, in words
    species_accuracy: dict | None = None
    memorization: dict | None = None
    values: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, raw: dict, where: str = METRICS_FILE) -> "EvaluationRecord":
        try:
            interval = raw.get("interval")
            return cls(raw.get("feature_space", "inception"), int(raw["num_generated"]), int(raw["num_real"]),
                       raw["sampler"], int(raw["steps"]), float(raw["fid"]), float(raw["kid_mean"]),
                       float(raw["kid_std"]), raw.get("species") == CONDITIONAL_TEXT, raw.get("precision"),
                       raw.get("recall"), raw.get("guidance"), raw.get("guide"), raw.get("guide_weight"),
                       tuple(interval) if interval else None, raw.get("feature_label", ""),
                       raw.get("reference_split", raw.get("split", "")), raw.get("species_accuracy"),
                       raw.get("memorization"), {"feature_space": raw.get("feature_space", "inception"), **raw})
        except (KeyError, TypeError, ValueError) as error:
            raise MetricsFileError(f"{where}: an evaluation record lacks or mistypes {error}") from None

    def to_dict(self) -> dict:
        return self.values

    def key(self) -> tuple:
        return key_of(self.values, self.conditional)

    def short(self) -> str:
        """One line: the main figures and what they rest on."""
        precision = f" · P {self.precision:.2f} / R {self.recall:.2f}" if self.precision is not None else ""
        return (f"FD {self.fid:.1f} · KID {self.kid_mean:.3f}{precision} in {self.feature_space} features"
                f" ({self.num_generated} images, {self.sampler} {self.steps})")


def key_of(values: dict, conditional: bool) -> tuple:
    """What an evaluation with these settings measures (KEY_FIELDS). An unconditional model's
    species weight takes no part (older records name one), nor, without a guide, its weight and
    interval."""
    values = dict(values)
    if not conditional:
        values["guidance"] = None
    if values.get("guide") is None:
        values |= {"guide_weight": None, "interval": None}
    return tuple(json.dumps(values.get(name)) for name in KEY_FIELDS)


def species_text(conditional: bool) -> str:
    """The record's "species" entry, as the file keeps it."""
    return CONDITIONAL_TEXT if conditional else UNCONDITIONAL_TEXT


def read_records(path: Path) -> list[EvaluationRecord]:
    """Every evaluation metrics.json holds, oldest first ([] without the file)."""
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MetricsFileError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise MetricsFileError(f"{path}: expected an object of evaluations by feature space")
    if "fid" in raw:  # written before feature spaces were recorded: always Inception
        listed = [{"feature_space": "inception", **raw}]
    elif isinstance(raw.get("evaluations"), list):
        listed = [record for record in raw["evaluations"] if isinstance(record, dict)]
    else:
        listed = [{"feature_space": space, **result} for space, result in raw.items() if isinstance(result, dict)]
    return [EvaluationRecord.from_dict(record, str(path)) for record in listed]


def shown(records: list[EvaluationRecord]) -> dict[str, EvaluationRecord]:
    """The record the card and the pages show for each feature space: the one with the most
    generated images (the latest among equals), so a quick look never hides a careful one."""
    chosen: dict[str, EvaluationRecord] = {}
    for record in records:
        space = record.feature_space
        if space not in chosen or record.num_generated >= chosen[space].num_generated:
            chosen[space] = record
    return chosen


def read_shown(path: Path) -> dict[str, EvaluationRecord]:
    """The shown record of each feature space ({} without metrics.json)."""
    return shown(read_records(path))


def stored_alike(path: Path, key: tuple) -> EvaluationRecord | None:
    """The stored record that measured what `key` (`key_of`) says, if any."""
    return next((stored for stored in read_records(path) if stored.key() == key), None)


def add_or_replace(path: Path, record: EvaluationRecord, replace: bool) -> tuple[dict[str, EvaluationRecord] | None,
                                                                                EvaluationRecord | None]:
    """Writes `record` into metrics.json beside the others, in place of a stored record that
    measured the same, which it replaces only with `replace` (else nothing is written). Returns
    the shown records (None where nothing was written) and the stored record alike, if any."""
    records = read_records(path)
    alike = next((stored for stored in records if stored.key() == record.key()), None)
    if alike is not None and not replace:
        return None, alike
    records = [stored for stored in records if stored.key() != record.key()] + [record]
    chosen = shown(records)
    atomic_write_text(path, json.dumps({**{space: r.to_dict() for space, r in chosen.items()},
                                        "evaluations": [r.to_dict() for r in records]}, indent=2) + "\n")
    return chosen, alike
