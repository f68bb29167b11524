"""Train on your own pictures: check them, fine-tune a shipped model (or train from scratch) in
the background, watch it, and export the run as a model every page can pick."""

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from birdgen import ui
from birdgen.data import DatasetError
from birdgen.datacheck import SKIP_CHOICE
from birdgen.diffusion import SCHEDULES
from birdgen.networks import FREEZABLE, FREEZE_LABELS, PRESETS
from birdgen.sources import layout_of
from birdgen.run_folder import read_metrics
from birdgen.training_jobs import (FORM_LIMITS, LR_RANGE, UPLOAD_LIMIT_MB, TrainForm, current_job, export_to_models,
                                   last_job, log_tail, progress_text, run_failure, run_outlook, save_upload,
                                   start_training, stop_training)
from birdgen.utils import WriteError

REFRESH_S = 2.0  # how often the live view rereads the run folder while a run is going
FINE_TUNE, FROM_SCRATCH = "Fine-tune a shipped model", "From scratch"

ui.through_app_navigation()
st.title("🏋️ Train a model")
ui.off_in_public_mode("Training")
st.markdown("Bring a folder of pictures (one subfolder per class, or none), a `.zip` of one, or a CUB_200_2011 folder. "
            "The check below decodes every picture once, as training will, and shows what the model will see. "
            "**Fine-tuning** a shipped model learns your classes in a few hundred steps: with the defaults, 15 "
            "minutes on a 2-core AVX2-only CPU gave samples at 95% of the real pictures' class accuracy; once it "
            "runs, this page says what this machine's pace buys. From scratch takes hours. The run goes on in the background: **Stop** saves a checkpoint, "
            "**Resume** continues, **Export** makes it a model on every page.")

job = current_job()
st.subheader("1. Your pictures")
columns = st.columns([3, 2])
data = columns[0].text_input("Folder, zip or CUB_200_2011 folder", str(ui.data_root()), key="train_data")
upload = columns[1].file_uploader(f"… or upload a .zip (up to {UPLOAD_LIMIT_MB} MB)", type=["zip"], key="train_upload")
if upload is not None:
    try:
        data = str(save_upload(upload.name, upload.getvalue()))
        columns[1].caption(f"Kept (not extracted) at `{data}`")
    except (ValueError, WriteError) as error:
        st.error(str(error))
report = ui.checked_pictures(data)

st.subheader("2. How to train")
mode = st.radio("Start", [FINE_TUNE, FROM_SCRATCH], horizontal=True, key="train_mode")
models = [p.name for p in ui.available_models()]
with st.form("train"):
    columns = st.columns(3)
    run_name = columns[0].text_input("Run name", "my-birds", help="Letters, digits, '-', '_', '.'", key="train_run")
    has_classes = report is not None and layout_of(report.layout).has_classes
    if st.session_state.get("train_conditional_for") != data:  # other pictures: the toggle follows their classes
        st.session_state["train_conditional_for"] = data
        st.session_state["train_conditional"] = has_classes
    conditional = columns[1].toggle("One class per folder (class-conditional)", disabled=not has_classes, help="Lets you pick a class when generating",
                                    key="train_conditional")
    if mode == FINE_TUNE:
        start_from = columns[2].selectbox("Shipped model to start from", models,
                                          index=models.index("small-attn") if "small-attn" in models else 0,
                                          key="train_start_from")
        defaults = TrainForm.fine_tune(data, run_name, "", conditional)
        freeze = st.selectbox("What learns", FREEZABLE, index=FREEZABLE.index(defaults.freeze),
                              format_func=FREEZE_LABELS.get, key="train_freeze")
    else:
        start_from = None
        defaults = TrainForm(data, run_name)
        preset = columns[2].selectbox("Network preset", list(PRESETS), index=list(PRESETS).index(defaults.preset),
                                      key="train_preset")
        columns = st.columns(3)
        attention = columns[0].toggle("Self-attention (8×8)", value=defaults.attention, key="train_attention")
        schedule = columns[1].selectbox("Noise schedule", SCHEDULES, index=SCHEDULES.index(defaults.schedule),
                                       key="train_schedule")
    columns = st.columns(4)
    batch_size = columns[0].number_input("Batch size", *FORM_LIMITS["batch_size"], defaults.batch_size, key="train_batch")
    lr = columns[1].number_input("Learning rate", *LR_RANGE, defaults.lr, format="%.5f", key=f"train_lr_{mode}")
    steps = columns[2].number_input("Steps (at most)", *FORM_LIMITS["steps"], defaults.steps, step=100,
                                 key=f"train_steps_{mode}")
    minutes = columns[3].number_input("Minutes (at most; 0: no limit)", *map(float, FORM_LIMITS["max_minutes"]),
                                      float(defaults.max_minutes), step=5.0, key=f"train_minutes_{mode}")
    columns = st.columns(2)
    every = columns[0].number_input("Checkpoint and preview every (steps)", *FORM_LIMITS["checkpoint_every"],
                                    defaults.checkpoint_every, key=f"train_every_{mode}")
    skip = columns[1].checkbox(SKIP_CHOICE, value=False,
                               disabled=report is None or not report.unusable, key="train_skip")
    start = st.form_submit_button("Start training", type="primary", disabled=job is not None or report is None)

