"""Streamlit building blocks shared by the app's pages: cached models, the model picker, the
sampler controls and a generation run with a live progress bar. Pages stay short scripts."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from pathlib import Path

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

from .data import CropSettings, load_crops
from .datacheck import check_dataset
from .editing import EditError, load_picture
from .features import choose_feature_space, load_extractor
from .guidance import GUIDE_WEIGHT_RANGE, SPECIES_WEIGHT_RANGE
from .metrics_file import REPORT_FID, REPORT_KID
from .model_folder import CONFIG_FILE, WEIGHTS_FILE, BirdModel, ModelError, load_model
from .pipeline import (DEFAULT_SAMPLING, MAX_IMAGES, GenerationQueue, GenerationRequest, QueueFull, generate,
                       model_sampling, planned_evaluations)
from .precision import precision_text
from .public import LimitError, PublicLimits, public_limits
from .samplers import SAMPLERS, run_steps
from .sources import DatasetError, open_source
from .species import readable, species_index, species_names
from .utils import machine_description, resolve_device

REPO = Path(__file__).resolve().parent.parent
SAMPLER_LABELS = {"ddpm": "DDPM (ancestral)", "ddim": "DDIM", "dpmpp": "DPM-Solver++ (2M)"}
# Slider range and default per sampler: DDPM needs many steps, DPM-Solver++ few.
STEP_RANGES = {"ddpm": (10, 1000, 250), "ddim": (1, 250, 25), "dpmpp": (3, 100, DEFAULT_SAMPLING[1])}


def through_app_navigation() -> None:
    """Called first by every page script. Streamlit treats a `pages/` folder beside app.py as an
    old-style multipage app until app.py has run once, so a page's URL opened first on a fresh
    server (a bookmark) would run the page file on its own, with raw file names in the sidebar.
    This hands such a run over to app.py's navigation, which then opens the same page."""
    if PagesManager.uses_pages_directory:
        PagesManager.uses_pages_directory = False
        st.rerun()


def limits() -> PublicLimits | None:
    """Public mode's limits (BIRDGEN_PUBLIC=1, see birdgen.public), or None on a private server."""
    return public_limits()


def off_in_public_mode(what: str) -> None:
    """Stops a page that a public server does not offer, saying so in one line."""
    if limits() is not None:
        st.info(f"{what} is off on this server: it runs in public mode (BIRDGEN_PUBLIC=1).")
        st.stop()


def enforce_limits(images: int, evaluations_per_image: int) -> None:
    """In public mode, stops the page with the limit's message when a request is over it."""
    public = limits()
    if public is None:
        return
    try:
        public.check(images, evaluations_per_image)
    except LimitError as error:
        st.error(str(error))
        st.stop()


def enforce_edit_limits(images: int, steps: int, species: bool, guide_weight: float) -> None:
    """Public mode's limits for an edit of `steps` sampler steps: at most two passes per step
    with a species and one more with the guide."""
    enforce_limits(images, steps * ((2 if species else 1) + (1 if guide_weight != 1 else 0)))


def enforce_request_limits(model: BirdModel, request: GenerationRequest) -> None:
    if limits() is not None:
        enforce_limits(request.total_images, planned_evaluations(model, request))


def models_dir() -> Path:
    """The shipped models: $BIRDGEN_MODELS_DIR, else models/ beside the app."""
    return Path(os.environ.get("BIRDGEN_MODELS_DIR") or REPO / "models")


def data_root() -> Path:
    """The default CUB folder: $BIRDGEN_DATA, else the shared partial copy beside the repo."""
    return Path(os.environ.get("BIRDGEN_DATA") or REPO.parent / "shared" / "data" / "CUB_200_2011")


def model_data(model: BirdModel) -> Path:
    """Where a model's own pictures are: the folder its split record names, where it still is,
    else, for a CUB model, the default CUB folder (the shipped models' data). A model of another
    folder whose pictures are gone has none: DatasetError naming where they were."""
    record = model.data
    if record is not None and record.path and Path(record.path).exists():
        return Path(record.path)
    if record is not None and not record.kind.has_boxes:  # a CUB model falls back to the default CUB folder
        raise DatasetError(f"{model.path.name} was trained on {record.path or record.dataset}, which is not there any"
                           " more")
    return data_root()


def available_models() -> list[Path]:
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / CONFIG_FILE).is_file())


