"""Model folders: safetensors weights + a JSON config that rebuilds network and schedule +
a model card. Local folders or Hugging Face Hub repos; nothing is ever unpickled.

    models/NAME/
        model.safetensors   EMA weights (float16 or float32; always loaded as float32)
        config.json         {"format": "birdgen-model", "network": {...}, "diffusion": {...}}
        README.md           the model card
        metrics.json        KID/FID from `birdgen eval`, when it has run
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.utils.flop_counter import FlopCounterMode
from safetensors.torch import load_file, save_file

from .diffusion import DiffusionConfig, NoiseSchedule
from .metrics_file import METRICS_FILE, EvaluationRecord, MetricsFileError, read_shown
from .guidance import GUIDE_WEIGHT, NO_GUIDE, GuidanceError, GuidanceRecord, ResolvedGuidance, resolve_guidance
from .networks import UNet, UNetConfig, parameter_count
from .precision import sampling_autocast
from .records import DataRecord, DistillationRecord, RecordError, SamplingRecord, TrainingRecord
from .samplers import SAMPLERS, Denoiser
from .utils import atomic_write, atomic_write_text, check_field_types

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FORMAT = "birdgen-model"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """A model folder, config or Hub id that cannot be used; the message names it."""


# The records config.json may hold beside network and diffusion (species and guidance are read apart).
RECORDS = {"training": TrainingRecord, "data": DataRecord, "sampling": SamplingRecord,
           "distillation": DistillationRecord}


@dataclass
class BirdModel:
    """A network ready for sampling, with the schedule and prediction target it was trained for."""

    network: UNet
    network_config: UNetConfig
    diffusion_config: DiffusionConfig
    path: Path | None = None
    training: TrainingRecord | None = None  # how long the weights trained, when exported from a run
    data: DataRecord | None = None  # the crops and split it trained on
    species: list[list] | None = None  # [[class id, class folder name], …] by class index, for conditional models
    sampling: SamplingRecord | None = None  # the only sampler a distilled student works with
    distillation: DistillationRecord | None = None  # how a student was distilled
    guidance: GuidanceRecord | None = None  # default guidance
    guide: "BirdModel | None" = None  # the weaker model that autoguides this one, loaded with it

    @cached_property
    def schedule(self) -> NoiseSchedule:
        # Built once per model: every generation and every page rerun asks for it.
        return NoiseSchedule(self.diffusion_config)

    @property
    def parameter_count(self) -> int:
        return parameter_count(self.network)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def name(self) -> str:
        return self.path.name if self.path else "untrained"

    @property
    def conditional(self) -> bool:
        return self.network_config.num_classes > 0

    @property
    def class_word(self) -> str:
        """What its classes are called on pages and in messages: CUB's are species, a folder's classes."""
        return self.data.kind.class_word if self.data is not None else "species"

    def resolve_guidance(self, species_weight: float | None = None, guide_weight: float | None = None,
                         interval: tuple[int, int] | None = None) -> ResolvedGuidance:
        """The guidance a generation runs with: what it asks for, else this model's defaults."""
        return resolve_guidance(self.guidance, self.guide is not None, self.schedule.num_steps, species_weight,
                                guide_weight, interval)

    def denoiser(self, labels: torch.Tensor | None = None, guidance: ResolvedGuidance | None = None) -> Denoiser:
        """`labels`: class indices (one per image) for a conditional model. Without `guidance`
        nothing guides: the plain conditional output of this network alone."""
        guidance = guidance or ResolvedGuidance(1.0, 1.0, None)
        guide = self.guide.network if self.guide is not None and guidance.guide_weight != 1 else None
        return Denoiser(self.network, self.schedule, autocast_dtype=self.autocast_dtype, channels_last=True, labels=labels,
                        guidance=guidance.species_weight, guide=guide, guide_weight=guidance.guide_weight,
                        interval=guidance.interval)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """What sampling runs in on this model's device (see `birdgen.precision`)."""
        return sampling_autocast(self.device)

    @cached_property
    def flops_per_image(self) -> int:
        """Floating-point operations of one forward pass for one image (torch's flop counter)."""
        size, channels = self.network_config.image_size, self.network_config.in_channels
        x = torch.zeros(1, channels, size, size, device=self.device)
        t = torch.zeros(1, dtype=torch.long, device=self.device)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            self.network(x, t) if not self.conditional else self.network(x, t, t)
        return counter.get_total_flops()

    def metrics(self) -> dict[str, EvaluationRecord]:
        """The shown stored evaluation of each feature space ({"mobilenet": …, "inception": …}), or {}."""
        if self.path is None:
            return {}
        try:
            return read_shown(self.path / METRICS_FILE)
        except MetricsFileError as error:
            raise ModelError(str(error)) from None


