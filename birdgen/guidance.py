"""Guidance settings: classifier-free guidance towards a species (Ho & Salimans 2022),
autoguidance by a weaker guide model (Karras et al. 2024) and the interval of noise levels
where both apply (Kynkäänniemi et al. 2024). The defaults and ranges live here; the CLI, the
app, evaluation and the tests read them from here. `samplers.Denoiser` does the arithmetic.

A model folder's config.json may carry a "guidance" record with its own defaults::

    "guidance": {"guide": "../small-attn-guide", "guide_weight": 2.0, "interval": [200, 999]}
    "guidance": {"species_weight": 3.0}

`guide` is a model folder relative to the model's own folder (or an absolute path).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Classifier-free guidance w when a model names none: 5 is where both class-conditional models measured best
# (small-attn-species: BENCHMARKS "Species accuracy"; a folder fine-tune: "Your own pictures"; w 3 gave both less)
SPECIES_WEIGHT = 5.0
SPECIES_WEIGHT_RANGE = (0.0, 15.0)  # 0 ignores the species, 1 is the plain conditional model
GUIDE_WEIGHT = 2.0  # autoguidance w for a guide named (in config.json or by --guide) without a weight
GUIDE_WEIGHT_RANGE = (0.0, 5.0)  # 1 is the main model alone, 0 the guide alone
NO_GUIDE = "none"  # what --guide takes to sample without the model's guide


class GuidanceError(ValueError):
    """A guidance setting out of range, or a guide that cannot guide this model; one line."""


def check_weight(name: str, value: float, bounds: tuple[float, float]) -> float:
    if not bounds[0] <= value <= bounds[1]:
        raise GuidanceError(f"{name} {value} out of range [{bounds[0]:g}, {bounds[1]:g}]")
    return float(value)


def check_interval(interval, num_steps: int) -> tuple[int, int] | None:
    """(low, high) training timesteps with 0 <= low <= high < num_steps, or None (every step)."""
    if interval is None:
        return None
    if (not isinstance(interval, (list, tuple)) or len(interval) != 2
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in interval)):
        raise GuidanceError(f"guidance interval {interval!r}: expected two timesteps [low, high]")
    low, high = interval
    if not 0 <= low <= high < num_steps:
        raise GuidanceError(f"guidance interval [{low}, {high}]: need 0 ≤ low ≤ high < {num_steps}")
    return int(low), int(high)


def parse_interval(text: str, num_steps: int) -> tuple[int, int]:
    """The command line's interval: 'LOW,HIGH' in timesteps, or 'all' for every step."""
    if text.strip().lower() == "all":
        return 0, num_steps - 1
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise GuidanceError(f"guidance interval {text!r}: expected LOW,HIGH timesteps (e.g. 200,999) or all") from None
    return check_interval((low, high), num_steps)


@dataclass(frozen=True)
class GuidanceRecord:
    """A model's default guidance (config.json "guidance")."""

    guide: str | None = None  # the guide model folder, relative to the model's folder
    guide_weight: float = 1.0  # autoguidance w, GUIDE_WEIGHT_RANGE
    species_weight: float = SPECIES_WEIGHT  # classifier-free w for species models, SPECIES_WEIGHT_RANGE
    interval: tuple[int, int] | None = None  # timesteps where guidance applies; None: all

    @classmethod
    def from_dict(cls, values: dict, num_steps: int) -> "GuidanceRecord":
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise GuidanceError(f"'guidance': unknown setting(s) {', '.join(unknown)}")
        guide = values.get("guide")
        if guide is not None and not (isinstance(guide, str) and guide):
            raise GuidanceError(f"'guidance': guide must name a model folder, not {guide!r}")
        weights = {}
        for name, bounds in (("guide_weight", GUIDE_WEIGHT_RANGE), ("species_weight", SPECIES_WEIGHT_RANGE)):
            value = values.get(name, getattr(cls, name))
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise GuidanceError(f"'guidance': {name} must be a number, not {value!r}")
            weights[name] = check_weight(name, value, bounds)
        interval = values.get("interval")
        return cls(guide, **weights, interval=check_interval(list(interval) if isinstance(interval, tuple)
                                                             else interval, num_steps))

    def to_dict(self) -> dict:
        values = asdict(self)
        if self.interval is not None:
            values["interval"] = list(self.interval)
        return {key: value for key, value in values.items() if value is not None}


def resolve_guidance(record: GuidanceRecord | None, has_guide: bool, num_steps: int,
                     species_weight: float | None = None, guide_weight: float | None = None,
                     interval: tuple[int, int] | None = None) -> "ResolvedGuidance":
    """What one generation runs with: each setting as asked, or the model's default where it is None."""
    record = record or GuidanceRecord()
    if guide_weight not in (None, 1.0) and not has_guide:
        raise GuidanceError(f"guide weight {guide_weight:g} needs a guide model, and this model has none"
                            " (give one with --guide, or leave the weight unset)")
    species = record.species_weight if species_weight is None else species_weight
    guide = (record.guide_weight if guide_weight is None else guide_weight) if has_guide else 1.0
    interval = check_interval(interval or record.interval, num_steps)
    if interval == (0, num_steps - 1):
        interval = None
    return ResolvedGuidance(check_weight("guidance", species, SPECIES_WEIGHT_RANGE),
                            check_weight("guide weight", guide, GUIDE_WEIGHT_RANGE), interval)


@dataclass(frozen=True)
class ResolvedGuidance:
    species_weight: float
    guide_weight: float  # 1.0 when no guide runs
    interval: tuple[int, int] | None

    def describe(self, species: bool, guide_name: str | None) -> str:
        """'autoguidance by small-attn-guide, w 2, t ≥ 200' and the like; '' when nothing guides."""
        parts = []
        if species:
            parts.append(f"species guidance {self.species_weight:g}")
        if guide_name and self.guide_weight != 1:
            parts.append(f"autoguidance by {guide_name}, w {self.guide_weight:g}")
        if parts and self.interval is not None:
            parts.append(f"t {self.interval[0]}–{self.interval[1]}")
        return ", ".join(parts)
