"""Two models, the same seed and the same starting noise, side by side."""

import dataclasses

import streamlit as st

from birdgen import ui
from birdgen.pipeline import for_model, generate, planned_evaluations
from birdgen.samplers import initial_noise
from birdgen.images import grid_image

ui.through_app_navigation()
st.title("⚖️ Compare models")
st.markdown("Does self-attention help? Does autoguidance? Both sides start from **exactly the same noise** and run "
            "the same sampler, so with equal training any difference in the birds comes from the networks. Pick the "
            "same model on both sides and switch its autoguidance off on one to see what the guide does.")

pickers = st.columns(2)
with pickers[0]:
    left = ui.model_picker("Left model", key="left", prefer="small-attn")
    st.caption(ui.stored_metrics_text(left))
    left_guide = ui.guide_weight_control(left, "cmp_left")
with pickers[1]:
    right = ui.model_picker("Right model", key="right", prefer="small")
    st.caption(ui.stored_metrics_text(right))
    right_guide = ui.guide_weight_control(right, "cmp_right")
species_model = left if left.conditional else right
choice = ui.guidance_controls(species_model, "cmp") if species_model.conditional else ui.GuidanceChoice()
species = choice.class_id
request = ui.sampler_controls("cmp", max_images=16, default_images=8)
requests = [ui.with_guidance(model, for_model(model, request), dataclasses.replace(choice, guide_weight=weight))
            for model, weight in ((left, left_guide), (right, right_guide))]
students = [f"{m.name} ({m.sampling.steps} {m.sampling.sampler} steps)" for m in (left, right) if m.sampling]
if students:
    st.info(f"{' and '.join(students)} {'is a distilled student' if len(students) == 1 else 'are distilled students'}"
            " and always samples with its own sampler; the settings above apply to the other model.")
if species is not None:
    ignoring = [m.name for m, r in zip((left, right), requests) if not r.species]
    if ignoring:
        st.info(f"{' and '.join(ignoring)} cannot take this species (not a species model, or one that does not "
                "know it), so it samples without one from the same noise.")
if left.network_config.image_size != right.network_config.image_size:
    st.error("These models make images of different sizes, so they cannot share the same noise.")
    st.stop()
if warning := ui.unequal_training(left, right):
    st.warning(warning)
guided = [m.name for m, r in zip((left, right), requests) if m.guide is not None and r.guide_weight != 1]
if len(guided) == 1:
    st.info(f"Only {guided[0]} is autoguided, so part of any difference comes from its guide; switch it off above "
            "to compare the networks alone.")

if st.button("Generate both", type="primary", key="compare"):
    ui.enforce_limits(request.num_images, sum(planned_evaluations(m, r) for m, r in zip((left, right), requests)))
    noise, _ = initial_noise(request.num_images, left.network_config.image_size, request.seed, "cpu",
                             left.network_config.in_channels)
    results = []
    with ui.queued_turn():
        for model, model_request in zip((left, right), requests):
            bar, on_step = ui.progress_callback(f"Denoising with {model.name}")
            results.append((model.name, generate(model, model_request, noise=noise, on_step=on_step)))
            bar.empty()
    st.session_state["comparison"] = [
        (name, grid_image(r.images), r.seconds, ui.generation_caption(model, model_request, r))
        for (name, r), model, model_request in zip(results, (left, right), requests)]

if "comparison" in st.session_state:
    for column, model, (name, image, seconds, caption) in zip(st.columns(2), (left, right),
                                                              st.session_state["comparison"]):
        column.subheader(name)
        column.image(image, width=420, caption=caption)
        column.caption(f"{seconds:.1f} s · {ui.describe(model)}")
