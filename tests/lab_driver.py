"""Drive the two widgets in JupyterLab in a real browser, as a person would.

Used by ``tests/test_browser.py`` (CI) and by ``docs/screenshot_widgets.py`` (the README's
screenshots), so that the pictures show what the test checked. :func:`drive` copies
``notebooks/04_scoring.ipynb`` and ``notebooks/03_neighbours.ipynb`` into a temporary folder
(JupyterLab saves outputs into the notebooks it runs), starts ``jupyter lab`` on a free port of
127.0.0.1, opens each notebook in headless Chromium driven by playwright, runs all cells and
uses the widgets:

- **scoring widget** (04): rendered (a plotly figure, no "Loading widget…", no raw
  ``FigureWidget(...)`` text); after *Run All* it shows the K the notebook sets, the pixel
  metrics (the demo has masks) and tiles titled with their file names; K typed into the
  slider's readout re-scores, and the maps drawn in the figure change; PatchCore (no K) disables
  the slider.
- **neighbour explorer** (03): it opens on the anomalous patch with its dropdown saying so; a
  click on another patch of the image changes the crops, the dropdown ("clicked: …") and the
  marker; picking "normal patch" in the dropdown changes them again.

Each check records what it saw in a dict; the caller asserts. Chromium is Debian's
(``apt-get install chromium``), never one ``playwright install`` downloads.

The server stops itself if this process dies: idle kernels are culled after 5 minutes and the
server shuts down after 5 minutes without kernels or requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SCORING_NB, EXPLORER_NB = "04_scoring.ipynb", "03_neighbours.ipynb"
SCORING_CELL, EXPLORER_CELL = 1, 2  # code-cell index of each widget in its notebook
K_NEW = 25
NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook"  # the open notebook's cells

# the flags a root, offline, screenless machine needs (the workplace's notes on Chromium)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# JupyterLab settings for a clean page: no news toast, no update check, every cell rendered
# (the default windowing leaves cells outside the viewport empty)
SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}

# the notebook's error outputs (JupyterLab renders them like stderr, so ask the model)
ERRORS = """() => {
    const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
    const errors = [];
    for (let i = 0; i < cells.length; i++) {
        const outputs = cells.get(i).outputs;
        for (let j = 0; outputs && j < outputs.length; j++) {
            const o = outputs.get(j).toJSON();
            if (o.output_type === 'error') errors.push(`${o.ename}: ${o.evalue}`);
        }
    }
    return errors;
}"""

# the anomaly maps a scoring figure draws: each heatmap's values as computed by plotly.js
HEATMAPS = """gd => gd.calcdata.filter(c => c[0].trace.type === 'heatmap')
    .map(c => c[0].z.map(row => Array.from(row)))"""

# the pictures (data URIs) of a figure's image traces
IMAGES = "gd => gd.data.filter(t => t.type === 'image').map(t => t.source)"

# screen position of a point (x, y) in the data coordinates of a figure's first axes
SCREEN = """(gd, xy) => {
    const L = gd._fullLayout, r = gd.getBoundingClientRect();
    return [r.left + L.xaxis._offset + L.xaxis.l2p(xy[0]),
            r.top + L.yaxis._offset + L.yaxis.l2p(xy[1])];
}"""

# the browser's own clock from a mouse press on a figure to the first frame where another
# figure's pictures differ (the widget's answer, drawn): window.__answered - window.__clicked, ms
CLOCK = """(gd, crops) => {
    const pictures = () => JSON.stringify(crops.data.filter(t => t.type === 'image')
        .map(t => t.source));
    const before = pictures();
    window.__clicked = null;
    window.__answered = null;
    gd.addEventListener('mousedown', () => { window.__clicked = performance.now(); },
                        {once: true, capture: true});
    const check = () => {
        if (window.__clicked !== null && pictures() !== before) {
            window.__answered = performance.now();
        } else {
            requestAnimationFrame(check);
        }
    };
    requestAnimationFrame(check);
}"""

# where the UMAP figure draws the query's nearest neighbour (first point of the last trace but one)
NEAREST = """gd => { const t = gd.data[gd.data.length - 2]; return [t.x[0], t.y[0]]; }"""


def find_chromium() -> str | None:
    """``$PATCHLAB_CHROMIUM``, else a Chromium or Chrome on the PATH, else None."""
    if os.environ.get("PATCHLAB_CHROMIUM"):
        return os.environ["PATCHLAB_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyter_lab(folder: Path) -> Iterator[str]:
    """``jupyter lab`` on ``folder`` (127.0.0.1, a free port, no token); yields its URL."""
    settings = folder / ".settings"
    for name, value in SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port = free_port()
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with open(folder / ".lab.log", "w") as log:  # the child keeps its own descriptor
        lab = _start_lab(folder, port, env, log)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=1):
                    break
            except OSError:
                if lab.poll() is not None:
                    raise RuntimeError(
                        "jupyter lab exited:\n" + (folder / ".lab.log").read_text()[-3000:]
                    ) from None
                time.sleep(0.5)
        else:
            raise RuntimeError("jupyter lab did not answer within 2 minutes")
        yield url
    finally:
        lab.terminate()
        try:
            lab.wait(30)
        except subprocess.TimeoutExpired:
            lab.kill()
            lab.wait(30)


def _start_lab(folder: Path, port: int, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            f"--port={port}",
            "--port-retries=0",
            "--ServerApp.ip=127.0.0.1",
            "--IdentityProvider.token=",
            "--LabApp.expose_app_in_browser=True",
            f"--ServerApp.root_dir={folder}",
            # a workspace of its own: no tabs restored from an earlier session
            f"--LabApp.workspaces_dir={folder / '.workspaces'}",
            # stops itself if the caller dies: idle kernels culled, then an idle server exits
            "--MappingKernelManager.cull_idle_timeout=300",
            "--MappingKernelManager.cull_interval=60",
            "--ServerApp.shutdown_no_activity_timeout=300",
            *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )


def open_and_run(page, url: str, name: str, timeout: float = 900) -> None:
    """Open notebook ``name``, run all its cells, wait until the kernel is idle; raise on errors."""
    page.goto(f"{url}/lab/tree/{name}?reset")
    page.wait_for_function(
        """name => {
            const w = window.jupyterapp?.shell.currentWidget;
            const kernel = w?.sessionContext?.session?.kernel;
            return w?.context?.path === name && kernel?.status === 'idle';
        }""",
        arg=name,
        timeout=180_000,
    )
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    time.sleep(2)
    wait_idle(page, timeout)
    errors = page.evaluate(ERRORS)
    if errors:
        raise AssertionError(f"{name}: a cell failed: " + "; ".join(errors))


def close_notebook(page) -> None:
    """Shut the open notebook's kernel down and close its tab, without a save dialog."""
    page.evaluate(
        """async () => {
            const w = window.jupyterapp.shell.currentWidget;
            await w.sessionContext.shutdown();
            w.dispose();
        }"""
    )


