"""The one atomic writer (patchlab.atomic): files and folders replaced whole or not at all."""

from __future__ import annotations

import os

import pytest

from patchlab.atomic import atomic_file, atomic_folder, clean_leftovers, replace_folder


def test_atomic_file_replaces_or_keeps(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]
    old = os.umask(0o022)
    try:
        with atomic_file(path) as f:
            f.write(b"new")
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o644


def test_atomic_folder_replaces_as_a_whole(tmp_path):
    path = tmp_path / "run"
    path.mkdir()
    (path / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(path) as new:
        (new / "new.txt").write_text("half")
        raise RuntimeError("killed")
    assert os.listdir(path) == ["old.txt"] and os.listdir(tmp_path) == ["run"]
    with atomic_folder(path) as new:
        (new / "new.txt").write_text("new")
    assert os.listdir(path) == ["new.txt"] and os.listdir(tmp_path) == ["run"]


def test_a_kill_between_the_renames_is_repaired(tmp_path, monkeypatch):
    path = tmp_path / "run"
    path.mkdir()
    (path / "old.txt").write_text("old")
    new = tmp_path / "incoming"
    new.mkdir()
    real = os.replace

    def killed(src, dst):  # the second rename (new into place) never happens
        if str(src) == str(new):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        replace_folder(new, path)
    monkeypatch.undo()
    assert not path.exists()
    clean_leftovers(path)
    assert os.listdir(path) == ["old.txt"]
    assert sorted(os.listdir(tmp_path)) == ["incoming", "run"]  # no .run.old-* left
