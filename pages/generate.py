"""Generate: the landing page (see app.py)."""

import streamlit as st

from birdgen import ui
from birdgen.pipeline import generate
from birdgen.images import grid_image
from birdgen.visualize import png_bytes

ui.through_app_navigation()
st.title("🐦 birdgen — generate birds")
st.markdown("A diffusion model turns pure noise into a 64×64 bird, one denoising step at a time. "
            "Pick a model and a sampler, press **Generate**, and watch it work. The other pages show the "
            "noising process, compare models, list KID/FID and train your own.")

controls, output = st.columns([1, 2])
with controls:
    model = ui.model_picker(prefer="small-attn")
    sampling = ui.sampler_controls("gen", model=model)
    request = ui.with_guidance(model, sampling, ui.guidance_controls(model, "gen"))
    pressed = st.button("Generate", type="primary", key="generate")
    cancelled = st.session_state.get("cancel", False)

with output:
    if pressed:
        ui.enforce_request_limits(model, request)
        cancel_slot = st.empty()
        cancel_slot.button("Cancel", key="cancel")
        with ui.queued_turn():
            bar, on_step = ui.progress_callback()
            result = generate(model, request, on_step=on_step)
        bar.empty()
        cancel_slot.empty()
        st.session_state["generated"] = (model.name, grid_image(result.images), result.seconds,
                                         ui.generation_caption(model, request, result), request.num_images,
                                         request.seed)
    elif cancelled:
        st.info("Generation cancelled.")
    if "generated" in st.session_state:
        name, image, seconds, caption, count, seed = st.session_state["generated"]
        st.image(image, caption=caption, width=560)
        st.caption(f"{count} images in {seconds:.1f} s · {ui.describe(model)}")
        st.download_button("Download PNG", png_bytes(image), file_name=f"birds-{name}-seed{seed}.png",
                           mime="image/png")
    else:
        st.caption(ui.describe(model))