def wait_idle(page, timeout: float = 600) -> None:
    """Until the kernel has no cell queued or running (the execution prompts lose their '*')."""
    page.wait_for_function(
        """() => {
            const s = window.jupyterapp.shell.currentWidget?.sessionContext?.session?.kernel;
            return s && s.status === 'idle' &&
                ![...document.querySelectorAll('.jp-InputPrompt')]
                    .some(p => p.textContent.includes('*'));
        }""",
        timeout=timeout * 1000,
    )


def wait_changed(figure, js: str, before, timeout: float = 60) -> None:
    """Until ``js`` (a function of the plotly div) returns something other than ``before``."""
    t0 = time.perf_counter()
    while figure.evaluate(js) == before:
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f"the figure did not change within {timeout} s")
        time.sleep(0.05)


def output(page, cell: int):
    """The output area of code cell ``cell`` of the open notebook."""
    return page.locator(NOTEBOOK).locator(".jp-CodeCell").nth(cell).locator(".jp-OutputArea-output")


def rendered(page, cell: int, seen: dict, prefix: str) -> None:
    """Record whether the widget of ``cell`` rendered: a plotly figure, no placeholder text."""
    from playwright.sync_api import expect

    expect(output(page, cell).locator(".js-plotly-plot").first).to_be_visible(timeout=120_000)
    text = page.locator(NOTEBOOK).inner_text()
    seen[f"{prefix}_loading_text"] = "Loading widget" in text
    seen[f"{prefix}_raw_text"] = "FigureWidget(" in text or "VBox(children" in text
    seen[f"{prefix}_figures"] = output(page, cell).locator(".js-plotly-plot").count()


