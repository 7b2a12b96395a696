"""The predicted-vs-measured scatter of a `bench.predictor_check --json` file as a PNG for docs/ (the Compare page's
figure, ``pruner.charts.predicted_vs_measured_figure``, rendered by plotly.js in Debian's Chromium).

    python -m bench.predictor_scatter CHECK.json docs/predictor_scatter.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from pruner.charts import predicted_vs_measured_figure

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"]


def _label(row: dict) -> str:
    params = ", ".join(f"{k}={v:g}" for k, v in row["params"].items())
    return row["allocator"] + (f" ({params})" if params else "")


def _predictors(check: dict) -> str:
    """The table(s) the check predicted with: one per S around it, or the first version's single table."""
    if "predictors" in check:
        return "damage tables around S (" + ", ".join(f"{float(S):.0%}: {k}" for S, k in check["predictors"].items()) + ")"
    return f"damage table {check['predictor']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check_json")
    ap.add_argument("png")
    args = ap.parse_args()
    check = json.loads(Path(args.check_json).read_text())
    # the energy-equivalent prediction where the check has it (what the pages show), else the block means'; rows
    # measured at fewer seeds than the check asked for are left out, as its ρ leaves them out
    rows = [{"sparsity": r["S"], "predicted": r.get("predicted_layers", r["predicted"]), "measured": r["measured"],
             "label": _label(r)}
            for r in check["rows"] if "measured" in r and "seeds_missing" not in r]
    fig = predicted_vs_measured_figure(rows)
    fig.update_layout(title=f"Measured vs predicted perplexity, Wanda on SmolLM2<br><sup>measured: WikiText-2 test, "
                            f"first {check.get('max_chunks', 8)} chunks (partial); predicted: "
                            f"{_predictors(check)}; commit {check['commit']}</sup>", width=900, height=560)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        page_file = Path(tmp) / "scatter.html"
        fig.write_html(page_file, include_plotlyjs=True, full_html=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 920, "height": 580})
            page.goto(page_file.as_uri())
            page.wait_for_selector(".js-plotly-plot .scatterlayer")
            page.locator(".js-plotly-plot").first.screenshot(path=args.png)
            browser.close()
    print(f"wrote {args.png} ({len(rows)} points)")


if __name__ == "__main__":
    main()
