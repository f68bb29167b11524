"""birdgen's Streamlit app: `streamlit run app.py`. Each page is a short script in pages/."""

import streamlit as st

from birdgen.public import public_limits

st.set_page_config(page_title="birdgen", page_icon="🐦", layout="wide")
st.navigation([
    st.Page("pages/generate.py", title="Generate", icon="🐦", default=True),
    st.Page("pages/denoising.py", title="Denoising process", icon="🌫️", url_path="denoising"),
    st.Page("pages/compare.py", title="Compare models", icon="⚖️", url_path="compare"),
    st.Page("pages/explore.py", title="Explore and edit", icon="🎨", url_path="explore"),
    st.Page("pages/metrics.py", title="Metrics", icon="📊", url_path="metrics"),
    # In public mode the Train page leaves the menu; its address still says that training is off.
    st.Page("pages/train.py", title="Train", icon="🏋️", url_path="train",
            visibility="hidden" if public_limits() else "visible"),
]).run()
