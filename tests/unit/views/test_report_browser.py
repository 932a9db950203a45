"""The HTML report as a person sees it: opened in headless Chromium with no network to lean on.

Checks that every CircuitsVis widget mounted, every plotly figure drew its SVG, the console holds
no error, and no request left the machine (DevTools Network domain, through chromedriver's
performance log). A full-page screenshot is saved (to $TL_SPIKESINK_ARTIFACTS when set).

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them) and selenium.
"""

import base64
import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from planted import sentences

import tl_spikesink as ts

pytestmark = pytest.mark.browser

CHROMIUM = next(
    filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None
)
CHROMEDRIVER = shutil.which("chromedriver")
LOCAL_SCHEMES = {"file", "data", "blob", "about"}
"""What the report page itself may load."""
BROWSER_SCHEMES = LOCAL_SCHEMES | {"chrome", "devtools"}
"""What the browser may load for its own pages (built in, never the network)."""
PLOTS_DRAWN = """
const plots = [...document.querySelectorAll('.js-plotly-plot')];
return plots.length === arguments[0] && plots.every(p => p.querySelector('svg.main-svg'));
"""
MOUNTED = "const w = document.getElementById(arguments[0]); return w.children.length > 0;"

if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "no chromium / chromedriver binary found; install Debian's chromium and chromium-driver "
        "(apt-get install chromium chromium-driver) to run the browser test",
        allow_module_level=True,
    )
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')"
)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def requests(driver):
    """(url, url of the document that asked) of every request since the last call."""
    out = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            params = message["params"]
            out.append((params["request"]["url"], params.get("documentURL", "")))
        elif message["method"] == "Network.webSocketCreated":
            out.append((message["params"]["url"], ""))
    return out


def test_report_renders_offline_in_chromium(browser, planted, texts, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    result = ts.scan(planted, texts, batch_size=8, progress=False)
    interventions = [ts.spike_ablation(result, mode="zero", model=planted)]
    table = ts.experiment(
        planted, texts[:8], interventions, calibration=sentences(8, seed=11), progress=False
    )
    page = ts.write_html(
        result,
        tmp_path / "report.html",
        model=planted,
        texts=sentences(2, seed=3),
        extra_tables=[table],
    )
    url = page.resolve().as_uri()

    browser.get("about:blank")
    browser.get_log("performance"), browser.get_log("browser")  # start both logs clean
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    # 5 scan plots, the kurtosis curve, the per-text sink scores and the decoupling table's chart.
    wait.until(lambda d: d.execute_script(PLOTS_DRAWN, 8))
    widgets = [e.get_attribute("id") for e in browser.find_elements("css selector", ".cv-widget")]
    assert widgets == ["cv-widget-0", "cv-widget-1", "cv-widget-2"]
    # Widgets mount as they near the viewport, as a reader scrolls.
    assert not browser.execute_script(MOUNTED, "cv-widget-2")
    for widget in widgets:
        browser.execute_script("document.getElementById(arguments[0]).scrollIntoView()", widget)
        wait.until(lambda d, w=widget: d.execute_script(MOUNTED, w))
    wait.until(lambda d: d.find_elements("css selector", "#cv-widget-0 canvas"))

    heads = browser.find_element("id", "cv-widget-0").text
    assert "L0H0 sink 1.00" in heads and "L0H1" in heads
    tokens = browser.find_element("id", "cv-widget-1").text
    assert "<bos>" in tokens  # shown as text, not swallowed as an HTML tag
    assert "ch 7" in browser.find_element("id", "cv-widget-2").text
    traces = browser.execute_script(
        "return document.getElementById('plot-0').data"
        ".filter(t => t.name === 'top 1' && t.meta === 'resid_post')[0].y"
    )
    assert 2990 < traces[1] < 3010
    bars = browser.execute_script(
        "return document.getElementById('table-plot-0').data"
        ".filter(t => t.name === 'perplexity')[0].y"
    )
    assert bars == ["clean", "zero spikes"]

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"console errors: {errors}"
    seen = requests(browser)
    assert any(u == url for u, _ in seen), "the performance log saw no request at all; is it on?"
    for u, doc in seen:
        allowed = LOCAL_SCHEMES if doc.startswith("file:") or not doc else BROWSER_SCHEMES
        assert urlparse(u).scheme in allowed, (
            f"request left the machine: {u} (from {doc or 'the page'})"
        )

    timing = browser.execute_script("return performance.getEntriesByType('navigation')[0].toJSON()")
    assert 0 < timing["loadEventEnd"] < 60_000

    # A window as tall as the page, so the screenshot needs no off-screen drawing (charts drawn
    # beyond the viewport come out blank); let the widgets settle at the new size first.
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, height + 200)
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(2)
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    out = Path(os.environ.get("TL_SPIKESINK_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    png = out / "report.png"
    png.write_bytes(base64.b64decode(shot["data"]))
    assert png.stat().st_size > 50_000  # a page of plots, not a blank
