"""Streamlit glue shared by app.py and the pages: the sidebar selection, read-only cached resources, jobs, and
controls generated from the registries' parameter declarations. Not a page (app.py lists the pages).

No computation lives here; it builds specs and requests from widgets and hands them to the library, which never
imports streamlit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import streamlit as st

from pruner.core.params import Param
from pruner.engine import artifacts
from pruner.jobs.queue import ACTIVE_STATES, JobStore, default_db, ensure_workers, submit
from pruner.model.catalogue import DEFAULT_MODEL, DEVICES, ModelSpec, available_bundled
from pruner.model.loading import load_model
from pruner.specs import CALIB_PRESETS, DEFAULT_CALIB_PRESET, CalibSpec, StatsSpec
from pruner.store.files import default_data_dir
from pruner.store.formats import CorruptArtifact
from pruner.store.layout import CacheLayout

SOURCES = ("bundled", "local folder", "hub id")


def _use_navigation_only() -> bool:
    """app.py declares every page with st.navigation. Streamlit 1.67 also keeps a legacy mode for apps that have
    a pages/ folder, in force for the whole server process until some run calls st.navigation: a server whose
    first request is a deep link (e.g. /prune) runs that page without app.py, under a sidebar of bare file names
    (with this module and _curves as pages). The pages import this module, so the legacy mode is switched off
    here; returns whether the run importing it is such a legacy run (``page_setup`` then runs it again, through
    app.py)."""
    try:
        from streamlit.runtime.pages_manager import PagesManager

        legacy = bool(PagesManager.uses_pages_directory)
        PagesManager.uses_pages_directory = False
        return legacy
    except (ImportError, AttributeError):  # another Streamlit version: nothing to switch off
        return False


#: Whether this module was first imported by a page that Streamlit's legacy mode ran without app.py.
_LEGACY_FIRST_RUN = _use_navigation_only()


@dataclass(frozen=True)
class Selection:
    """What the sidebar selected, as specs plus the folders the library needs."""

    stats_spec: StatsSpec
    cache_dir: Path | None
    data_dir: str

    @property
    def model(self) -> ModelSpec:
        return self.stats_spec.model

    @property
    def calib(self) -> CalibSpec:
        return self.stats_spec.calib


def cache_dir() -> Path | None:
    value = os.environ.get("PRUNER_CACHE_DIR")
    return Path(value) if value else None


def data_dir() -> str:
    return os.environ.get("PRUNER_DATA_DIR") or str(default_data_dir())


#: Keys of the sidebar's widgets; re-assigned on every page so their values survive page switches.
SIDEBAR_KEYS = ("model_source", "bundled_name", "local_path", "hub_id", "trust_remote_code", "calib_preset", "device")


def page_setup() -> Selection | None:
    """Render the shared sidebar on the current page and return its selection (None: nothing usable selected).

    Streamlit drops a widget's state when a run does not draw it; re-assigning the keys first keeps the values
    when the user moves between pages. The first run of a server that began in Streamlit's legacy page mode
    (``_use_navigation_only``) is run again at once, through app.py's navigation.
    """
    global _LEGACY_FIRST_RUN
    if _LEGACY_FIRST_RUN:
        _LEGACY_FIRST_RUN = False
        st.rerun()
    for key in SIDEBAR_KEYS:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]
    return sidebar()


def default_preset() -> str:
    """$PRUNER_CALIB_PRESET (e.g. 'tiny' for a quick classroom demo), else the library's default."""
    value = os.environ.get("PRUNER_CALIB_PRESET", DEFAULT_CALIB_PRESET)
    if value not in CALIB_PRESETS:
        raise ValueError(f"PRUNER_CALIB_PRESET must be one of {', '.join(CALIB_PRESETS)}; got {value!r}")
    return value