def cached_model(path: str, device_name: str) -> BirdModel:
    """The model folder at `path`, loaded once and shared by every session (sampling only reads
    the weights, and each run has its own generator and tensors); loaded again when its config
    or weights change on disk, e.g. after a re-export."""
    stamps = tuple((Path(path) / name).stat().st_mtime_ns if (Path(path) / name).exists() else 0
                   for name in (CONFIG_FILE, WEIGHTS_FILE))
    return _load_cached(path, device_name, stamps)


@st.cache_resource(show_spinner="Loading model…", max_entries=16)
def _load_cached(path: str, device_name: str, stamps: tuple[int, int]) -> BirdModel:
    return load_model(path, device_name)


def model_picker(label: str = "Model", key: str = "model", prefer: str | None = None) -> BirdModel:
    """A select box over models/; stops the page with an explanation when there are none."""
    models = available_models()
    if not models:
        st.warning(f"No trained models in `{models_dir()}`. Train one with `birdgen train`, export it with "
                   "`birdgen export RUN --to models/NAME`, then reload this page.")
        st.stop()
    names = [p.name for p in models]
    index = next((i for i, n in enumerate(names) if prefer and n == prefer), 0)
    name = st.selectbox(label, names, index=index, key=key)
    try:
        return cached_model(str(models_dir() / name), str(resolve_device()))
    except ModelError as error:
        st.error(f"Cannot load this model: {error}")
        st.stop()


def sampler_controls(key: str = "gen", max_images: int = 16, default_images: int = 8,
                     model: BirdModel | None = None) -> GenerationRequest:
    """Sampler, steps (range fits the sampler), eta, seed (with a random button), image count.
    A distilled student (`model.sampling`) has one sampler and step count: those are shown, not asked."""
    eta = 0.0
    if model is not None and model.sampling is not None:
        sampler, steps = model_sampling(model)
        st.info(f"**{model.name}** is distilled to sample in **{steps} {SAMPLER_LABELS[sampler]} step"
                f"{'s' if steps > 1 else ''}** (its teacher: `{model.distillation.teacher if model.distillation else '?'}`);"
                " other settings would give noise, so they are fixed.")
    else:
        columns = st.columns(2)
        sampler = columns[0].selectbox("Sampler", SAMPLERS, index=SAMPLERS.index(DEFAULT_SAMPLING[0]),
                                       format_func=SAMPLER_LABELS.get, key=f"{key}_sampler")
        low, high, default = STEP_RANGES[sampler]
        steps = columns[1].slider("Steps", low, high, default, key=f"{key}_steps_{sampler}",
                                  help="Network evaluations. More steps: slower, usually cleaner birds.")
        if sampler == "ddim":
            eta = st.slider("eta", 0.0, 1.0, 0.0, 0.05, key=f"{key}_eta",
                            help="0 is deterministic DDIM; 1 adds as much fresh noise per step as DDPM.")
    seed_key = f"{key}_seed"
    if seed_key not in st.session_state:
        st.session_state[seed_key] = 0
    columns = st.columns([3, 1, 3])
    columns[1].button("🎲 Random", key=f"{key}_random", on_click=_randomize_seed, args=(seed_key,),
                      help="Pick a random seed")
    seed = columns[0].number_input("Seed", 0, 2**31 - 1, step=1, key=seed_key)
    public = limits()
    most = min(max_images, MAX_IMAGES, public.max_images if public else MAX_IMAGES)
    count = columns[2].number_input("Images", 1, most, min(default_images, most), key=f"{key}_count")
    return GenerationRequest(sampler, int(steps), int(count), int(seed), float(eta))


def ddim_steps(model: BirdModel, container, key: str, help: str | None = None) -> int:
    """A DDIM step slider, or a distilled student's fixed step count shown as such."""
    if model.sampling is not None:
        container.metric("DDIM steps (distilled)", model.sampling.steps)
        return model.sampling.steps
    return int(container.slider("DDIM steps", 5, 100, 25, key=key, help=help))


def species_picker(model: BirdModel, label: str, key: str, container=st) -> int | None:
    """A searchable select box over a class-conditional model's species (or a folder's classes),
    "any species" first; returns the chosen class id, or None."""
    word = model.class_word
    names = {class_id: f"{readable(name)} ({class_id})" for class_id, name in model.species}
    return container.selectbox(label, [None, *names], key=key, format_func=lambda c: f"any {word}" if c is None
                               else names[c], help=f"Type to search. 'any {word}' samples without a label.")


def guidance_slider(model: BirdModel, key: str, disabled: bool = False, container=st) -> float:
    low, high = SPECIES_WEIGHT_RANGE
    word = model.class_word
    return float(container.slider(f"{word.capitalize()} guidance", low, high, model.resolve_guidance().species_weight,
                                  0.5, key=key, disabled=disabled,
                                  help=f"How closely to follow the {word}: 0 ignores it, 1 is the plain conditional "
                                       f"model, higher gives more typical birds of it with less variety."))