def build_model(network_config: UNetConfig, diffusion_config: DiffusionConfig, device="cpu") -> BirdModel:
    network = UNet(network_config).to(device).to(memory_format=torch.channels_last).eval()
    return BirdModel(network, network_config, diffusion_config)


def config_dict(network_config: UNetConfig, diffusion_config: DiffusionConfig, **extra) -> dict:
    return {"format": FORMAT, "format_version": 1, "network": network_config.to_dict(),
            "diffusion": diffusion_config.to_dict(), **extra}


def save_model(folder: str | os.PathLike, network: torch.nn.Module, network_config: UNetConfig,
               diffusion_config: DiffusionConfig, half: bool = False, card: str | None = None,
               training: TrainingRecord | dict | None = None, data: DataRecord | dict | None = None,
               species: list | None = None, sampling: SamplingRecord | dict | None = None,
               distillation: DistillationRecord | dict | None = None,
               guidance: GuidanceRecord | dict | None = None) -> Path:
    """Writes weights and config (each atomically) and the model card, if given; `training` records how
    much the weights were trained, so that comparisons can say when two models are not on equal footing;
    `data` records the crops and split, so that evaluation can find the crops the model never saw.
    Records may be given as records or in their JSON form (checked the same way as when read)."""
    folder = Path(folder)
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in network.state_dict().items()}
    atomic_write(folder / WEIGHTS_FILE, "the model weights",
                 lambda temporary: save_file(tensors, str(temporary), metadata={"format": FORMAT}))
    given = {"training": training, "data": data, "sampling": sampling, "distillation": distillation}
    try:
        extra = {key: RECORDS[key].from_dict(value).to_dict() for key, value in given.items() if value}
    except RecordError as error:
        raise ModelError(f"{folder / CONFIG_FILE}: {error}") from None
    if isinstance(guidance, GuidanceRecord):
        guidance = guidance.to_dict()
    extra = {"weights_dtype": str(dtype).removeprefix("torch."), **extra} | ({"species": species} if species else {}) \
        | ({"guidance": guidance} if guidance else {})
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config_dict(network_config, diffusion_config, **extra),
                                                       indent=2) + "\n")
    if card is not None:
        atomic_write_text(folder / CARD_FILE, card)
    return folder