def sidebar() -> Selection | None:
    """The model / calibration / device picker shared by every page."""
    with st.sidebar:
        st.header("Model")
        source = st.radio("Source", SOURCES, horizontal=True, key="model_source")
        if source == "bundled":
            bundled = available_bundled()
            # defaults go into the session state, not index=: a widget given both warns on every run
            if bundled and st.session_state.get("bundled_name") not in bundled:
                st.session_state["bundled_name"] = DEFAULT_MODEL if DEFAULT_MODEL in bundled else bundled[0]
            name = st.selectbox("Bundled model", bundled, key="bundled_name")
        elif source == "local folder":
            name = st.text_input("Folder with config.json and weights", key="local_path").strip()
        else:
            name = st.text_input("Hub id (owner/name; needs internet)", key="hub_id").strip()
        trust = source == "hub id" and st.checkbox("Trust remote code", key="trust_remote_code",
                                                   help="Runs the repository's own Python code. Off by default.")
        st.session_state.setdefault("calib_preset", default_preset())
        preset = st.selectbox("Calibration", list(CALIB_PRESETS), key="calib_preset",
                              format_func=lambda k: f"{k}: {CALIB_PRESETS[k][0]} × {CALIB_PRESETS[k][1]} C4 tokens")
        device = st.selectbox("Device", DEVICES, key="device", help="auto = CUDA when present, else CPU")
    if not name:
        st.info("Enter a model in the sidebar.")
        return None
    try:
        model = ModelSpec(name=name, device=device, trust_remote_code=trust)
        spec = StatsSpec(model=model, calib=CalibSpec.preset(preset, data_dir=data_dir()))
        spec.key()  # resolves the model's identity: unknown names fail here
    except ValueError as err:
        st.error(str(err))
        return None
    return Selection(spec, cache_dir(), data_dir())


@st.cache_resource(show_spinner="Loading the dense model (read-only)…")
def dense_model(model: ModelSpec, cache: Path | None):
    """The dense model, loaded once per process. Never modified: pruning always works on a copy."""
    return load_model(model, cache)


def cached_stats(sel: Selection):
    """The selection's statistics if they were computed, else None (never computes). Cached statistics that are not
    what they claim (truncated, altered, another model's) are never used: the page names them, offers to remove
    them (then the Model page computes them again) and stops."""
    try:
        return _stats(sel.stats_spec.key(), sel.stats_spec, sel.cache_dir)
    except LookupError:
        return None
    except CorruptArtifact as err:
        st.error(str(err))
        if st.button("Remove them, to compute them again", key="remove_corrupt_stats"):
            CacheLayout.at(sel.cache_dir).remove([err.folder])
            st.rerun()
        st.stop()


@st.cache_resource(show_spinner=False, max_entries=8)
def _stats(key: str, spec: StatsSpec, cache: Path | None):
    """Loaded once per process and shared read-only (a miss raises, so it is not remembered)."""
    stats = artifacts.load_cached_stats(spec, cache)
    if stats is None:
        raise LookupError(key)
    return stats


def page_with_stats(sel: Selection | None):
    """(selection, statistics) for pages that need both; otherwise says what is missing and stops the page."""
    if sel is None:
        st.stop()
    stats = cached_stats(sel)
    if stats is None:
        st.warning("No outlier statistics for this model and calibration set yet: compute them on the Model page.")
        st.page_link("pages/model.py", label="Go to the Model page", icon="🧠")
        st.stop()
    return sel, stats


def job_store(sel: Selection | None = None) -> JobStore:
    return JobStore(default_db(sel.cache_dir if sel else cache_dir()))


def queue(sel: Selection | None, request) -> int:
    """Submit a typed request (``pruner.jobs.workflows``) as a background job; returns its id."""
    return submit(job_store(sel), request, cache_dir=sel.cache_dir if sel else cache_dir())


