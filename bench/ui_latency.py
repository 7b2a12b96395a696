"""Slider → redrawn chart latency of the Allocation page in a real browser (Debian Chromium + Playwright).

Starts the dashboard on the bundled SmolLM2 (its statistics for --preset must be cached), opens Allocation, and
for each of --moves key presses on the λ slider measures the wall time from the key press until the OWL curve in
the browser shows the new allocation (polled every animation frame). Target: ~300 ms for a 30-block model.
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
from pruner.store import PROJECT_ROOT

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
#: Streamlit's "running" indicator, present while the page's script re-runs.
RUNNING = '[data-testid="stStatusWidget"]'
OWL_LAST = """() => { const p = document.querySelectorAll('.js-plotly-plot')[0];
  const t = p && p._fullData && p._fullData.find(d => d.name === 'OWL'); return t ? Array.from(t.y) : null; }"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moves", type=int, default=30)
    ap.add_argument("--preset", default="cpu")
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
            page.goto(f"{url}/allocation")
            page.wait_for_function(f"() => ({OWL_LAST})() !== null", timeout=120_000)
            slider = page.locator('[data-testid="stSlider"]').nth(1).locator('input[type="range"]')
            slider.focus()
            times, done_times = [], []
            for i in range(args.moves):
                before = page.evaluate(OWL_LAST)
                key = "ArrowRight" if (i // 5) % 2 == 0 else "ArrowLeft"  # λ wanders 0.08 → 0.13 → 0.08 ...
                t0 = time.perf_counter()
                page.keyboard.press(key)
                page.wait_for_function(f"() => {{ const y = ({OWL_LAST})(); return y && y[29] !== {before[29]}; }}",
                                       polling="raf", timeout=30_000)
                times.append((time.perf_counter() - t0) * 1e3)
                # ... and until the whole page has re-run (predictions, the OWL map): Streamlit's running indicator
                page.wait_for_function(f"() => !document.querySelector('{RUNNING}')", polling="raf", timeout=30_000)
                done_times.append((time.perf_counter() - t0) * 1e3)
            predicted = page.get_by_text("Predicted perplexity").count() > 0 and \
                page.get_by_text("Reference:").count() > 0  # the predictions section, with a table, was drawn
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)
    t = np.array(times)
    print(f"# Allocation page: λ key press → OWL curve redrawn in Chromium, {len(t)} moves, preset {args.preset}")
    print(f"# machine: {machine()}; commit {git_rev()}")
    print(f"p50 {np.percentile(t, 50):.0f} ms   p95 {np.percentile(t, 95):.0f} ms   max {t.max():.0f} ms   (target ~300 ms)")
    d = np.array(done_times)
    print(f"# until the page's re-run ended ({'with' if predicted else 'without'} predictions from a damage table)")
    print(f"p50 {np.percentile(d, 50):.0f} ms   p95 {np.percentile(d, 95):.0f} ms   max {d.max():.0f} ms   "
          "(target with predictions: p95 ≤ 250 ms)")


if __name__ == "__main__":
    main()