def guide_weight_control(model: BirdModel, key: str, container=st) -> float:
    """Autoguidance on/off and its w, for a model whose config names a guide; 1.0 (off) otherwise."""
    if model.guide is None:
        return 1.0
    on = container.toggle(f"Autoguidance by {model.guide.name}", value=True, key=f"{key}_guided",
                          help="Steers each step away from what a smaller, shorter-trained version of the model "
                               "predicts: cleaner shapes and backgrounds for about a third more compute.")
    low, high = GUIDE_WEIGHT_RANGE
    weight = container.slider("Autoguidance w", low, high, model.resolve_guidance().guide_weight, 0.25,
                              key=f"{key}_guide_weight", disabled=not on,
                              help="1 is the model alone; higher moves further from the guide's prediction.")
    return float(weight) if on else 1.0


@dataclasses.dataclass(frozen=True)
class GuidanceChoice:
    class_id: int | None = None  # CUB class id of the chosen species, or None
    species_weight: float | None = None
    guide_weight: float = 1.0


def guidance_controls(model: BirdModel, key: str) -> GuidanceChoice:
    """The species picker and its guidance slider (species models), and the autoguidance toggle
    and weight (models with a guide)."""
    class_id, species_weight = None, None
    if model.conditional:
        columns = st.columns(2)
        class_id = species_picker(model, model.class_word.capitalize(), f"{key}_species", columns[0])
        species_weight = guidance_slider(model, f"{key}_guidance", class_id is None, columns[1])
    return GuidanceChoice(class_id, species_weight, guide_weight_control(model, key))


def with_guidance(model: BirdModel, request: GenerationRequest, choice: GuidanceChoice) -> GenerationRequest:
    """The request for `model` with the chosen species, if the model knows it, and its guide weight."""
    guide_weight = choice.guide_weight if model.guide is not None else None
    index = species_index(model, choice.class_id)
    if index is None:
        return dataclasses.replace(request, guide_weight=guide_weight)
    return dataclasses.replace(request, species=(index,), guidance=choice.species_weight, guide_weight=guide_weight)


def generation_caption(model: BirdModel, request: GenerationRequest, generation) -> str:
    """'small-attn · dpmpp · 10 steps · seed 0 · Cardinal · species guidance 3, autoguidance by …,
    w 2 · 10 evaluations of small-attn + 8 of its guide (1.27× the unguided cost)'."""
    parts = [model.name, request.sampler or model_sampling(model)[0], f"{generation.steps} steps",
             f"seed {request.seed}"]
    if request.species:
        names = species_names(model)
        parts.append(", ".join(names[s] for s in request.species))
    guided = generation.guidance.describe(bool(request.species), model.guide.name if model.guide else None)
    return " · ".join(parts + ([guided] if guided else []) + [generation.cost_text(model)])


def _randomize_seed(seed_key: str) -> None:
    st.session_state[seed_key] = random.randrange(2**31 - 1)


def generation_queue() -> GenerationQueue:
    public = limits()
    return _server_queue(public.max_waiting if public else None)


@st.cache_resource
def _server_queue(max_waiting: int | None) -> GenerationQueue:
    return GenerationQueue(max_waiting)  # one for the whole server: every user shares the same cores


@contextlib.contextmanager
def queued_turn():
    """Runs the enclosed generation when earlier ones from other users have finished, saying
    so on the page while it waits; when the queue is full, says so at once and stops the page."""
    notice = st.empty()

    def on_wait(ahead: int) -> None:
        notice.info(f"Waiting for {ahead} earlier request{'s' if ahead > 1 else ''} from other users of this app "
                    "to finish (one generation runs at a time, so that each gets all the CPU cores)…")

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(generation_queue().turn(on_wait))
        except QueueFull as error:
            notice.warning(f"The server is busy ({error}). Please try again in a minute.")
            st.stop()
        notice.empty()
        yield


def progress_callback(label: str = "Denoising"):
    """A progress bar fed by sampler steps; pressing any button (e.g. Cancel) reruns the page,
    which stops the run between two steps."""
    bar = st.progress(0.0, text=label)

    def on_step(step) -> None:
        bar.progress((step.index + 1) / step.num_steps, text=f"{label}: step {step.index + 1} of {step.num_steps}")

    return bar, on_step


