"""KID/FID of every model, training curves, and evaluation on demand."""

import pandas as pd
import streamlit as st

from birdgen import ui
from birdgen.checkpoint import ModelError
from birdgen.data import DatasetError, load_crops
from birdgen.evaluation import (EvalSettings, InceptionFeatures, InceptionWeightsMissing, evaluate,
                                find_inception_weights, write_metrics)
from birdgen.training_jobs import run_folders
from birdgen.training_loop import read_metrics

st.title("📊 Metrics")
st.markdown("**KID** and **FID** compare InceptionV3 features of generated birds with real crops: lower is "
            "better (the original report: KID 0.2089, FID 92.47). Training curves come from each run's "
            "`metrics.jsonl`.")

rows = []
for path in ui.available_models():
    try:
        metrics = ui.cached_model(str(path), str(ui.device())).metrics()
    except ModelError as error:
        st.warning(f"{path.name}: {error}")
        continue
    if metrics:
        rows.append({"model": path.name, "KID": metrics["kid_mean"], "KID ± std": metrics["kid_std"],
                     "FID": metrics["fid"], "sampler": metrics["sampler"], "steps": metrics["steps"],
                     "generated": metrics["num_generated"], "real": metrics["num_real"], "split": metrics["split"]})
    else:
        rows.append({"model": path.name})
if rows:
    st.dataframe(pd.DataFrame(rows), hide_index=True)
else:
    st.info(f"No models in `{ui.models_dir()}` yet.")

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
try:
    weights = find_inception_weights()
except InceptionWeightsMissing as error:
    st.info(f"KID/FID need the standard InceptionV3 weights, which are not on this machine. {error}")
    st.stop()
model = ui.model_picker(key="eval_model")
columns = st.columns(3)
num_samples = columns[0].number_input("Generated images", 50, 10_000, 1000, step=50)
split = columns[1].selectbox("Real crops", ["test", "train", "all"])
steps = columns[2].slider("DDIM steps", 5, 250, 50)
if st.button("Run evaluation", type="primary", key="evaluate"):
    try:
        crops = load_crops(ui.data_root(), model.network_config.image_size, progress=False)
    except DatasetError as error:
        st.error(f"No dataset for the real images: {error}")
        st.stop()
    bar = st.progress(0.0, text="Starting…")
    extractor = InceptionFeatures(weights)
    result = evaluate(model, crops, EvalSettings(split, int(num_samples), "ddim", int(steps)), extractor,
                      extractor.identity, lambda stage, done, total: bar.progress(done / total, text=f"{stage}: {done}/{total}"))
    write_metrics(model, result)
    st.success(f"KID {result['kid_mean']:.4f} ± {result['kid_std']:.4f} · FID {result['fid']:.2f} — saved to "
               f"{model.path / 'metrics.json'}")