def param_controls(params: list[Param], prefix: str, columns=None, values: dict | None = None, sliders: bool = False,
                   valid: Callable[[str, float, dict], bool] | None = None,
                   valid_key: Callable[[str, dict], object] | None = None) -> dict:
    """One control per declared parameter (``pruner.core.params.Param``), labelled by its paper symbol: a slider over
    the declaration's ``slider`` range when ``sliders`` and it has one, else a number input bounded by its closed
    range ends (open ends are checked when the request is built, naming the range). Returns {name: value};
    ``values`` prefill them (e.g. from the Allocation page).

    ``valid(name, value, current)``: whether the parameter may take ``value`` with the others at ``current``
    (e.g. OWL's λ at this S on this model); a slider's ends are then moved in to the outermost valid steps
    (``valid_slider_range``), and a value left outside is moved to the nearest valid end, with a caption saying so.
    ``valid_key(name, current)``: everything that validity depends on (S, the model, the other parameters it is
    checked with); a range found for a key is kept in the session (a λ move then finds only M's range again: 6
    allocator calls per rerun instead of 42 on the Allocation page)."""
    out = {}
    columns = columns or [st]
    current = {p.name: st.session_state.get(f"{prefix}_{p.name}", (values or {}).get(p.name, p.default))
               for p in params}
    for i, p in enumerate(params):
        value = (values or {}).get(p.name, p.default)
        key = f"{prefix}_{p.name}"
        kw = dict(step=p.step or (1 if p.kind is int else 0.01), key=key,
                  help=f"{p.help}; {p.range_text()}, default {p.default:g}")
        column = columns[i % len(columns)]
        if sliders and p.slider is not None:
            low, high = (p.kind(v) for v in p.slider)
            if valid is not None:
                found = st.session_state.setdefault("slider_ranges", {})
                range_key = (prefix, valid_key(p.name, current)) if valid_key is not None else None
                if range_key is None or range_key not in found:
                    if len(found) > SLIDER_RANGES_KEPT:
                        found.clear()
                    range_ = valid_slider_range(p, lambda v, p=p: valid(p.name, v, current))
                    if range_key is None:
                        low, high = range_
                    else:
                        found[range_key] = range_
                if range_key is not None:
                    low, high = found[range_key]
            if key in st.session_state:  # the widget's own value, kept within the (possibly narrowed) range
                held = st.session_state[key]
                # written back even when unchanged: a slider whose ends moved is a new widget to Streamlit, which
                # would otherwise start it at its low end (λ read 0 after S went 90% → 70%)
                st.session_state[key] = min(max(held, low), high)
                if st.session_state[key] != held:
                    column.caption(f"{p.title} moved from {held:g} to {st.session_state[key]:g}: the valid end "
                                   "for the current settings")
                out[p.name] = column.slider(p.title, low, high, **kw)
            else:
                out[p.name] = column.slider(p.title, low, high, min(max(p.kind(value), low), high), **kw)
            current[p.name] = out[p.name]
            continue
        if p.low is not None and not p.low_open:
            kw["min_value"] = p.kind(p.low)
        if p.high is not None and not p.high_open:
            kw["max_value"] = p.kind(p.high)
        if p.kind is float:
            kw["format"] = "%g"
        out[p.name] = column.number_input(p.title, value=p.kind(value), **kw)
    return out


#: How many slider ranges a session keeps (``param_controls``) before it forgets them all.
SLIDER_RANGES_KEPT = 512


def valid_slider_range(p: Param, valid: Callable[[float], bool]) -> tuple:
    """The slider range of ``p`` with each end moved in to the outermost step where ``valid`` holds: the steps are
    low + k · step over the declared ``slider`` range; validity is taken to hold on one interval around the default
    (OWL's λ is valid from 0 up to a bound that depends on S and the model), found by bisection from the default
    towards each end. Where the default itself is invalid (OWL's λ = 0.08 at S = 90% with OWL-inverse shown), the
    interval is the one around the valid step nearest to it; with no valid step at all, the declared range (the page
    names the problem)."""
    low, high = p.slider
    step = p.step or (1 if p.kind is int else 0.01)
    n = int(round((high - low) / step))
    at = [p.kind(round(low + k * step, 10)) for k in range(n + 1)]
    nearest = min(range(n + 1), key=lambda k: abs(at[k] - p.default))
    # the steps by distance from the default, nearer first (one call each until a valid one: usually the first)
    d = next((k for k in sorted(range(n + 1), key=lambda k: (abs(k - nearest), k)) if valid(at[k])), None)
    if d is None:
        return at[0], at[-1]

    def outermost(inside: int, outside: int) -> int:
        if valid(at[outside]):
            return outside
        while abs(outside - inside) > 1:  # at[inside] valid, at[outside] not
            mid = (inside + outside) // 2
            inside, outside = (mid, outside) if valid(at[mid]) else (inside, mid)
        return inside

    return at[outermost(d, 0)], at[outermost(d, n)]


def unique_params(entries) -> list[Param]:
    """The declared parameters of several registry entries, each once, in first-seen order."""
    seen: dict[str, Param] = {}
    for e in entries:
        for p in e.params:
            seen.setdefault(p.name, p)
    return list(seen.values())