def run_queued(steps, label: str = "Denoising", cancel_key: str | None = None):
    """Runs a step generator (a sampler, SDEdit, RePaint…) in its turn of the generation queue
    with a progress bar and, if `cancel_key` is given, a Cancel button (pressing it reruns the
    page, which stops the run between two steps). Returns the last step."""
    with queued_turn():
        cancel_slot = st.empty()
        if cancel_key:
            cancel_slot.button("Cancel", key=cancel_key)
        bar, on_step = progress_callback(label)
        final = run_steps(steps, on_step)
        bar.empty()
        cancel_slot.empty()
    return final


def checked_pictures(path: str):
    """The check report of the pictures at `path` (decoded once into the crop cache, as training
    will), shown as counts, advice, what cannot be used and the preview; None, with the reason
    shown, where the path holds no usable set of pictures."""
    try:
        report = _check_report(path, open_source(path).fingerprint())
    except (DatasetError, ValueError, OSError) as error:
        st.error(str(error))
        return None
    columns = st.columns(4)
    columns[0].metric("Pictures", f"{report.decoded:,}")
    columns[1].metric("Cannot be used", len(report.unusable))
    columns[2].metric("Classes", len(report.classes) or "none")
    columns[3].metric("Held out", f"{report.split['test']:,}")
    if report.unusable:
        st.warning("Cannot be used: " + "; ".join(f"{key}: {reason}" for key, reason in report.unusable[:10])
                   + (f"; … {len(report.unusable) - 10} more" if len(report.unusable) > 10 else ""))
    st.markdown("\n".join(f"- {line}" for line in report.advice_for("page")))
    with st.expander("The whole check report"):
        st.code(report.text(), language=None)
    if Path(report.preview).is_file():
        st.image(Path(report.preview).read_bytes(), caption="What the model will see: training crops after decoding,"
                 " cropping, resizing and random flips", width=520)
    return report


@st.cache_data(show_spinner="Checking the pictures (each is decoded once)…", max_entries=8)
def _check_report(path: str, fingerprint: str):
    return check_dataset(path, progress=False)


def model_crops(model: BirdModel):
    """Real crops of a model's own pictures, cut as it saw them (`model_data`; its split record's
    crop settings, or the default crops)."""
    settings = model.data.crop_settings if model.data else CropSettings(model.network_config.image_size)
    return _real_crops(str(model_data(model)), *dataclasses.astuple(settings))


@st.cache_resource(show_spinner="Cropping the dataset…", max_entries=8)
def _real_crops(root: str, size: int, crop: str, padding: float, background: str):
    return load_crops(root, CropSettings(size, crop, padding, background), progress=False)


def picture_source(model: BirdModel, key: str):
    """Where an edit starts: a generated bird, a real crop or an uploaded PNG/JPEG. Returns the
    picture as a (1, 3, size, size) model-range tensor, or None (with a message) if there is none."""
    size = model.network_config.image_size
    source = st.radio("Start from", ["a generated bird", "a real bird crop", "your picture"], horizontal=True,
                      key=f"{key}_source")
    if source == "a generated bird":
        seed = st.number_input("Seed of the bird", 0, 2**31 - 1, 0, key=f"{key}_source_seed")
        return _generated_picture(model, int(seed), str(model.path))
    if source == "a real bird crop":
        return real_crop(model, key)
    upload = st.file_uploader("A PNG or JPEG (its centre square is used)", type=["png", "jpg", "jpeg"],
                              key=f"{key}_upload")
    if upload is None:
        st.caption("Nothing is stored: the picture stays in this browser session's memory.")
        return None
    public = limits()
    try:
        return load_picture(upload.getvalue(), size, upload.name,
                            public.max_upload_mb * 2**20 if public else None)
    except EditError as error:
        st.error(str(error))
        return None


def real_crop(model: BirdModel, key: str):
    """A crop of the model's own pictures, picked by number: a (1, 3, size, size) model-range
    tensor, or None (with a message saying where the pictures were looked for) if there are none."""
    try:
        crops = model_crops(model)
    except DatasetError as error:
        where = " Set BIRDGEN_DATA to a CUB_200_2011 folder." if model.data is None or model.data.kind.has_boxes else ""
        st.info(f"No pictures found ({error}).{where} Start from a generated bird instead.")
        return None
    index = st.number_input("Which crop", 0, len(crops) - 1, 0, key=f"{key}_crop")
    return crops.tensor([int(index)])


@st.cache_data(max_entries=32, show_spinner="Generating the starting bird…")
def _generated_picture(_model: BirdModel, seed: int, model_path: str):
    return generate(_model, GenerationRequest(num_images=1, seed=seed)).images.cpu()


