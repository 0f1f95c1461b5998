import csv

import pytest

from patchlab import reproduce as rep
from patchlab.cli import main

LITE = ["reproduce", "--backbone", "efficientnet_lite0"]  # the default is offline here


def reproduce_args(data, table, setting, out):
    """``patchlab reproduce`` of one table and one blind setting, quietly."""
    args = [*LITE, str(data), "--table", str(table), "--settings", setting]
    return [*args, "--out", str(out), "--quiet"]


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table2_has_every_method_and_setting(tiny_demo, tmp_path):
    assert main([*LITE, str(tiny_demo), "--table", "2", "--out", str(tmp_path), "--quiet"]) == 0
    rows = rows_of(tmp_path / "table2.csv")
    assert len(rows) == len(rep.PAPER_METHODS) * 3
    for r in rows:
        assert 0 <= float(r["pixel_auroc"]) <= 1 and 0 <= float(r["pro"]) <= 1
        assert (r["image_auroc"] == "") == (r["setting"] == "ano")  # undefined without goods
        for rule in rep.SCORE_RULES:
            assert (r[f"image_auroc_{rule}"] == "") == (r["setting"] == "ano")
        if r["method"] in ("padim", "spade", "mutual"):  # no table: the max is the score
            assert r["image_auroc_max"] == r["image_auroc_patchcore"] == r["image_auroc"]
        elif r["setting"] != "ano":  # the configured rule is the table's image AUROC
            assert r["image_auroc_patchcore"] == r["image_auroc"]
    spade = [r for r in rows if r["method"] == "spade"]
    assert {int(r["k_img"]) for r in spade} == {8, 5, 2}  # n_images - 1 on this tiny set
    md = (tmp_path / "table2.md").read_text()
    assert "PatchCluster-25%" in md and "mix P-AUROC" in md and "test patchcore | test eq3" in md


def test_resume_skips_finished_cells(tiny_demo, tmp_path, monkeypatch):
    args = reproduce_args(tiny_demo, 7, "test", tmp_path)
    assert main(args) == 0
    first = rows_of(tmp_path / "table7.csv")
    # computed largest coreset first (smaller ones are prefixes of its cached picks) ...
    assert [r["row"] for r in first] == ["100% (K=100)", "25% (K=25)", "10% (K=10)", "1% (K=5)"]
    # ... and shown in the table's own order
    md = (tmp_path / "table7.md").read_text()
    assert md.index("| 1% (K=5)") < md.index("| 10% (K=10)") < md.index("| 100% (K=100)")

    def boom(*a, **k):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(rep, "run", boom)
    assert main(args) == 0
    assert rows_of(tmp_path / "table7.csv") == first


def test_table4_is_one_class(tiny_demo, tmp_path):
    assert main([*LITE, str(tiny_demo), "--table", "4", "--out", str(tmp_path), "--quiet"]) == 0
    rows = rows_of(tmp_path / "table4.csv")
    assert {r["setting"] for r in rows} == {"one-class"} and len(rows) == 4


def test_bad_table_and_unlabelled_data(tmp_path, tiny_demo, capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", str(tiny_demo), "--table", "9", "--out", str(tmp_path)])
    (tmp_path / "imgs").mkdir()
    assert (
        main(["reproduce", str(tmp_path / "imgs"), "--table", "2", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "tables need labelled data" in capsys.readouterr().err
    with pytest.raises(ValueError, match="table=9 is unknown"):
        rep.reproduce(tiny_demo, 9, tmp_path)


def test_resume_on_a_category_folder_and_settings_guard(tiny_demo, tmp_path, monkeypatch):
    args = reproduce_args(tiny_demo / "brick", 5, "ano", tmp_path)
    assert main(args) == 0
    first = rows_of(tmp_path / "table5.csv")
    assert len(first) == 7 and {r["category"] for r in first} == {""}
    monkeypatch.setattr(rep, "run", lambda *a, **k: pytest.fail("recomputed"))
    assert main(args) == 0 and rows_of(tmp_path / "table5.csv") == first
    assert main(args + ["--seed", "3"]) == 2  # other weights: refuse to mix the tables


def test_combine_joins_settings_run_apart(tiny_demo, tmp_path):
    for setting in ("test", "ano"):
        assert main(reproduce_args(tiny_demo, 7, setting, tmp_path / setting)) == 0
    rep.combine([tmp_path / "test", tmp_path / "ano"], 7, tmp_path / "all")
    joined = rows_of(tmp_path / "all" / "table7.csv")
    assert joined == rows_of(tmp_path / "test" / "table7.csv") + rows_of(
        tmp_path / "ano" / "table7.csv"
    )
    md = (tmp_path / "all" / "table7.md").read_text()
    assert "test P-AUROC" in md and "ano P-AUROC" in md
    with pytest.raises(ValueError, match="more than one"):
        rep.combine([tmp_path / "test", tmp_path / "test"], 7, tmp_path / "twice")


def test_where_a_table_is_computed_is_not_a_setting(tmp_path):
    """Device, kNN backend and Dask scheduler change where cells run, not their results: a
    table resumes across them (a GPU session finishing a CPU table), also from a .json that
    recorded the scheduler (written before it stopped being a setting), and its .json omits
    them."""
    import json
    from dataclasses import replace

    from patchlab.config import RunConfig

    path = tmp_path / "table2.json"
    base = RunConfig(data="d", backbone="efficientnet_lite0")
    rep._check_resume(path, base)
    elsewhere = replace(base, device="cuda", backend="keops", scheduler="tcp://127.0.0.1:8786")
    rep._check_resume(path, elsewhere)
    written = json.loads(path.read_text())
    assert not {"device", "backend", "scheduler", "cache_dir"} & written.keys()
    path.write_text(json.dumps({**written, "scheduler": None, "device": "cpu"}))  # older .json
    rep._check_resume(path, base)
    with pytest.raises(ValueError, match=r"'precision': \('auto', 'bf16'\)"):
        rep._check_resume(path, replace(base, precision="bf16"))
    path.write_text(json.dumps({k: v for k, v in written.items() if k != "pool"}))
    with pytest.raises(ValueError, match=r"'pool'"):  # a setting missing from the .json
        rep._check_resume(path, base)