def keep_workers(store: JobStore, sel: Selection | None) -> None:
    """Mark jobs of dead workers failed and start a worker for queued jobs (e.g. after an app restart)."""
    ensure_workers(store, cache_dir=sel.cache_dir if sel else cache_dir())


def job_row(job) -> None:
    """One job as the pages list it: state, per-block progress, elapsed, ETA, cancel, error."""
    cols = st.columns([5, 3, 1.3, 1.7])  # the last one holds "Cancel" whole at 1280 px (at 1 of 11 it read "C…")
    where = (f" · Ray {job.remote['node']} (pid {job.remote['pid']}" +
             (f", attempt {job.remote['attempt']})" if job.remote.get("attempt", 1) > 1 else ")")
             if job.remote else (" · Ray" if job.executor == "ray" else ""))
    cols[0].markdown(f"**#{job.id}** {job.label}{where}")
    if job.state == "running":
        eta = f", ETA {job.eta:.0f} s" if job.eta is not None else ""
        doing = job.phase or ("waiting for a worker" if job.state == "queued" else "starting the worker")
        counts = f" {job.done}/{job.total}" if job.total > 1 else ""
        cols[1].progress(job.fraction, text=f"{doing}{counts}{eta}")
    else:
        icon = {"done": "✅", "failed": "❌", "cancelled": "⏹️", "queued": "⏳"}[job.state]
        cols[1].write(f"{icon} {job.state}")
    if job.elapsed is not None:
        cols[2].write(f"{job.elapsed:.0f} s")
    if job.state in ACTIVE_STATES and not job.cancel_requested:
        if cols[3].button("Cancel", key=f"cancel-{job.id}"):
            job_store().cancel(job.id)
            st.rerun()
    if job.state == "failed" and job.error:
        st.error(f"Job #{job.id} failed: {job.error.splitlines()[0]}")


# How often the job list refreshes itself. Every refresh ends with Streamlit's sweep of media files no element
# references, and a zip made by a "Download zip" click is such a file: the second sweep after it is made deletes
# it, and a browser that has not started fetching it by then gets a cancelled download. So the list refreshes
# quickly only while there is progress to show, and slowly otherwise (still picking up jobs queued from the CLI or
# another tab).
JOBS_REFRESH_ACTIVE_S = 2.0
JOBS_REFRESH_IDLE_S = 15.0


#: Jobs the pages list (the running ones always, then the newest).
JOBS_SHOWN = 50


def jobs_panel(sel: Selection | None, state_key: str) -> None:
    """The job list: refreshed every 2 s while a job is queued or running, every 15 s otherwise; the whole page
    reruns when a job finishes (to show its results) and when the list turns active or idle."""
    st.subheader("Jobs")
    if any(j.state in ACTIVE_STATES for j in job_store(sel).list(JOBS_SHOWN)):
        _jobs_live(sel, state_key)
    else:
        _jobs_idle(sel, state_key)


@st.fragment(run_every=JOBS_REFRESH_ACTIVE_S)
def _jobs_live(sel: Selection | None, state_key: str) -> None:
    if not _job_list(sel, state_key):
        st.rerun(scope="app")  # the last job ended: switch to the slow refresh


@st.fragment(run_every=JOBS_REFRESH_IDLE_S)
def _jobs_idle(sel: Selection | None, state_key: str) -> None:
    if _job_list(sel, state_key):
        st.rerun(scope="app")  # a job was queued elsewhere: switch to the fast refresh


def _job_list(sel: Selection | None, state_key: str) -> bool:
    """Draw the jobs (starting a worker if queued jobs have none); rerun the page when one more has finished.
    Returns whether any job is still queued or running."""
    store = job_store(sel)
    keep_workers(store, sel)
    jobs = store.list(JOBS_SHOWN)
    if not jobs:
        st.caption("No jobs yet.")
    else:  # a sweep queues dozens: the totals, and how much of the list is shown
        counts = store.counts()
        shown = "" if sum(counts.values()) <= len(jobs) else f" (the {len(jobs)} shown: running, then newest)"
        st.caption(" · ".join(f"{n} {state}" for state, n in counts.items()) + shown)
    for job in jobs:
        job_row(job)
    finished = sum(j.state == "done" for j in jobs)
    if st.session_state.setdefault(state_key, finished) != finished:
        st.session_state[state_key] = finished
        st.rerun(scope="app")
    return any(j.state in ACTIVE_STATES for j in jobs)


