"""Dashboard entry point: `make run` (or `streamlit run app.py --server.address 127.0.0.1`)."""

import streamlit as st

st.set_page_config(page_title="Layerwise sparsity for LLM pruning", page_icon="✂️", layout="wide")
page = st.navigation([st.Page("pages/outliers.py", title="Outliers", icon="📊", default=True)])
page.run()
