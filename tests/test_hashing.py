import hashlib

import pytest

from patchlab import hashing
from patchlab.hashing import file_digest


def test_digests_are_the_plain_hashlib_ones_and_read_once(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights" * 1000)
    assert file_digest(path, "sha256") == hashlib.sha256(path.read_bytes()).hexdigest()
    blake = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    assert file_digest(path) == blake  # the cache keys of image files
    reads = hashing._digest.cache_info().misses
    assert file_digest(str(path)) == blake  # a str, a Path: the same file
    assert file_digest(tmp_path / "." / "w.pt") == blake
    assert hashing._digest.cache_info().misses == reads  # remembered, not read again


def test_a_rewrite_at_the_same_path_is_seen(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"a" * 64)
    first = file_digest(path, "sha256")
    path.write_bytes(b"b" * 64)  # same size, same path: ctime changes
    assert file_digest(path, "sha256") == hashlib.sha256(b"b" * 64).hexdigest() != first


def test_unknown_algorithm_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="md5"):
        file_digest(tmp_path, "md5")
    with pytest.raises(FileNotFoundError):
        file_digest(tmp_path / "nothing")
