"""The cache of generated sets (training/set_cache.py): a hit is the very set generation makes,
and any change to what makes the images is a miss."""
from pathlib import Path

import numpy as np
import pytest

from training import set_cache, synthetic


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(set_cache.CACHE_ENV, str(tmp_path))
    return tmp_path


def assert_same(a: synthetic.SyntheticSet, b: synthetic.SyntheticSet) -> None:
    assert np.array_equal(a.images, b.images) and a.images.dtype == b.images.dtype == np.float32
    assert np.array_equal(a.categories, b.categories) and np.array_equal(a.labels, b.labels)
    assert a.blank == b.blank


def test_a_hit_is_the_generated_set_and_generates_nothing(cache, monkeypatch):
    made = synthetic.non_digits("eval", 3)
    assert len(list(cache.glob("set-*.npz"))) == 1

    def no_generation(*args):
        raise AssertionError("a cached set was generated again")
    monkeypatch.setattr(synthetic, "generate_set", no_generation)
    assert_same(synthetic.non_digits("eval", 3), made)
    with pytest.raises(AssertionError, match="generated again"):      # another request is another key
        synthetic.real_world_digits("eval", 3)


def test_off_and_unreadable_files_generate(cache, monkeypatch):
    made = synthetic.real_world_digits("eval", 2)
    (stored,) = cache.glob("set-*.npz")
    stored.write_bytes(stored.read_bytes()[:100])          # a file cut short is never read
    assert_same(synthetic.real_world_digits("eval", 2), made)
    monkeypatch.setenv(set_cache.CACHE_ENV, set_cache.OFF)
    stored.unlink()
    assert_same(synthetic.real_world_digits("eval", 2), made)
    assert not stored.exists()


def test_the_key_follows_the_code_and_the_request(tmp_path):
    source = tmp_path / "photo.py"
    source.write_text("CLOSING_SHARE = 0.25\n")
    request = {"split": "train", "per_category": {"letters": 5}, "maker": "non_digit"}
    key = set_cache.set_key(request, set_cache.sources_digest([source]), [])
    assert set_cache.set_key(dict(request), set_cache.sources_digest([source]), []) == key
    assert set_cache.set_key({**request, "split": "eval"}, set_cache.sources_digest([source]), []) != key
    source.write_text("CLOSING_SHARE = 0.3\n")
    assert set_cache.set_key(request, set_cache.sources_digest([source]), []) != key
    assert {Path(s).name for s in synthetic.SOURCES} >= {"photo.py", "preprocess.py", "synthetic.py", "drawing.py"}


def test_a_write_that_fails_midway_leaves_no_file_and_no_temp_file(cache, monkeypatch):
    """A full disk mid-write: the set is still returned (the cache skipped), and neither the
    final name nor a temp file is left in the cache (store reimplemented write_atomic without its clean-up)."""
    def full_disk(out, **arrays):
        out.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(set_cache.np, "savez", full_disk)
    path = cache / "set-x.npz"
    set_cache.store(path, {"images": np.zeros((2, 28, 28), np.uint8)}, {"n": 2})
    assert list(cache.iterdir()) == []
