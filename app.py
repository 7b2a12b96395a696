"""Dashboard entry point: `make run` (streamlit bound to 127.0.0.1, usage statistics off).

Each page renders the shared sidebar itself (``pages._dashboard.page_setup``), so a page also works when run on
its own (as Streamlit's AppTest reruns pages).
"""

import streamlit as st

st.set_page_config(page_title="Layerwise sparsity for LLM pruning", page_icon="✂️", layout="wide")
PAGES = [
    st.Page("pages/model.py", title="Model", icon="🧠", default=True),
    st.Page("pages/outliers.py", title="Outliers", icon="📊"),
    st.Page("pages/allocation.py", title="Allocation", icon="🎚️"),
    st.Page("pages/prune.py", title="Prune", icon="✂️"),
    st.Page("pages/compare.py", title="Compare", icon="📈"),
    st.Page("pages/learn.py", title="Learn", icon="🎓"),
]
st.navigation(PAGES).run()
