"""Watch noise being added (forward process) and removed (reverse process)."""

import pandas as pd
import streamlit as st

from birdgen import ui
from birdgen.pipeline import GenerationRequest, generate
from birdgen.visualize import evenly_spaced, forward_frames, png_bytes, record_chain, signal_and_noise, to_gif

ui.through_app_navigation()
st.title("🌫️ The denoising process")
st.markdown("Training adds Gaussian noise to real birds step by step (the **forward process**); sampling "
            "learns to undo it (the **reverse process**). Drag the sliders to see both.")

model = ui.model_picker(prefer="small-attn")
schedule = model.schedule
T = schedule.num_steps


st.header("Forward process: q(x_t | x_0)")
source = st.radio("Start from", ["a real bird crop", "a generated bird"], horizontal=True)
x0 = ui.real_crop(model, "forward") if source == "a real bird crop" else None
if x0 is None:
    seed = st.number_input("Seed of the generated bird", 0, 2**31 - 1, 0)
    x0 = generate(model, GenerationRequest(num_images=1, seed=int(seed))).images.cpu()

t = st.slider("Timestep t", 0, T - 1, T // 4, help=f"0 = barely noisy, {T - 1} = pure noise")
curves = signal_and_noise(schedule)
left, right = st.columns([1, 2])
left.image(forward_frames(schedule, x0, [t])[0], caption=f"x_t at t = {t}", width=256)
left.caption(f"signal √ᾱ = {curves['signal'][t]:.3f} · noise √(1−ᾱ) = {curves['noise'][t]:.3f} · "
             f"SNR = {10 ** curves['log10_snr'][t]:.3g}")
right.line_chart(pd.DataFrame({"signal √ᾱ_t": curves["signal"], "noise √(1−ᾱ_t)": curves["noise"]}),
                 x_label="timestep t", height=260)

st.header("Reverse process: from noise to a bird")
sampling = ui.sampler_controls("chain", max_images=4, default_images=1, model=model)
request = ui.with_guidance(model, sampling, ui.guidance_controls(model, "chain"))
if st.button("Run the sampler", type="primary", key="run_chain"):
    ui.enforce_request_limits(model, request)
    with ui.queued_turn():
        bar, on_step = ui.progress_callback()
        st.session_state["chain"] = record_chain(model, request, on_step)
    bar.empty()

chain = st.session_state.get("chain")
if chain is not None:
    show_prediction = st.toggle("Show the predicted x₀ beside x_t", value=True)
    step = st.slider("Step", 1, len(chain), len(chain), key="chain_step") - 1
    st.image(chain.frame(step, show_prediction), width=560,
             caption=f"after step {step + 1} of {len(chain)} (t = {chain.timesteps[step]})"
             + (" · left: x_t, right: predicted x₀" if show_prediction else ""))
    picks = evenly_spaced(len(chain), 60)
    gif = to_gif([chain.frame(i, show_prediction) for i in picks])
    columns = st.columns(3)
    if columns[0].button("▶ Play", key="play"):
        st.image(gif, caption="the whole run as an animation", width=560)
    columns[1].download_button("Download GIF", gif, file_name="denoising.gif", mime="image/gif")
    strip = chain.strip(every=100 if len(chain) == 1000 else None)
    st.subheader("The chain at a glance")
    st.caption("Pure noise, then the sample at every 100th step when the sampler runs all 1000 DDPM steps "
               "(as in the original report's figure); fewer steps show about ten evenly spaced ones.")
    st.image(strip)
    columns[2].download_button("Download chain PNG", png_bytes(strip), file_name="chain.png", mime="image/png")
