"""Screenshot the two widgets running in JupyterLab, controls included, for the README.

    apt-get install -y chromium          # Debian's Chromium (any Chrome/Chromium will do)
    pip install -e ".[dev]"              # playwright included; never run `playwright install`
    python docs/screenshot_widgets.py    # writes docs/img/scoring_widget.png,
                                         #        docs/img/neighbour_explorer.png

The pictures come from the browser test's own driver (``tests/lab_driver.py``), in the same
run as its checks: it copies ``notebooks/04_scoring.ipynb`` and ``notebooks/03_neighbours.ipynb``
into a temporary folder, starts ``jupyter lab`` on a free port of 127.0.0.1, opens each notebook
in headless Chromium driven by playwright and runs all cells. It types K = 25 into the scoring
widget's slider (the widget re-scores the stored neighbour table) and screenshots it; in the
neighbour explorer, which opens on the anomalous patch, it hovers the patch's nearest neighbour
in the UMAP and screenshots it; then it goes on with the test's checks and prints what it saw.

The run is the notebooks' own: the demo brick category (Test setting) with the default
backbone, EfficientNet-Lite0 with its ImageNet weights (installed with patchlab, offline).
Options: ``--chromium`` (the browser binary; default: ``$PATCHLAB_CHROMIUM`` or one on the
PATH), ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from lab_driver import drive, find_chromium  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chromium", default=find_chromium())
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    if args.chromium is None:
        raise SystemExit("no Chromium found: apt-get install chromium, or pass --chromium")
    args.out.mkdir(parents=True, exist_ok=True)
    seen = drive(args.chromium, shots=args.out.resolve())
    for key, value in seen.items():
        print(f"{key}: {value}")
    for name in ("scoring_widget.png", "neighbour_explorer.png"):
        path = args.out / name
        print(f"{path}: {path.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
