"""benchmarks/quality.py's decision logic on made-up records: the rule that changes a default
(the mean improves on every metric, no set loses more than 0.02) and the resumption check."""

import importlib.util
import sys
from pathlib import Path

path = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
spec = importlib.util.spec_from_file_location("benchmarks_quality", path)
quality = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = quality  # its dataclasses look their module up there
spec.loader.exec_module(quality)


def record(s, row, image, pixel, pro, rule="patchcore"):
    by_rule = {r: image for r in quality.IMAGE_SCORES}
    return {
        "set": s,
        "row": row,
        "image_rule": rule,
        "image_auroc": image,
        "pixel_auroc": pixel,
        "pro": pro,
        "image_auroc_by_rule": by_rule,
        "image_auroc_by_rule_rscin": by_rule,
        "seconds": 1.0,
    }


def test_candidates_pass_only_without_a_large_loss_anywhere():
    default, mutual, k50 = quality.DEFAULT_ROW, "mutual @224crop", "patchcluster K=50 @224crop"
    records = [
        record("a", default, 0.90, 0.90, 0.70),
        record("b", default, 0.90, 0.90, 0.70),
        record("a", mutual, 0.95, 0.95, 0.80),  # better on a ...
        record("b", mutual, 0.95, 0.95, 0.67),  # ... loses 0.03 PRO on b: fails
        record("a", k50, 0.91, 0.91, 0.72),
        record("b", k50, 0.91, 0.91, 0.69),  # loses 0.01 at most: passes
    ]
    latest = {(r["set"], r["row"]): r for r in records}
    lines = quality.candidates(latest, ["a", "b"], top=100)
    rows = {line.split(",")[0].strip("| "): line for line in lines if line.startswith("| ")}
    assert rows[mutual].endswith("| -0.030 | no |")
    assert rows[k50].endswith("| -0.010 | yes |")
    assert rows[default].endswith("| no |")  # the default itself does not improve on itself


def test_a_line_is_done_only_under_the_settings_it_recorded():
    base = quality.data_sets(["piped/PA_BDP01_TL"], Path("/nowhere"))[0][1]
    row = next(r for r in quality.rows() if r.name == quality.DEFAULT_ROW)
    recorded = quality.settings(quality.row_config(base, row))
    assert recorded["method"] == "patchcluster" and recorded["k"] == 25  # the old default
    assert recorded["local_sizes"] == [3] and "k_max" not in recorded
