"""Size and load time of the HTML report for a SmolLM2-sized result and a long widget text.

Scans SmolLM2-135M (30 layers × 9 heads) over the default corpus, writes the report with widgets
on a text of `--widget-tokens` tokens and with the decoupling table and its chart (an experiment
on `--experiment-tokens` held-out tokens; 0 leaves it out), and opens it in headless Chromium
(Debian's `chromium` and `chromium-driver`, with selenium): prints the page size by part, the
time to build it, and the browser's DOMContentLoaded / load times and the time until every
widget and plot has drawn.

    python benchmarks/bench_report.py                      # SmolLM2, 500-token widget text
    python benchmarks/bench_report.py --widget-tokens 256 --scan-tokens 8192
    python benchmarks/bench_report.py --experiment-tokens 0   # no decoupling table
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

PLOTS_DRAWN = """
const plots = [...document.querySelectorAll('.js-plotly-plot')];
return plots.length === arguments[0] && plots.every(p => p.querySelector('svg.main-svg'));
"""
MOUNTED = "const w = document.getElementById(arguments[0]); return w.children.length > 0;"


def build(args) -> tuple[Path, dict]:
    import tl_spikesink as ts
    from tl_spikesink.views.html import _circuitsvis_js, _plotly_js

    model = ts.load(args.model, progress=False)
    result = ts.scan(model, None, max_tokens=args.scan_tokens, batch_size=8, progress=False)
    words = " ".join(ts.default_texts())
    tables = []
    t0 = time.perf_counter()
    if args.experiment_tokens:
        config = ts.ScanConfig(max_tokens=args.experiment_tokens, max_seq_len=128)
        tables.append(
            ts.experiment(
                model, config=config, calibration_tokens=args.experiment_tokens, progress=False
            )
        )
    experiment_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = ts.write_html(
        result,
        Path(args.out),
        model=model,
        texts=[words],
        max_widget_tokens=args.widget_tokens,
        max_attention_tokens=args.attention_tokens,
        extra_tables=tables,
    )
    built = time.perf_counter() - t0
    page = path.read_text()
    widget_bytes = {
        name: len(call.encode())
        for name, call in re.findall(
            r"tlSpikesink\.mount\(\"[^\"]+\", \"(\w+)\", (.*?)\);</script>", page
        )
    }
    sizes = {
        "page_MB": len(page.encode()) / 1e6,
        "plotly_js_MB": len(_plotly_js().encode()) / 1e6,
        "circuitsvis_js_MB": len(_circuitsvis_js().encode()) / 1e6,
        "widget_props_MB": {k: round(v / 1e6, 3) for k, v in widget_bytes.items()},
        "build_s": round(built, 2),
        "experiment_s": round(experiment_s, 1),
        "experiment_rows": [r.name for t in tables for r in t.rows],
        "table_chart_kB": _div_kB(page, "table-plot-0"),
        "layers_x_heads": f"{result.n_layers} x {result.n_heads}",
        "scan_tokens": result.n_tokens,
    }
    return path, sizes


def _div_kB(page: str, div_id: str) -> float | None:
    """Size of one plotly figure's div and script in the page (None when absent)."""
    start = page.find(f'<div id="{div_id}"')
    if start < 0:
        return None
    return round(len(page[start : page.index("</script>", start)].encode()) / 1e3, 1)


def load_times(path: Path, runs: int) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tempfile.mkdtemp()}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    n_plots = path.read_text().count('class="plotly-graph-div"')
    driver.set_page_load_timeout(600)
    out: dict[str, list[float]] = {"domcontentloaded_s": [], "load_s": [], "plots_drawn_s": []}
    try:
        for _ in range(runs):
            driver.get("about:blank")
            t0 = time.perf_counter()
            driver.get(path.resolve().as_uri())
            wait = WebDriverWait(driver, 600, poll_frequency=0.05)
            wait.until(lambda d: d.execute_script(PLOTS_DRAWN, n_plots))
            out["plots_drawn_s"].append(time.perf_counter() - t0)
            nav = driver.execute_script(
                "return performance.getEntriesByType('navigation')[0].toJSON()"
            )
            out["domcontentloaded_s"].append(nav["domContentLoadedEventEnd"] / 1e3)
            out["load_s"].append(nav["loadEventEnd"] / 1e3)
            # Widgets mount when scrolled to: time each from scroll to its first drawn element.
            for e in driver.find_elements("css selector", ".cv-widget"):
                widget = f"mount_{e.get_attribute('data-component')}_s"
                t1 = time.perf_counter()
                driver.execute_script("arguments[0].scrollIntoView()", e)
                wait.until(lambda d, e=e: d.execute_script(MOUNTED, e.get_attribute("id")))
                if widget.startswith("mount_AttentionHeads"):  # drawn = every head's canvas
                    wait.until(lambda d, e=e: len(e.find_elements("css selector", "canvas")) > 1)
                out.setdefault(widget, []).append(time.perf_counter() - t1)
    finally:
        driver.quit()
    return {k: round(statistics.median(v), 2) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scan-tokens", type=int, default=4096)
    p.add_argument("--widget-tokens", type=int, default=500)
    p.add_argument("--attention-tokens", type=int, default=48)
    p.add_argument("--experiment-tokens", type=int, default=512)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--out", default=str(Path(tempfile.gettempdir()) / "tl_spikesink_bench_report.html")
    )
    args = p.parse_args()
    path, sizes = build(args)
    sizes.update(load_times(path, args.runs))
    print(json.dumps({"page": str(path), **sizes}, indent=1))


if __name__ == "__main__":
    main()
