"""Explore and edit: morph between seeds, make variations of a bird or a picture, repaint part of one."""

import streamlit as st

from birdgen import ui
from birdgen.editing import (MASKS, EditError, EditRequest, hole_preview, inpaint_steps, interpolation_steps,
                             make_mask, repaint_evaluations, sdedit_steps)
from birdgen.species import species_index
from birdgen.images import grid_image
from birdgen.visualize import enlarged, interpolation_gif, png_bytes

ui.through_app_navigation()
st.title("🎨 Explore and edit")
st.markdown("Everything here runs the same model and samplers as **Generate**: **interpolate** between two seeds, "
            "make **variations** of a bird or turn a picture into one (SDEdit), or **inpaint**: keep part of a "
            "picture and let the model repaint the rest (RePaint).")
model = ui.model_picker(prefer="small-attn", key="explore_model")
interpolate, vary, inpaint = st.tabs(["Interpolate", "Variations and image-to-image", "Inpaint"])

with interpolate:
    columns = st.columns(4)
    seed_a = columns[0].number_input("From seed", 0, 2**31 - 1, 3, key="lerp_a")
    seed_b = columns[1].number_input("To seed", 0, 2**31 - 1, 7, key="lerp_b")
    frames = columns[2].slider("Frames", 3, 16, 9, key="lerp_frames")
    steps = ui.ddim_steps(model, columns[3], "lerp_steps")
    species, guidance = None, None
    if model.conditional:
        st.caption("A species model can also move from one species to another (with the same seed twice, only the "
                   "species changes).")
        columns = st.columns(3)
        pair = (ui.species_picker(model, f"From {model.class_word}", "lerp_from", columns[0]),
                ui.species_picker(model, f"To {model.class_word}", "lerp_to", columns[1]))
        guidance = ui.guidance_slider(model, "lerp_guidance", None in pair, columns[2])
        species = None if None in pair else tuple(species_index(model, c) for c in pair)
    lerp_guide = ui.guide_weight_control(model, "lerp")
    if st.button("Interpolate", type="primary", key="lerp_run"):
        ui.enforce_edit_limits(frames, steps, species is not None, lerp_guide)
        last = ui.run_queued(interpolation_steps(model, int(seed_a), int(seed_b), frames, steps, species, guidance,
                                                 lerp_guide), "Interpolating", cancel_key="lerp_cancel")
        st.session_state["lerp"] = last.x.cpu()
    if "lerp" in st.session_state:
        images = st.session_state["lerp"]
        strip = grid_image(images, columns=len(images))
        st.image(strip, width=min(1100, 80 * len(images)))
        index = st.slider("Frame", 1, len(images), 1, key="lerp_frame") - 1
        st.image(enlarged(images[index:index + 1])[0], caption=f"frame {index + 1} of {len(images)}", width=256)
        downloads = st.columns(2)
        downloads[0].download_button("Download GIF", interpolation_gif(images),
                                     file_name="interpolation.gif", mime="image/gif")
        downloads[1].download_button("Download strip PNG", png_bytes(strip), file_name="interpolation.png",
                                     mime="image/png")

with vary:
    picture = ui.picture_source(model, "vary")
    columns = st.columns(4)
    strength = columns[0].slider("Strength", 0.0, 1.0, 0.6, 0.05, key="vary_strength",
                                 help="0 returns the picture unchanged; 1 ignores it and draws a new bird")
    steps = ui.ddim_steps(model, columns[1], "vary_steps", help="of the whole schedule; strength × steps of them run")
    count = columns[2].number_input("Images", 1, 16, 8, key="vary_count")
    seed = columns[3].number_input("Seed", 0, 2**31 - 1, 0, key="vary_seed")
    choice = ui.guidance_controls(model, "vary")
    if picture is not None:
        st.image(grid_image(picture, padding=0).resize((128, 128)), caption="the input", width=128)
        if st.button("Make variations", type="primary", key="vary_run"):
            request = EditRequest("ddim", steps, float(strength), int(count), int(seed), 0.0,
                                  species_index(model, choice.class_id), choice.species_weight, choice.guide_weight)
            ui.enforce_edit_limits(int(count), request.steps_run, choice.class_id is not None, choice.guide_weight)
            last = ui.run_queued(sdedit_steps(model, picture, request), "Editing", cancel_key="vary_cancel")
            st.session_state["varied"] = (grid_image(last.x.cpu()), strength)
    if "varied" in st.session_state:
        grid, shown_strength = st.session_state["varied"]
        st.image(grid, caption=f"strength {shown_strength:.2f}", width=480)
        st.download_button("Download PNG", png_bytes(grid), file_name="variations.png", mime="image/png")

with inpaint:
    if model.sampling is not None:
        st.info(f"{model.name} is a distilled student: RePaint needs the many ancestral steps it was not distilled "
                "for. Pick its teacher to inpaint.")
        st.stop()
    picture = ui.picture_source(model, "fill")
    size = model.network_config.image_size
    columns = st.columns(4)
    kind = columns[0].selectbox("Region to repaint", [*MASKS, "box"], key="fill_mask",
                                format_func=lambda k: "a box (sliders below)" if k == "box" else f"the {k}")
    steps = columns[1].slider("DDPM steps", 10, 100, 25, key="fill_steps")
    resample = columns[2].slider("Resampling", 1, 10, 3, key="fill_resample",
                                 help="RePaint's jumps back per step: more makes the new part fit better, and costs "
                                      "that many times the steps")
    count = columns[3].number_input("Images", 1, 8, 4, key="fill_count")
    fill_guide = ui.guide_weight_control(model, "fill")
    box = None
    if kind == "box":
        columns = st.columns(2)
        left, right = columns[0].slider("Left to right", 0.0, 1.0, (0.25, 0.75), 0.05, key="fill_x")
        top, bottom = columns[1].slider("Top to bottom", 0.0, 1.0, (0.25, 0.75), 0.05, key="fill_y")
        box = (left, top, right, bottom)
    try:
        mask = make_mask(kind, size, box)
    except EditError as error:
        st.error(str(error))
        mask = None
    if picture is not None and mask is not None:
        st.image(grid_image(hole_preview(picture, mask), padding=0).resize((128, 128)),
                 caption="kept pixels; magenta is repainted", width=128)
        if st.button("Inpaint", type="primary", key="fill_run"):
            ui.enforce_edit_limits(int(count), repaint_evaluations(steps, resample), False, fill_guide)
            last = ui.run_queued(inpaint_steps(model, picture, mask, steps, resample, int(count), 0, fill_guide),
                                 "Inpainting", cancel_key="fill_cancel")
            st.session_state["filled"] = grid_image(last.x.cpu())
    if "filled" in st.session_state:
        st.image(st.session_state["filled"], width=480)
        st.download_button("Download PNG", png_bytes(st.session_state["filled"]), file_name="inpainted.png",
                           mime="image/png")
