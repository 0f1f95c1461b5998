"""Both widgets in JupyterLab, in a real browser (Debian's Chromium driven by playwright).

The notebooks are run as a user runs them (*Run All* in JupyterLab) and the widgets used as a
user uses them (typing K, choosing a method, clicking a patch, picking from a dropdown); what the
page then shows is checked. The driver is ``tests/lab_driver.py``, which also makes the README's
screenshots (``docs/screenshot_widgets.py``). ``.ci/run`` installs Chromium and playwright;
the test is skipped, with the reason, only where no Chromium can be found.
"""

from __future__ import annotations

import json
import re

import pytest
from lab_driver import K_NEW, drive, find_chromium

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on this machine: `apt-get install chromium` (or set $PATCHLAB_CHROMIUM)",
)


@pytest.fixture(scope="module")
def seen():
    pytest.importorskip(
        "playwright", reason="`pip install playwright` (never `playwright install`)"
    )
    return drive(CHROMIUM)


def auroc(status: str) -> float:
    return float(re.search(r"image AUROC ([0-9.]+)", status).group(1))


def test_widgets_render(seen):
    for widget in ("scoring", "explorer"):
        assert not seen[f"{widget}_loading_text"], widget
        assert not seen[f"{widget}_raw_text"], widget
    assert seen["scoring_figures"] == 1 and seen["explorer_figures"] == 3


def test_scoring_widget_opens_at_the_notebooks_k_and_moves(seen):
    # notebook 04 sets K = 10 and its timing cell puts the slider back
    assert seen["scoring_k_first"] == 10
    # pretrained features rank the demo's brick images (the broken first view showed 0.017)
    assert auroc(seen["scoring_status_first"]) > 0.9
    assert seen["scoring_k_moved"] == K_NEW
    assert f"patchcluster, K = {K_NEW}:" in seen["scoring_status_moved"]
    assert "patchcluster, K = 10:" in seen["scoring_status_first"]


def test_scoring_widget_first_view_shows_pixel_metrics_and_file_names(seen):
    # the demo has masks: pixel AUROC and PRO are numbers at once (they said n/a, box off)
    status = seen["scoring_status_first"]
    assert re.search(r"pixel AUROC 0\.\d{3}, PRO 0\.\d{3}", status), status
    titles = seen["scoring_titles_first"]
    assert len(titles) == 8
    for rank, title in enumerate(titles):  # "#1 crack/003.png (defect) 2.31"
        assert re.match(rf"#{rank + 1} \w+/\w+\.png \((good|defect)\) \S+$", title), title
    assert seen["scoring_n_maps"] == (8, 8) and seen["scoring_maps_changed"]


def test_scoring_widget_disables_k_for_patchcore(seen):
    assert seen["scoring_k_editable_patchcluster"] == "true"
    assert seen["scoring_k_editable_patchcore"] != "true"


def test_explorer_opens_on_the_anomalous_patch(seen):
    assert seen["explorer_choice_first"] == "anomalous patch"
    assert not seen["explorer_title_first"].startswith("good/")  # a defective image's patch
    assert seen["explorer_hover_first"].startswith("the query")
    assert seen["explorer_hover_image_first"] > 0  # a picture, not a broken-image icon


def test_explorer_click_and_dropdown(seen):
    assert seen["explorer_crops_changed"]
    assert seen["explorer_choice_clicked"].startswith("clicked:")
    # the marker and the crops' title move to the clicked patch (8 px patches, centres at +3.5)
    assert seen["explorer_marker"] == seen["explorer_target"]
    col, row = ((v - 3.5) / 8 for v in seen["explorer_target"])
    assert f"patch ({row:.0f}, {col:.0f})" in seen["explorer_title_clicked"]
    assert seen["explorer_choice_clicked"].endswith(f"patch ({row:.0f}, {col:.0f})")
    assert seen["explorer_choice_normal"] == "normal patch"
    assert seen["explorer_title_normal"].startswith("good/")
    print(f"a click answered in {seen['explorer_click_seconds']:.2f} s")


def test_report_opens_offline_in_the_browser(tiny_demo, tmp_path):
    """report.html in Chromium with every non-file request refused: all four figures draw."""
    sync_playwright = pytest.importorskip(
        "playwright.sync_api", reason="`pip install playwright` (never `playwright install`)"
    ).sync_playwright
    from lab_driver import CHROMIUM_ARGS

    from patchlab.cli import main

    out = tmp_path / "run"
    args = ["run", str(tiny_demo), "--category", "brick", "--k", "5", "--report"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    refused = []

    def offline(route):
        if route.request.url.startswith(("file:", "data:")):
            return route.continue_()
        refused.append(route.request.url)
        return route.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", offline)
            page.goto((out / "report.html").as_uri())
            page.wait_for_function(
                "() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= 4",
                timeout=60_000,
            )
            drawn = page.evaluate(
                "() => [...document.querySelectorAll('.js-plotly-plot')].map(gd => gd.data.length)"
            )
        finally:
            browser.close()
    shown = min(8, json.loads((out / "metrics.json").read_text())["n_images"])
    assert len(drawn) == 4 and drawn[0] == 3 * shown  # the overlay grid: 3 traces per image
    assert refused == []  # nothing asked for the network
