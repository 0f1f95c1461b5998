import hashlib
import os
import time

import pytest

from patchlab import hashing
from patchlab.hashing import file_digest


def test_digests_are_the_plain_hashlib_ones(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights" * 1000)
    assert file_digest(path, "sha256") == hashlib.sha256(path.read_bytes()).hexdigest()
    blake = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    assert file_digest(path) == blake  # the cache keys of image files


def test_a_settled_file_is_read_once(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights" * 1000)
    monkeypatch.setattr(hashing, "SETTLE_SECONDS", -1.0)  # as if written long ago
    first = file_digest(path)
    reads = hashing._remembered.cache_info().misses
    assert file_digest(str(path)) == first  # a str, a Path, another spelling: the same file
    assert file_digest(tmp_path / "." / "w.pt") == first
    assert hashing._remembered.cache_info().misses == reads  # remembered, not read again


def test_a_fresh_file_is_never_remembered(tmp_path):
    """A same-size rewrite within one timestamp tick keeps size, mtime and ctime on coarse
    file systems: a file changed in the last seconds is read on every call."""
    path = tmp_path / "w.pt"
    path.write_bytes(b"a" * 64)
    memo = hashing._remembered.cache_info()
    first = file_digest(path, "sha256")
    assert hashing._remembered.cache_info() == memo  # read directly, the memo untouched
    stamps = os.stat(path)
    path.write_bytes(b"b" * 64)  # same size, same path
    os.utime(path, ns=(stamps.st_atime_ns, stamps.st_mtime_ns))  # same mtime too
    assert file_digest(path, "sha256") == hashlib.sha256(b"b" * 64).hexdigest() != first


def test_a_rewrite_of_a_remembered_file_is_seen(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    path.write_bytes(b"a" * 64)
    monkeypatch.setattr(hashing, "SETTLE_SECONDS", -1.0)
    first = file_digest(path, "sha256")
    time.sleep(0.01)
    path.write_bytes(b"b" * 64)  # same size: ctime (and mtime) move on
    assert file_digest(path, "sha256") == hashlib.sha256(b"b" * 64).hexdigest() != first


def test_unknown_algorithm_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="md5"):
        file_digest(tmp_path, "md5")
    with pytest.raises(FileNotFoundError):
        file_digest(tmp_path / "nothing")
