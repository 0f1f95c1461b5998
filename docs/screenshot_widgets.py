"""Screenshot the two widgets running in JupyterLab, controls included, for the README.

    apt-get install -y chromium          # Debian's Chromium (any Chrome/Chromium will do)
    pip install -e ".[notebooks]" playwright   # do not run `playwright install`
    python docs/screenshot_widgets.py    # writes docs/img/scoring_widget.png,
                                         #        docs/img/neighbour_explorer.png

The script writes a small notebook (the setup cell of ``notebooks/04_scoring.ipynb``, the
scoring widget, the neighbour explorer of ``notebooks/03_neighbours.ipynb``) into a temporary
folder, starts ``jupyter lab`` on it, opens it in headless Chromium driven by playwright and runs
all cells. It then uses the controls as a person would: it types a new K into the slider's
readout (10 -> 25, the widget re-scores the stored neighbour table), picks "anomalous patch"
in the explorer's dropdown and hovers the patch's nearest neighbour in the UMAP, waits for the
figures to redraw and screenshots each output cell.

The run is the demo brick category (Test setting) with the default backbone, EfficientNet-Lite0
with its ImageNet weights (installed with patchlab, offline). Options: ``--chromium``
(the browser binary, default ``/usr/bin/chromium``), ``--port`` (default 8899), ``--out``.
playwright is not in the package's extras: it needs a browser that CI does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
K_NEW = 25  # the slider starts at the config's K = 10

SETUP = """\
from patchlab.config import RunConfig
from patchlab.demo import demo_path, make_demo_data
from patchlab.experiment import run

DATA = make_demo_data(demo_path().parent / "demo_small", categories=["brick"],
                      n_train=10, n_test_good=10, n_defective=12)
config = RunConfig(data=str(DATA), category="brick", setting="test", k=10, k_max=50)
result = run(config, progress=False)"""

SCORING = """\
from patchlab.widgets import ScoringWidget

widget = ScoringWidget.from_result(result, n_show=8, pixel_metrics=True)
widget"""

EXPLORER = """\
from patchlab.widgets import NeighbourExplorer

explorer = NeighbourExplorer(result, k=config.k, n_background=1500)
explorer"""

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

# where, on the page, the UMAP figure draws the query's nearest neighbour (the first point of
# the figure's "neighbours of the query" trace, the last trace but one)
NEAREST = """gd => {
    const L = gd._fullLayout, t = gd.data[gd.data.length - 2], r = gd.getBoundingClientRect();
    return [r.left + L._size.l + L.xaxis.l2p(t.x[0]), r.top + L._size.t + L.yaxis.l2p(t.y[0])];
}"""


def notebook(cells: list[str]) -> dict:
    """An nbformat 4 notebook of code cells, bound to the ``python3`` kernel."""
    return {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": f"cell{i}",
                "metadata": {},
                "outputs": [],
                "source": source,
            }
            for i, source in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def start_lab(folder: Path, port: int, settings: Path) -> subprocess.Popen:
    """``jupyter lab`` on ``folder`` without token or browser; returns once it answers."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise SystemExit(f"port {port} is in use: pass --port")
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    lab = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter",
            "lab",
            "--no-browser",
            f"--port={port}",
            "--IdentityProvider.token=",
            "--ServerApp.ip=127.0.0.1",
            "--LabApp.expose_app_in_browser=True",
            f"--ServerApp.root_dir={folder}",
            *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "lab.log", "w"),  # closed with the process
    )
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=1)
            return lab
        except OSError:
            if lab.poll() is not None:
                log = (folder / "lab.log").read_text()[-3000:]
                raise SystemExit(f"jupyter lab exited:\n{log}") from None
            time.sleep(0.5)
    lab.terminate()
    raise SystemExit("jupyter lab did not answer within a minute")


def output(page: Page, cell: int):
    """The output area of code cell ``cell`` of the open notebook."""
    return page.locator(".jp-Notebook .jp-CodeCell").nth(cell).locator(".jp-OutputArea-output")


def wait_idle(page: Page, timeout: float = 600) -> None:
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


def shoot(chromium: str, port: int, out: Path) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 3000})
        page.goto(f"http://127.0.0.1:{port}/lab/tree/widgets.ipynb")
        page.wait_for_function(
            "() => window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel"
            "?.status === 'idle'",
            timeout=120_000,
        )
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        time.sleep(2)
        wait_idle(page)
        errors = page.evaluate(ERRORS)
        if errors:
            raise SystemExit("a cell failed: " + "; ".join(errors))
        for cell in (1, 2):
            expect(output(page, cell).locator(".js-plotly-plot").first).to_be_visible(
                timeout=120_000
            )

        # the scoring widget: type K into the slider's readout, as a person can
        scoring = output(page, 1)
        status = scoring.locator(".widget-html-content").first
        before = status.inner_text()
        readout = scoring.locator(".widget-readout").first
        readout.click()
        page.keyboard.press("Control+A")
        page.keyboard.type(str(K_NEW))
        page.keyboard.press("Enter")
        expect(readout).to_have_text(str(K_NEW))
        page.wait_for_function(
            "([el, before]) => el.innerText !== before && el.innerText.includes('re-scored')",
            arg=[status.element_handle(), before],
            timeout=60_000,
        )
        wait_idle(page)
        page.mouse.move(0, 0)  # no hover label or focus ring in the picture
        page.evaluate("document.activeElement?.blur()")
        time.sleep(2)  # plotly's redraw
        scoring.screenshot(path=out / "scoring_widget.png")
        print("K:", readout.inner_text(), "|", status.inner_text())

        # the neighbour explorer: pick the anomalous patch in the dropdown
        explorer = output(page, 2)
        picker = explorer.locator(".widget-dropdown select").first
        picker.select_option(label="anomalous patch")
        wait_idle(page)
        expect(explorer.locator(".js-plotly-plot").nth(1)).to_contain_text("mean of")
        # hover the query's nearest neighbour in the UMAP: its crop and image appear on the right
        umap = explorer.locator(".js-plotly-plot").nth(2)
        umap.scroll_into_view_if_needed()
        time.sleep(1)
        x, y = umap.evaluate(NEAREST)
        page.mouse.move(x, y)
        expect(explorer.locator(".widget-html-content").nth(1)).not_to_contain_text(
            "hover over", timeout=60_000
        )
        wait_idle(page)
        time.sleep(3)
        explorer.screenshot(path=out / "neighbour_explorer.png")
        print("patch:", picker.evaluate("s => s.options[s.selectedIndex].text"))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--port", type=int, default=8899)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        nb = notebook([SETUP, SCORING, EXPLORER])
        (folder / "widgets.ipynb").write_text(json.dumps(nb, indent=1))
        for name, value in SETTINGS.items():
            path = folder / "settings" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(value))
        lab = start_lab(folder, args.port, folder / "settings")
        try:
            shoot(args.chromium, args.port, args.out.resolve())
        finally:
            lab.terminate()
            lab.wait(30)
    for name in ("scoring_widget.png", "neighbour_explorer.png"):
        path = args.out / name
        print(f"{path}: {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