def describe(model: BirdModel) -> str:
    trained = f" · trained on {model.training.images_seen:,} images" if model.training else ""
    if model.distillation:
        trained += f" · distilled from {model.distillation.teacher} on {model.distillation.images_seen:,} more"
    return (f"{model.parameter_count:,} parameters{trained} · {machine_description(model.device)} ·"
            f" {precision_text(model.autocast_dtype)}")


def unequal_training(first: BirdModel, second: BirdModel, tolerance: float = 0.1) -> str | None:
    """A warning when two models saw different amounts of training (or it is unknown), since then
    the difference between their samples is not down to the networks alone."""
    if first.training is None or second.training is None:
        unknown = [m.name for m in (first, second) if m.training is None]
        return f"How long {' and '.join(unknown)} trained is not recorded, so the comparison may not be like for like."
    seen = first.training.images_seen, second.training.images_seen
    if abs(seen[0] - seen[1]) <= tolerance * max(seen):
        return None
    return (f"Not like for like: {first.name} was trained on {seen[0]:,} images and {second.name} on {seen[1]:,}, "
            "so part of the difference comes from the longer training, not the network.")


def stored_metrics_text(model: BirdModel) -> str:
    """The model's stored quality numbers, each with its feature space, on one line."""
    evaluations = model.metrics()
    if not evaluations:
        return "Quality: not measured yet (see the Metrics page)."
    return " · ".join(m.short() for _, m in sorted(evaluations.items()))


def metrics_rows(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """One table row per (model, feature space) with every stored figure and the image counts it
    rests on, Inception rows first and the original report's row among them; and a warning per
    model folder that cannot be read."""
    rows, problems = [], []
    for path in paths:
        try:
            evaluations = cached_model(str(path), str(resolve_device())).metrics()
        except ModelError as error:
            problems.append(f"{path.name}: {error}")
            continue
        if not evaluations:
            rows.append({"model": path.name, "features": "not measured"})
        for space, m in sorted(evaluations.items()):
            memo, accuracy = m.memorization or {}, m.species_accuracy or {}
            rows.append({"model": path.name, "features": space, "FD": m.fid, "KID": m.kid_mean,
                         "KID ± std": m.kid_std, "generated": f"{m.num_generated:,}", "real": f"{m.num_real:,}",
                         "precision": m.precision, "recall": m.recall,
                         "copy ratio (pixels)": memo.get("pixel", {}).get("median_ratio"),
                         "near-copies": memo.get("near_copy_fraction"),
                         "near-copies (held-out)": memo.get("heldout_near_copy_fraction"),
                         "sampler": f"{m.sampler} {m.steps}",
                         "guide": f"{m.guide} w {m.guide_weight:g}" if m.guide else "none",
                         "species top-1": accuracy.get("generated_top1"),
                         "species top-1 (real)": accuracy.get("heldout_top1"), "real crops": m.reference_split})
    if any(row["features"] == "inception" for row in rows):
        rows.append({"model": "original report", "features": "inception", "FD": REPORT_FID, "KID": REPORT_KID,
                     "generated": "not stated", "real": "not stated", "real crops": "not stated"})
    rows.sort(key=lambda row: row["features"] != "inception")  # stable: the models' order within each space
    return rows, problems


def evaluation_estimate(model: BirdModel, settings, requested: str) -> str:
    """How long the Metrics page's evaluation with `settings` will take on this machine, measured
    before it starts (`evaluation.estimate_evaluation`; the pace probe runs once per model and settings)."""
    from .evaluation import estimate_evaluation, resolved_settings  # torchmetrics and sklearn: the Metrics page only

    space = choose_feature_space(requested)[0]
    resolved = resolved_settings(model, settings)
    pace = _pace(model, str(model.path), space, resolved.sampler, resolved.steps, resolved.guide_weight,
                 resolved.interval, resolved.guidance)
    return estimate_evaluation(model, model_crops(model), settings, _extractor(space).identity, pace).text()


@st.cache_resource(show_spinner="Loading the feature network…", max_entries=2)
def _extractor(space: str):
    return load_extractor(space).eval()


@st.cache_resource(show_spinner="Measuring this machine's pace…", max_entries=16)
def _pace(_model: BirdModel, path: str, space: str, sampler: str, steps: int, guide_weight: float,
          interval: tuple[int, int] | None, guidance: float | None):
    from .evaluation import EvalSettings, measure_pace  # torchmetrics and sklearn: the Metrics page only

    settings = EvalSettings(sampler=sampler, steps=steps, guide_weight=guide_weight, interval=interval,
                            guidance=guidance)
    return measure_pace(_model, settings, _extractor(space))
