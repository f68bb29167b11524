"""Quality numbers of every model, the memorization check, training curves, and evaluation on demand."""

import pandas as pd
import streamlit as st

from birdgen import ui
from birdgen.model_folder import ModelError
from birdgen.data import DatasetError
from birdgen.evaluation import (MIN_SAMPLES, EvalSettings, EvaluationError, resolve_sampler, run_evaluation,
                                save_evaluation, summary)
from birdgen.memorization import MEMORIZATION_PAIRS_FILE
from birdgen.features import FeatureError
from birdgen.training_jobs import run_folders
from birdgen.run_folder import read_metrics
from birdgen.utils import WriteError

ui.through_app_navigation()
st.title("📊 Metrics")
st.markdown(
    "Each model's generated birds against real crops it **never trained on**: **FD** (Fréchet distance) and **KID** "
    "(lower is better), **precision** (how many samples look real) and **recall** (how much of the real variety the "
    "samples cover), in the feature space named in each row, with how many generated and real images each number "
    "rests on. **InceptionV3** numbers are the standard FID and KID, the original report's row among them (its sample "
    "count and real set are not stated); FID from fewer than 2,048 real images is biased upwards, more so the fewer "
    "there are, so compare FIDs only at equal counts; KID is unbiased. **MobileNet** numbers work offline but are on "
    "their own scale: compare them only with each other. The **memorization check** compares each sample's distance to "
    "its nearest training crop with the same distance for unseen photos: a ratio near 1 means no copying. "
    "**Near-copies** are samples closer to a training crop than 99% of unseen photos are, beside the rate the unseen "
    "photos give themselves; pictures softer than photos give more in pixels without copying anything, so judge them "
    "by the closest pairs below.")

rows, problems = ui.metrics_rows(ui.available_models())
for problem in problems:
    st.warning(problem)
if rows:
    st.dataframe(pd.DataFrame(rows), hide_index=True)
else:
    st.info(f"No models in `{ui.models_dir()}` yet.")

pairs = [p for p in ui.available_models() if (p / MEMORIZATION_PAIRS_FILE).is_file()]
if pairs:
    st.subheader("Closest to the training set")
    st.caption("For each model, the 8 generated birds nearest to a training crop (top) and that crop (bottom).")
    for path in pairs:
        st.image(str(path / MEMORIZATION_PAIRS_FILE), caption=path.name, width=560)

if ui.limits() is not None:
    st.caption("This server runs in public mode: the numbers above are the stored ones; training curves and new "
               "evaluations are off.")
    st.stop()

st.header("Training curves")
runs = run_folders()
if not runs:
    st.info("No training runs yet: start one on the Train page or with `birdgen train --out runs/NAME`.")
else:
    chosen = st.selectbox("Run", runs, format_func=lambda p: p.name)
    records = read_metrics(chosen)
    if records:
        frame = pd.DataFrame(records).set_index("images_seen")
        st.line_chart(frame["loss"], x_label="training images seen", y_label="loss", height=280)
        st.caption(f"{records[-1]['step']:,} steps · {records[-1]['images_per_s']:.1f} images/s lately")

st.header("Evaluate a model")
model = ui.model_picker(key="eval_model")
columns = st.columns(3)
requested = columns[0].selectbox("Features", ["auto", "inception", "mobilenet"], key="eval_features",
                                 help="auto: the standard InceptionV3 (installed with birdgen), else the offline"
                                      " MobileNet")
num_samples = columns[1].number_input("Generated images", MIN_SAMPLES, 10_000, 1000, step=50)
reference = columns[2].selectbox("Real crops", ["heldout", "train"], format_func={
    "heldout": "held out (never trained on)", "train": "training crops"}.get)
sampler, steps = resolve_sampler(model, EvalSettings()).sampler, resolve_sampler(model, EvalSettings()).steps
guide_weight = ui.guide_weight_control(model, "eval")
st.caption(f"Samples with {sampler} {steps} steps"
           + (" (the student's own)" if model.sampling else " (the sampler of the published numbers)")
           + (", species of the real crops in turn" if model.conditional else "") + ".")
settings = EvalSettings(reference, int(num_samples), guide_weight=guide_weight)
try:
    st.caption(ui.evaluation_estimate(model, settings, requested))
except (FeatureError, DatasetError, EvaluationError, ModelError, ValueError, OSError) as error:
    st.error(str(error))
    st.stop()
if st.button("Run evaluation", type="primary", key="evaluate"):
    bar = st.progress(0.0, text="Starting…")
    try:
        result = run_evaluation(model, ui.model_data(model), settings, requested,
                                progress=lambda stage, done, total: bar.progress(done / total,
                                                                                 text=f"{stage}: {done}/{total}"),
                                notify=st.info, estimate=False)  # shown above, from the cached pace
        saved, replaced = save_evaluation(model, result, replace=True)  # pressing the button again measures anew
    except (FeatureError, DatasetError, EvaluationError, ModelError, ValueError, OSError, WriteError) as error:
        st.error(str(error))
        st.stop()
    st.success(f"{summary(result.metrics)} — saved to {saved}"
               + (f", replacing the same measurement made before ({replaced.short()})" if replaced else ""))
