"""Start, watch, stop and resume a training run in the background."""

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from birdgen import ui
from birdgen.data import DatasetError
from birdgen.networks import PRESETS
from birdgen.training_jobs import (TrainForm, current_job, last_job, log_tail, progress_text, start_training,
                                   stop_training)
from birdgen.run_folder import read_metrics

REFRESH_S = 2.0  # how often the live view rereads the run folder while a run is going

ui.through_app_navigation()
st.title("🏋️ Train a model")
ui.off_in_public_mode("Training")
st.markdown("Fill in the form to start `birdgen train` in the background (one run at a time). While it runs, the "
            "progress, loss curve, latest sample grid and log below update by themselves; **Stop** saves a "
            "checkpoint, **Resume** continues from it. On a 2-core CPU expect about 15–30 images/s with the small "
            "presets, depending on the CPU.")

job = current_job()
with st.form("train"):
    columns = st.columns(3)
    data = columns[0].text_input("CUB_200_2011 folder", str(ui.data_root()))
    run_name = columns[1].text_input("Run name", "my-birds", help="Letters, digits, '-', '_', '.'")
    preset = columns[2].selectbox("Network preset", list(PRESETS), index=list(PRESETS).index("small"))
    columns = st.columns(3)
    attention = columns[0].toggle("Self-attention (8×8)", value=False)
    schedule = columns[1].selectbox("Noise schedule", ["cosine", "linear"])
    batch_size = columns[2].number_input("Batch size", 1, 1024, 32)
    columns = st.columns(3)
    lr = columns[0].number_input("Learning rate", 1e-6, 0.1, 3e-4, format="%.5f")
    steps = columns[1].number_input("Steps", 1, 10_000_000, 2000, step=100)
    every = columns[2].number_input("Checkpoint and preview every", 1, 100_000, 250)
    start = st.form_submit_button("Start training", type="primary", disabled=job is not None)

form = TrainForm(data, run_name.strip(), preset, attention, int(batch_size), float(lr), int(steps), schedule,
                 int(every), int(every))
if start:
    try:
        job = start_training(form)
        st.success(f"Started training in {job.run_dir} (pid {job.pid}).")
    except (ValueError, DatasetError, RuntimeError) as error:
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
        except (ValueError, DatasetError, RuntimeError) as error:
            st.error(str(error))


@st.fragment(run_every=REFRESH_S if job is not None else None)
def run_view(was_running: bool) -> None:
    """Status, loss curve, preview and log; reruns by itself every REFRESH_S while the run is live."""
    running = current_job()
    if was_running and running is None:
        st.rerun()  # the run ended: redraw the whole page (Start and Resume become available)
    records = read_metrics(shown.run_dir)
    if running is not None:
        started = time.strftime("%H:%M:%S", time.localtime(running.started))
        if records:
            st.success(f"Running (pid {running.pid}, started {started}) · "
                       f"{progress_text(records, shown.form['steps'], shown.form['batch_size'])}")
        else:
            st.info(f"Starting (pid {running.pid}, {time.time() - running.started:.0f} s): loading the crops and "
                    "building the network; the first steps appear here in a few seconds.")
    elif records:
        st.caption(progress_text(records, shown.form["steps"], shown.form["batch_size"]).split(" · about")[0])
    if records:
        frame = pd.DataFrame(records).set_index("step")
        st.line_chart(frame["loss"], x_label="step", y_label="loss", height=260)
    preview = Path(shown.run_dir) / "samples" / "latest.png"
    if preview.is_file():
        st.image(preview.read_bytes(), caption="latest preview (EMA weights, DDIM, fixed seed)", width=400)
    st.code(log_tail(shown) or "(no output yet)", language=None)


run_view(job is not None)