def check_scoring(page, url: str, seen: dict, shots: Path | None = None) -> None:
    """Notebook 04's scoring widget: first view, K moved, PatchCore disables K."""
    from playwright.sync_api import expect

    open_and_run(page, url, SCORING_NB)
    rendered(page, SCORING_CELL, seen, "scoring")
    widget = output(page, SCORING_CELL)
    figure = widget.locator(".js-plotly-plot").first
    status = widget.locator(".widget-html-content", has_text="AUROC")
    readout = widget.locator(".widget-readout").first
    seen["scoring_k_first"] = int(readout.inner_text())
    # the first view: pixel metrics where masks exist (the status is complete once PRO shows)
    expect(status).to_contain_text("PRO", timeout=60_000)
    expect(status).not_to_contain_text("computing", timeout=60_000)
    seen["scoring_status_first"] = status.inner_text()
    seen["scoring_titles_first"] = figure.evaluate("gd => gd.layout.annotations.map(a => a.text)")
    maps_before = figure.evaluate(HEATMAPS)

    # type a new K into the slider's readout, as a person can
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type(str(K_NEW))
    page.keyboard.press("Enter")
    expect(readout).to_have_text(str(K_NEW))
    wait_idle(page)
    wait_changed(figure, HEATMAPS, maps_before)
    # the status line is a separate message from the figure's: wait for it too
    expect(status).to_contain_text(f"K = {K_NEW}:", timeout=60_000)
    seen["scoring_k_moved"] = int(readout.inner_text())
    seen["scoring_status_moved"] = status.inner_text()
    maps_after = figure.evaluate(HEATMAPS)
    seen["scoring_n_maps"] = (len(maps_before), len(maps_after))
    seen["scoring_maps_changed"] = maps_before != maps_after
    if shots:
        page.mouse.move(0, 0)  # no hover label or focus ring in the picture
        page.evaluate("document.activeElement?.blur()")
        time.sleep(1)
        widget.screenshot(path=shots / "scoring_widget.png")

    # PatchCore has no K: the slider is disabled
    seen["scoring_k_editable_patchcluster"] = readout.get_attribute("contenteditable")
    method = widget.locator(".widget-dropdown", has_text="method").locator("select")
    method.select_option("patchcore")
    wait_idle(page)
    page.wait_for_function(
        "el => el.getAttribute('contenteditable') !== 'true'",
        arg=readout.element_handle(),
        timeout=60_000,
    )
    seen["scoring_k_editable_patchcore"] = readout.get_attribute("contenteditable")