if start:
    if mode == FINE_TUNE:
        form = TrainForm.fine_tune(data, run_name.strip(), str(ui.models_dir() / start_from), conditional)
        form.freeze = freeze
    else:
        form = TrainForm(data, run_name.strip(), preset, attention, conditional=conditional, schedule=schedule)
    form.batch_size, form.lr, form.steps, form.max_minutes = int(batch_size), float(lr), int(steps), float(minutes)
    form.checkpoint_every = form.sample_every = int(every)
    form.skip_unreadable = skip
    if report is not None and report.unusable and not skip:
        st.error(f"{len(report.unusable)} pictures cannot be used (listed above): fix them, or tick '{SKIP_CHOICE}'.")
    else:
        try:
            job = start_training(form)
            st.success(f"Started training in {job.run_dir} (pid {job.pid}).")
        except (ValueError, DatasetError, RuntimeError, WriteError) as error:
            st.error(str(error))

shown = job or last_job()
if shown is None:
    st.info("No training run started from the app yet.")
    st.stop()

st.header(f"Run {shown.run_dir}")
columns = st.columns(3)
if job is not None:
    if columns[1].button("Stop (saves a checkpoint)", key="stop"):
        with st.spinner("Saving a checkpoint and stopping…"):
            stopped = stop_training()
        (st.success if stopped else st.warning)("Stopped." if stopped else "Still stopping; this page updates when it has.")
        job = None
else:
    columns[0].info("Not running.")
    if columns[1].button("Resume", key="resume"):
        try:
            job = start_training(TrainForm(**shown.form), resume=True)
            st.success(f"Resumed (pid {job.pid}).")
        except (ValueError, DatasetError, RuntimeError, WriteError) as error:
            st.error(str(error))

if job is None and any((Path(shown.run_dir) / "checkpoints").glob("step-*")):
    with st.form("export"):
        st.markdown("**Export** the run's latest checkpoint (EMA weights) as a model: it then appears in every page's "
                    "model picker. This samples 64 birds for its card, about a minute on a CPU.")
        columns = st.columns([2, 1])
        name = columns[0].text_input("Model name", Path(shown.run_dir).name, key="export_name")
        exported = columns[1].form_submit_button("Export")
    if exported:
        try:
            with st.spinner("Exporting: weights, sample grid, held-out loss and model card…"):
                folder = export_to_models(shown.run_dir, name.strip(), ui.models_dir())
            st.success(f"Exported `{folder}`: pick **{folder.name}** on Generate, Compare, Explore or Metrics.")
        except (ValueError, DatasetError, RuntimeError, WriteError) as error:
            st.error(str(error))


@st.fragment(run_every=REFRESH_S if job is not None else None)
def run_view(was_running: bool) -> None:
    """Status, loss curve, preview and log; reruns by itself every REFRESH_S while the run is live."""
    running = current_job()
    if was_running and running is None:
        st.rerun()  # the run ended: redraw the whole page (Start, Resume and Export become available)
    records = read_metrics(shown.run_dir)
    form = shown.form
    if running is not None:
        started = time.strftime("%H:%M:%S", time.localtime(running.started))
        if records:
            progress = progress_text(records, form["steps"], form["batch_size"], form.get("max_minutes", 0.0),
                                     time.time() - running.started)
            st.success(f"Running (pid {running.pid}, started {started}) · {progress}")
            st.caption(run_outlook(records, form))
        else:
            st.info(f"Starting (pid {running.pid}, {time.time() - running.started:.0f} s): loading the crops and "
                    "building the network; the first steps appear here in a few seconds.")
    else:
        failure = run_failure(shown)
        if failure:
            st.error(f"The run stopped: {failure}")
        if records:
            st.caption(progress_text(records, form["steps"], form["batch_size"]).split(" · about")[0])
    if records:
        frame = pd.DataFrame(records).set_index("step")
        st.line_chart(frame["loss"], x_label="step", y_label="loss", height=260)
    preview = Path(shown.run_dir) / "samples" / "latest.png"
    if preview.is_file():
        st.image(preview.read_bytes(), caption="latest preview (EMA weights, DDIM, fixed seed)", width=400)
    st.code(log_tail(shown) or "(no output yet)", language=None)


run_view(job is not None)
