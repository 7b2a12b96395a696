"""Slider → redrawn chart latency of the Allocation page in a real browser (Debian Chromium + Playwright).

Starts the dashboard on the bundled SmolLM2 (its statistics for --preset must be cached), opens Allocation, and
for each of --moves key presses on the λ slider measures:

* **in the page** (what a user sees): from the key-down event (a capturing listener's ``performance.now()``) to the
  first animation frame at which the OWL curve in the chart shows the new allocation (a requestAnimationFrame loop
  in the page), both on the browser's clock;
* **from the driver** (the first versions of this bench): Python wall time from Playwright's key press until its
  ``wait_for_function`` sees the new curve — this adds the driver's round trips (sending the key over the DevTools
  protocol, polling), which no user waits for;
* until the page's re-run ended (Streamlit's running indicator gone).

The curve is read from the polyline pages/_curves.js drew for OWL. Target: p95 ≤ 250 ms with predictions.
Run on an idle machine: `.venv/bin/python -m bench.ui_latency [--moves 30] [--preset cpu]`.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

from bench.common import git_rev, machine
from pruner.store.files import PROJECT_ROOT

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
#: The Allocation page's S slider: its default and step (pages/allocation.py)
PAGE_DEFAULT_S, S_STEP = 0.70, 0.05
#: Streamlit's "running" indicator, present while the page's script re-runs.
RUNNING = '[data-testid="stStatusWidget"]'
#: OWL's per-block sparsities as the page's curves (pages/_curves.js) have drawn them; on pages before that
#: component (commit 7b89dd7 and older), as the page's first Plotly chart holds them (_fullData: the decoded arrays)
OWL_LAST = """() => { const line = document.querySelector('.allocation-curves polyline[data-panel="sparsity"][data-name="OWL"]');
  if (line) return JSON.parse(line.dataset.y);
  const p = document.querySelectorAll('.js-plotly-plot')[0];
  const t = p && p._fullData && p._fullData.find(d => d.name === 'OWL'); return t ? Array.from(t.y) : null; }"""
#: Installed before the page loads: the time of every key-down (capturing, so before any handler runs)
KEY_LISTENER = "document.addEventListener('keydown', () => { window.__keydown = performance.now(); }, true);"
#: Also installed before the page loads: the time and size of every websocket message the page sends and receives
#: (the rerun request out; the session's deltas back), recorded before Streamlit's own handlers run
WS_LOG = """(() => { const Native = window.WebSocket; window.__ws = [];
  class Logged extends Native {
    constructor(...a) { super(...a);
      this.addEventListener('message', e => window.__ws.push(['in', performance.now(), e.data.byteLength ?? e.data.length]));
    }
    send(d) { window.__ws.push(['out', performance.now(), d.byteLength ?? d.length]); return super.send(d); }
  }
  window.WebSocket = Logged; })();"""
#: Started before each key press: records the first animation frame at which OWL's last block differs
WATCH = f"""(before) => {{ window.__redrawn = null; const owl = {OWL_LAST};
  const tick = () => {{ const y = owl(); if (y && y[29] !== before) window.__redrawn = performance.now();
    else requestAnimationFrame(tick); }};
  requestAnimationFrame(tick); }}"""


def _phases(record, debug: bool = False) -> tuple[float, float, float]:
    """(key-down → first message sent, → last message received before the redrawn frame, → that frame) in ms."""
    keydown, redrawn, log = record
    if debug:
        print([(d, round(t - keydown, 1), n) for d, t, n in log])
    sent = min(t for d, t, _ in log if d == "out" and t >= keydown)
    last_in = max(t for d, t, _ in log if d == "in" and sent <= t <= redrawn)
    return sent - keydown, last_in - sent, redrawn - last_in


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moves", type=int, default=30)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--pause-ms", type=int, default=0,
                    help="wait this long after each re-run ends before the next key press (0: at once, the first "
                         "versions' protocol; a person pauses between moves)")
    ap.add_argument("--sparsity", type=float, default=PAGE_DEFAULT_S,
                    help="move the page's S slider here first (its step is 0.05); predictions need the damage table "
                         "around this S in the cache")
    ap.add_argument("--debug", action="store_true", help="print each move's split, and the websocket log of the first three moves")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PRUNER_CALIB_PRESET": args.preset, "HOME": tempfile.mkdtemp()}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
                               "--server.port", str(port), "--server.headless", "true",
                               "--browser.gatherUsageStats", "false"], cwd=PROJECT_ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        from playwright.sync_api import sync_playwright

        os.environ["HOME"] = env["HOME"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.add_init_script(KEY_LISTENER)
            page.add_init_script(WS_LOG)
            page.goto(f"{url}/allocation")
            page.wait_for_function(f"() => ({OWL_LAST})() !== null", timeout=120_000)
            steps = round((args.sparsity - PAGE_DEFAULT_S) / S_STEP)
            page.wait_for_timeout(1000)  # the page settled (a key press during its first render can be lost)
            if steps:
                s_slider = page.locator('[data-testid="stSlider"]').nth(0).locator('input[type="range"]')
                s_slider.focus()
                for _ in range(abs(steps)):
                    page.keyboard.press("ArrowRight" if steps > 0 else "ArrowLeft")
                page.wait_for_function(f"() => Math.abs(document.querySelector('[data-testid=\"stSlider\"] input')"
                                       f".value - {args.sparsity}) < 1e-6", timeout=30_000)
                page.wait_for_function(f"() => !document.querySelector('{RUNNING}')", polling="raf", timeout=60_000)
                page.wait_for_timeout(1000)
            slider = page.locator('[data-testid="stSlider"]').nth(1).locator('input[type="range"]')
            slider.focus()
            times, done_times, in_page, phases = [], [], [], []
            for i in range(args.moves):
                before = page.evaluate(OWL_LAST)
                key = "ArrowRight" if (i // 5) % 2 == 0 else "ArrowLeft"  # λ wanders 0.08 → 0.13 → 0.08 ...
                page.evaluate(WATCH, before[29])
                page.evaluate("() => { window.__ws = []; }")
                t0 = time.perf_counter()
                page.keyboard.press(key)
                page.wait_for_function(f"() => {{ const y = ({OWL_LAST})(); return y && y[29] !== {before[29]}; }}",
                                       polling="raf", timeout=30_000)
                times.append((time.perf_counter() - t0) * 1e3)
                page.wait_for_function("() => window.__redrawn !== null", timeout=30_000)
                in_page.append(page.evaluate("() => window.__redrawn - window.__keydown"))
                phases.append(_phases(page.evaluate("() => [window.__keydown, window.__redrawn, window.__ws]"),
                                      debug=args.debug and i < 3))
                if args.debug:
                    print(f"move {i}: {in_page[-1]:.0f} ms = " + " + ".join(f"{v:.0f}" for v in phases[-1]), flush=True)
                # ... and until the whole page has re-run (predictions, the OWL map): Streamlit's running indicator
                page.wait_for_function(f"() => !document.querySelector('{RUNNING}')", polling="raf", timeout=30_000)
                done_times.append((time.perf_counter() - t0) * 1e3)
                page.wait_for_timeout(args.pause_ms)
            predicted = page.get_by_text("Predicted perplexity").count() > 0 and \
                page.get_by_text("Reference:").count() > 0  # the predictions section, with a table, was drawn
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    t = np.array(times)
    print(f"# Allocation page at S = {args.sparsity:g}: λ key press → OWL curve redrawn in Chromium, {len(t)} moves, "
          f"preset {args.preset}, "
          f"{args.pause_ms} ms pause after each re-run")
    print(f"# machine: {machine()}; commit {git_rev()}")
    k = np.array(in_page)
    print("# in the page: key-down event → first frame showing the new curve (browser clock)")
    print(f"p50 {np.percentile(k, 50):.0f} ms   p95 {np.percentile(k, 95):.0f} ms   max {k.max():.0f} ms   "
          "(target with predictions: p95 ≤ 250 ms)")
    print("# from the driver: Playwright's key press → its wait sees the new curve (earlier versions' number)")
    print(f"p50 {np.percentile(t, 50):.0f} ms   p95 {np.percentile(t, 95):.0f} ms   max {t.max():.0f} ms")
    ph = np.array(phases)
    print("# the in-page time in three parts, p50 / p95 (ms): key-down → rerun request sent (the slider) | request → "
          "the last message received before that frame (the server's rerun up to the chart, and the transfer) | that "
          "message → the frame (the browser's processing and drawing)")
    print("   ".join(f"{name} {np.percentile(ph[:, j], 50):.0f} / {np.percentile(ph[:, j], 95):.0f}"
                     for j, name in enumerate(["slider", "server", "browser"])))
    d = np.array(done_times)
    print(f"# until the page's re-run ended ({'with' if predicted else 'without'} predictions from a damage table)")
    print(f"p50 {np.percentile(d, 50):.0f} ms   p95 {np.percentile(d, 95):.0f} ms   max {d.max():.0f} ms")


if __name__ == "__main__":
    main()