def check_explorer(page, url: str, seen: dict, shots: Path | None = None) -> None:
    """Notebook 03's neighbour explorer: first view, a click on a patch, the dropdown."""
    from playwright.sync_api import expect

    open_and_run(page, url, EXPLORER_NB)
    rendered(page, EXPLORER_CELL, seen, "explorer")
    widget = output(page, EXPLORER_CELL)
    image, crops, umap = (widget.locator(".js-plotly-plot").nth(j) for j in range(3))
    picker = widget.locator(".widget-dropdown select").first
    chosen = "s => s.options[s.selectedIndex].text.replace(/\\s/g, ' ')"  # no-break spaces
    seen["explorer_choice_first"] = picker.evaluate(chosen)
    seen["explorer_title_first"] = crops.locator(".gtitle").first.text_content()
    seen["explorer_hover_first"] = widget.locator(".widget-html-content").nth(1).inner_text()
    seen["explorer_hover_image_first"] = widget.locator("img").first.evaluate(
        "img => img.complete && img.naturalWidth"
    )

    if shots:  # hover the query's nearest neighbour in the UMAP: its crop and image appear
        umap.scroll_into_view_if_needed()
        time.sleep(1)
        x, y = umap.evaluate(SCREEN, umap.evaluate(NEAREST))
        page.mouse.move(x, y)
        expect(widget.locator(".widget-html-content").nth(1)).not_to_contain_text(
            "the query", timeout=60_000
        )
        wait_idle(page)
        time.sleep(2)
        widget.screenshot(path=shots / "neighbour_explorer.png")

    # click a patch far from the query (the image's corner opposite to it)
    crops_before = crops.evaluate(IMAGES)
    qx, qy = image.evaluate("gd => [gd.data[2].x[0], gd.data[2].y[0]]")  # the query's marker
    target = (19.5 if qx > 112 else 203.5, 19.5 if qy > 112 else 203.5)  # patch centres, px
    image.scroll_into_view_if_needed()
    time.sleep(0.5)
    x, y = image.evaluate(SCREEN, list(target))
    image.evaluate(CLOCK, crops.element_handle())
    page.mouse.click(x, y)
    page.wait_for_function("() => window.__answered !== null", timeout=60_000)
    seen["explorer_click_seconds"] = (
        page.evaluate("() => window.__answered - window.__clicked") / 1e3
    )
    wait_idle(page)
    title = crops.locator(".gtitle").first
    expect(title).not_to_have_text(seen["explorer_title_first"], timeout=30_000)
    seen["explorer_title_clicked"] = title.text_content()
    seen["explorer_crops_changed"] = crops.evaluate(IMAGES) != crops_before
    seen["explorer_choice_clicked"] = picker.evaluate(chosen)
    seen["explorer_marker"] = image.evaluate("gd => [gd.data[2].x[0], gd.data[2].y[0]]")
    seen["explorer_target"] = list(target)

    # the dropdown: "normal patch" shows another patch again
    crops_clicked = crops.evaluate(IMAGES)
    picker.select_option(label="normal patch")
    wait_idle(page)
    wait_changed(crops, IMAGES, crops_clicked)
    expect(title).not_to_have_text(seen["explorer_title_clicked"], timeout=30_000)
    seen["explorer_choice_normal"] = picker.evaluate(chosen)
    seen["explorer_title_normal"] = title.text_content()


def drive(chromium: str, shots: Path | None = None, failures: Path | None = None) -> dict:
    """Run both checks in one JupyterLab; with ``shots``, screenshot each widget there.

    On a failure, the page (``failure.png``) and JupyterLab's log (``lab.log``) are copied into
    ``failures`` (default: a folder under the system's temporary folder), named in the error.
    """
    from playwright.sync_api import sync_playwright

    seen: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in (SCORING_NB, EXPLORER_NB):
            shutil.copy(NOTEBOOKS / name, folder / name)
        with jupyter_lab(folder) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 3000})
            try:
                check_scoring(page, url, seen, shots)
                close_notebook(page)
                check_explorer(page, url, seen, shots)
            except Exception as err:
                keep = Path(failures or tempfile.mkdtemp(prefix="patchlab-browser-"))
                keep.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=keep / "failure.png", full_page=True)
                shutil.copy(folder / ".lab.log", keep / "lab.log")
                raise AssertionError(f"{err}\n(the page and the server's log: {keep})") from err
            finally:
                browser.close()
    return seen