def read_config(folder: Path) -> tuple[UNetConfig, DiffusionConfig, dict]:
    """The network and diffusion settings of a model folder, and its optional records by key
    (those of RECORDS as their records, "species" as a list, "guidance" as a GuidanceRecord),
    each present only if the folder has it."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{path}: missing model config (is {folder} a birdgen model folder?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ModelError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ModelError(f"{path}: not a birdgen model config (format is {raw.get('format') if isinstance(raw, dict) else None!r})")
    sections = {}
    for section, build in (("network", UNetConfig.from_dict), ("diffusion", diffusion_from_dict)):
        if not isinstance(raw.get(section), dict):
            raise ModelError(f"{path}: missing section '{section}'")
        try:
            sections[section] = build(raw[section])
        except (TypeError, ValueError) as error:
            raise ModelError(f"{path}: {section}: {error}") from None
    network, diffusion = sections["network"], sections["diffusion"]
    try:
        records = {key: RECORDS[key].from_dict(raw[key]) for key in RECORDS if raw.get(key) is not None}
    except RecordError as error:
        raise ModelError(f"{path}: {error}") from None
    for key in ("species", "guidance"):
        if raw.get(key) is not None:
            kind = list if key == "species" else dict
            if not isinstance(raw[key], kind):
                raise ModelError(f"{path}: '{key}' must be {'a list' if kind is list else 'an object'}, not"
                                 f" {type(raw[key]).__name__}")
            records[key] = raw[key]
    species = records.get("species")
    if species is not None and (len(species) != network.num_classes or not all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[0], int) and isinstance(s[1], str) for s in species)):
        raise ModelError(f"{path}: 'species' must list [class id, name] for each of the network's"
                         f" {network.num_classes} classes")
    sampling = records.get("sampling")
    if sampling is not None and not (sampling.sampler in SAMPLERS and 1 <= sampling.steps <= diffusion.num_steps):
        raise ModelError(f"{path}: 'sampling' must name a sampler ({', '.join(SAMPLERS)}) and its steps (1-"
                         f"{diffusion.num_steps}), not {sampling}")
    if network.num_classes and species is None:
        raise ModelError(f"{path}: the network knows {network.num_classes} species but 'species' does not name them")
    if "guidance" in records:
        try:
            records["guidance"] = GuidanceRecord.from_dict(records["guidance"], diffusion.num_steps)
        except GuidanceError as error:
            raise ModelError(f"{path}: {error}") from None
    return network, diffusion, records


def diffusion_from_dict(values: dict) -> DiffusionConfig:
    check_field_types(DiffusionConfig, values)
    return DiffusionConfig(**values)


def load_weights(path: Path, network: torch.nn.Module) -> None:
    """Loads safetensors weights into `network` as float32, explaining any mismatch in one line."""
    if not path.is_file():
        raise ModelError(f"{path}: missing weights file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ModelError(f"{path}: unreadable or truncated weights ({error})") from None
    expected = network.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not match the config: {len(missing)} missing"
                         f" (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise ModelError(f"{path}: weights do not match the config: {key} has shape {tuple(value.shape)},"
                             f" the config needs {tuple(expected[key].shape)}")
        if not torch.isfinite(value).all():
            raise ModelError(f"{path}: tensor {key} holds NaN or infinite values")
    network.load_state_dict({k: v.float() for k, v in tensors.items()})


def resolve(path_or_hub_id: str | os.PathLike) -> Path:
    """A local model folder, or the cached snapshot of a Hub repo (downloaded if online)."""
    local = Path(path_or_hub_id)
    if local.exists():
        if not local.is_dir():
            raise ModelError(f"{local}: not a model folder")
        return local
    text = str(path_or_hub_id)
    if not HUB_ID.match(text):
        raise ModelError(f"{text}: no such model folder (and not a Hub id of the form owner/name)")
    from huggingface_hub import snapshot_download  # the Hub client only where a Hub id is given: loading stays light
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=[WEIGHTS_FILE, CONFIG_FILE, CARD_FILE,
                                                                     METRICS_FILE, "*.png"]))
    except LocalEntryNotFoundError:
        raise ModelError(f"{text}: not in the Hugging Face cache and the Hub cannot be reached (offline?);"
                         f" download it on a connected machine or give a local folder") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{text}: no such model repo on the Hugging Face Hub") from None
    except (HfHubHTTPError, OSError) as error:
        raise ModelError(f"{text}: could not fetch from the Hugging Face Hub ({str(error).splitlines()[0]})") from None


def load_model(path_or_hub_id: str | os.PathLike, device: str | torch.device = "cpu", guide: str | None = None) -> BirdModel:
    """A model folder or Hub repo, with the guide its config names (`guide`: another guide
    folder instead, or "none" for no guide)."""
    folder = resolve(path_or_hub_id)
    network_config, diffusion_config, records = read_config(folder)
    model = build_model(network_config, diffusion_config, "cpu")
    load_weights(folder / WEIGHTS_FILE, model.network)
    model.network.to(device)
    model.path = folder
    model = replace(model, **records)
    named = model.guidance.guide if model.guidance else None
    if guide != NO_GUIDE and (guide or named):
        location = os.path.normpath(guide or folder / named)  # records and captions name models/g, not models/x/../g
        model.guide = load_model(location, device, guide=NO_GUIDE)
        check_guide(model, model.guide, str(location))
        if model.guidance is None or model.guidance.guide_weight == 1:  # a guide given to a model with no weight
            model.guidance = replace(model.guidance or GuidanceRecord(), guide_weight=GUIDE_WEIGHT)
    return model


def check_guide(main: BirdModel, guide: BirdModel, where: str) -> None:
    """A guide must make the same images from the same noise levels with the same target, and
    know the same species, else its output cannot be mixed with the main model's."""
    mine, theirs = main.diffusion_config, guide.diffusion_config
    problems = []
    if mine.prediction != theirs.prediction:
        problems.append(f"it predicts {theirs.prediction}, {main.name} predicts {mine.prediction}")
    if mine != theirs and mine.prediction == theirs.prediction:
        problems.append(f"its noise schedule ({theirs.schedule}, {theirs.num_steps} steps) differs from"
                        f" {main.name}'s ({mine.schedule}, {mine.num_steps} steps)")
    for name in ("image_size", "in_channels"):
        if getattr(main.network_config, name) != getattr(guide.network_config, name):
            problems.append(f"its {name.replace('_', ' ')} is {getattr(guide.network_config, name)}, not"
                            f" {getattr(main.network_config, name)}")
    if (main.species or None) != (guide.species or None):
        problems.append("it knows other species" if main.species and guide.species else
                        "it is a species model and the main model is not" if guide.species else
                        "the main model is a species model and the guide is not")
    if guide.sampling is not None:
        problems.append("it is a distilled student, which only works with its own few steps")
    if problems:
        raise ModelError(f"{where}: cannot guide {main.name}: {'; '.join(problems)}")


def push_model(folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Uploads a model folder to the Hub (creating the repo if needed); returns its URL."""
    folder = Path(folder)
    read_config(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise ModelError(f"{folder / WEIGHTS_FILE}: missing weights file")
    from huggingface_hub import HfApi  # the Hub client only for an upload

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             allow_patterns=[WEIGHTS_FILE, CONFIG_FILE, CARD_FILE, METRICS_FILE, "*.png"])
    return str(getattr(info, "repo_url", repo_id))