@st.cache_data(ttl=60, show_spinner=False)
def deepsparse_available() -> dict:
    """Whether DeepSparse can run here and why not (probed at most once a minute)."""
    from pruner.evaluate.deepsparse_env import deepsparse_status

    return deepsparse_status()


def zeroshot_set_label(name: str) -> str:
    """'zeroshot:local:limit100' → 'local files, first 100 documents per task'."""
    parts = name.split(":")
    source = "local files" if parts[1] == "local" else "hub datasets"
    return f"{source}, " + (f"first {parts[2][len('limit'):]} documents per task (partial)" if len(parts) > 2
                            else "full sets")


def openvino_amx_status() -> dict:
    """Whether this CPU has AMX, which OpenVINO's sparse weight decompression needs (``available``, ``reason``)."""
    from pruner.evaluate.openvino_speed import amx_status

    return amx_status()


def speed_setting_label(setting: str) -> str:
    """'b1:t128:threads2' (a speed metric's name after its engine) → 'B=1, T=128, 2 threads'."""
    b, t, threads = setting.split(":")
    return f"B={b[1:]}, T={t[1:]}, {threads[len('threads'):]} threads"


def speed_settings(runs) -> tuple[str | None, list[str]]:
    """Let the user pick one timing setting (B, T, threads); (the setting, its metric names in every engine, e.g.
    'speed:deepsparse:b1:t128:threads2' and 'speed:openvino:b1:t128:threads2'), so one chart shows both engines."""
    names = sorted({k for r in runs for k in r.metric_names("speed:")})
    if not names:
        return None, []
    settings = sorted({name.split(":", 2)[2] for name in names})
    setting = st.selectbox("Setting", settings, format_func=speed_setting_label, key="cmp_speed_set")
    return setting, [name for name in names if name.split(":", 2)[2] == setting]


#: An OpenVINO row's check where the CPU has no AMX (the page says why in full above the table).
NOT_TIMED_NO_AMX = "not timed: no AMX"


def speed_table_row(run, name: str) -> dict:
    """One run's (a ``RunManifest``) timings in milliseconds (median), speed-ups, and the output checks, for the
    Compare table; an OpenVINO row says how many layers ran packed, or why nothing was timed."""
    r = run.metrics[name]

    def ms(graph, model):
        cell = r["graphs"].get(graph, {}).get(model)
        return round(cell["median_ms"], 2) if cell else None

    def ratio(value):
        return round(value, 2) if value is not None else None

    def spread(graph):  # dense and pruned took turns in rounds (results before that have no rounds)
        by_round = (r.get("speedup_by_round") or {}).get(graph)
        return f"{min(by_round):.2f}–{max(by_round):.2f}" if by_round else None

    if r["engine"] == "openvino":
        packed = r.get("packed", {}).get("pruned")
        checks = (NOT_TIMED_NO_AMX if not r.get("amx") else "no: " + "; ".join(r["rejected"]) if r["rejected"] else
                  "8-bit; packed layers (prefill, decode): " + ", ".join(str(packed[g]["sparse"]) for g in packed))
    else:
        checks = ("n/a (dense ONNX Runtime timings only)" if r["engine"] != "deepsparse"
                  else "no: " + "; ".join(r["rejected"]) if r["rejected"] else "yes")
    # the speed-ups and the check first: at 1280 px the millisecond columns are the ones that scroll out of view
    return {"run": run.label, "achieved": f"{run.achieved_overall:.1%}", "engine": r["engine"],
            "decode ×": ratio(r["speedup"].get("decode")), "decode × per round": spread("decode"),
            "prefill ×": ratio(r["speedup"].get("prefill")), "outputs checked": checks,
            "ideal decode × (estimate)": ratio(r.get("ideal_decode_speedup_estimate")),
            "dense decode ms": ms("decode", "dense"), "pruned decode ms": ms("decode", "pruned"),
            "dense prefill ms": ms("prefill", "dense"), "pruned prefill ms": ms("prefill", "pruned")}


def allocator_help() -> str:
    """Every allocator's one-line description, for a chooser's tooltip (the labels alone are jargon)."""
    from pruner.allocation import ALLOCATORS

    return "\n\n".join(f"**{a.label}**: {a.description}" for a in ALLOCATORS.values())
