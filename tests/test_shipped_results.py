"""The magnetic-tile tables of README.md and docs/results.md are the CSVs in
docs/results/magnetic_tile, rounded.

The figures were computed once (docs/results.md says how); this guards the copy, not the
computation: a README edited by hand, or tables recomputed without the README, fail here.
"""

import csv
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results" / "magnetic_tile"

# README row label -> (table, CSV row label)
LABELS = {
    "PaDiM": (2, "PaDiM"),
    "SPADE": (2, "SPADE"),
    "PatchCore-100 %": (2, "PatchCore-100%"),
    "PatchCore-25 %": (2, "PatchCore-25%"),
    "PatchCore + LOF": (2, "PatchCore+LOF"),
    "PatchCluster-25 % (K = 25)": (2, "PatchCluster-25%"),
    "PatchCluster-100 % (K = 25)": (5, "K=25"),
    "PatchCluster-100 % (K = 100)": (2, "PatchCluster-100%"),
    "PatchCluster-100 % (K = 200)": (5, "K=200"),
    "Mutual scoring (MuSc-style)": (2, "Mutual (MuSc-style)"),
}


def table_rows(doc: Path, header: str) -> dict[str, list[str]]:
    """Rows (label -> cells, bold marks removed) of the markdown table of ``doc`` whose header
    line is ``header``."""
    lines = doc.read_text().splitlines()
    rows = {}
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("|"):
            break
        label, *cells = [re.sub(r"\*", "", c.strip()) for c in line.strip("|").split("|")]
        rows[label] = cells
    return rows


def csv_cell(table: int, setting: str, row: str) -> dict[str, str]:
    with open(RESULTS / f"table{table}.csv", newline="") as f:
        found = [r for r in csv.DictReader(f) if (r["setting"], r["row"]) == (setting, row)]
    assert len(found) == 1, f"table {table} has {len(found)} cells {setting}/{row}"
    return found[0]


@pytest.mark.parametrize("setting", ["Test", "Mix"])
def test_readme_magnetic_tile_tables_are_the_csvs(setting):
    header = f"| method ({setting} setting) | image AUROC | pixel AUROC | PRO |"
    rows = table_rows(ROOT / "README.md", header)
    assert len(rows) >= 6
    for label, shown in rows.items():
        table, row = LABELS[label]
        cell = csv_cell(table, setting.lower(), row)
        expected = [f"{float(cell[m]):.3f}" for m in ("image_auroc", "pixel_auroc", "pro")]
        assert shown == expected, f"README {setting} row {label!r}: {shown} != CSV {expected}"


def test_results_md_mix_table_is_table2():
    header = "| row | Mix I-AUROC | Mix P-AUROC | Mix PRO |"
    rows = table_rows(ROOT / "docs" / "results.md", header)
    assert len(rows) == 8  # every method of table 2
    for label, shown in rows.items():
        cell = csv_cell(2, "mix", label)
        assert shown == [f"{float(cell[m]):.3f}" for m in ("image_auroc", "pixel_auroc", "pro")]
