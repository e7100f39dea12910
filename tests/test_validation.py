"""Tests of swimjax._validation: every check rejects what it must, with a message
that names the parameter and what is allowed, and accepts NumPy/JAX scalars."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from swimjax import _validation as v

# Every floating dtype jax offers (those of this jax version), except float64,
# which needs x64 (tested below with NumPy leaves, and as a jax array if enabled).
_FLOAT_NAMES = ("float16", "bfloat16", "float32", "float8_e4m3fn", "float8_e5m2",
                "float8_e4m3b11fnuz", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e3m4",
                "float8_e4m3", "float8_e8m0fnu", "float6_e2m3fn", "float6_e3m2fn",
                "float4_e2m1fn")
FLOAT_DTYPES = [np.dtype(getattr(jnp, n)) for n in _FLOAT_NAMES if hasattr(jnp, n)]


def _has(dtype: np.dtype, value: float) -> bool:
    """Whether ``dtype`` can hold ``value`` (NaN or +-Inf): the float4/6 types
    hold neither, several float8 types have NaN but no Inf."""
    x = np.array(value, np.float32).astype(dtype).astype(np.float32)
    return bool(np.isnan(x)) if np.isnan(value) else bool(x == value)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_tree_catches_every_float_dtype(dtype, bad):
    if not _has(dtype, bad):
        pytest.skip(f"{dtype} cannot represent {bad}")
    good = jnp.asarray(np.array([0.5, 1.0], np.float32)).astype(dtype)
    v.check_finite_tree("params", {"w": good, "b": good[:1]})          # clean: no error
    leaf = jnp.asarray(np.array([0.5, bad, 1.0], np.float32)).astype(dtype)
    with pytest.raises(ValueError, match=r"params\['w'\] must be finite, found 1 NaN/Inf "
                                         r"value\(s\) of 3"):
        v.check_finite_tree("params", {"w": leaf, "b": good})
    # the same values as a NumPy (ml_dtypes) leaf
    with pytest.raises(ValueError, match=r"params\['w'\] must be finite"):
        v.check_finite_tree("params", {"w": np.asarray(leaf), "b": good})


def test_check_finite_tree_float64_and_complex():
    with pytest.raises(ValueError, match=r"p\[0\] must be finite"):
        v.check_finite_tree("p", [np.array([1.0, np.nan])])                 # NumPy float64
    if jax.config.jax_enable_x64:
        with pytest.raises(ValueError, match=r"p\[0\] must be finite"):
            v.check_finite_tree("p", [jnp.array([1.0, np.nan], jnp.float64)])
    for dt in (np.complex64, np.complex128):
        with pytest.raises(ValueError, match="must be finite, found 2"):
            v.check_finite_tree("p", {"z": np.array([1, complex(0, np.inf), complex(np.nan, 0)],
                                                    dt)})
    with pytest.raises(ValueError, match="must be finite"):
        v.check_finite_tree("p", {"z": jnp.array([1 + 1j, complex(np.nan, 1)], jnp.complex64)})
    v.check_finite_tree("p", {"z": jnp.array([1 + 1j], jnp.complex64)})


def test_check_finite_tree_skips_integer_bool_and_non_numeric_leaves():
    tree = {"i": jnp.arange(3), "u": np.array([255], np.uint8), "b": jnp.array([True, False]),
            "n": np.int64(7), "py": 3, "flag": True, "s": "relu", "o": object()}
    v.check_finite_tree("tree", tree)
    v.check_finite_tree("tree", {})
    # Python and NumPy float scalars are checked like arrays
    with pytest.raises(ValueError, match=r"tree\['x'\] must be finite"):
        v.check_finite_tree("tree", {"x": float("nan")})
    with pytest.raises(ValueError, match=r"tree\['x'\] must be finite"):
        v.check_finite_tree("tree", {"x": np.float16(np.inf)})


def test_check_finite_tree_skips_tracers():
    @jax.jit
    def f(x):
        v.check_finite_tree("x", {"x": x})
        return x
    assert np.isnan(f(jnp.array(np.nan)))


# ----------------------------------------------------------- scalar checks


@pytest.mark.parametrize("value", [0.25, 1, np.float32(0.25), np.float16(0.25), np.int64(1),
                                   np.array(0.25), jnp.array(0.25), jnp.array(0.25, jnp.bfloat16)])
def test_check_real_accepts_numpy_and_jax_scalars(value):
    out = v.check_real("x", value)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), jnp.array(True), "0.1", b"1",
                                   None, [0.1], (0.1,), np.array([0.1]), jnp.ones(2), 1j,
                                   np.complex64(1), object()])
def test_check_real_rejects_non_reals(value):
    with pytest.raises(ValueError, match=r"^x must be a real number, got "):
        v.check_real("x", value)


def test_check_real_rejects_tracers():
    @jax.jit
    def f(x):
        return v.check_real("sigma", x)
    with pytest.raises(ValueError, match="sigma must be a real number"):
        f(0.1)


@pytest.mark.parametrize("check,op", [(v.check_nonnegative, ">="), (v.check_positive, ">")])
@pytest.mark.parametrize("value", [float("nan"), np.float32("nan"), jnp.array(np.nan),
                                   float("inf"), -float("inf"), -0.5])
def test_nonnegative_and_positive_reject_nan_inf_negative(check, op, value):
    with pytest.raises(ValueError, match=rf"^sigma_d must be finite and {op} 0, got "):
        check("sigma_d", value)


def test_nonnegative_and_positive_bounds():
    assert v.check_nonnegative("s", 0.0) == 0.0
    assert v.check_nonnegative("s", np.float32(0.1)) == pytest.approx(0.1)
    assert v.check_positive("s", jnp.array(2.0)) == 2.0
    with pytest.raises(ValueError, match=r"s must be finite and > 0, got 0.0"):
        v.check_positive("s", 0.0)
    with pytest.raises(ValueError, match="s must be a real number, got bool"):
        v.check_nonnegative("s", np.bool_(True))


def test_check_range_messages_and_nan():
    assert v.check_range("budget", np.float32(0.5), 0.0, 1.0) == 0.5
    for bad in (float("nan"), 1.5, -0.1):
        with pytest.raises(ValueError, match=r"budget must be in \[0.0, 1.0\], got "):
            v.check_range("budget", bad, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"t must be in \(0.0, inf\], got 0"):
        v.check_range("t", 0, 0.0, None, low_inclusive=False)
    with pytest.raises(ValueError, match=r"t must be in \[-inf, 1.0\), got 1"):
        v.check_range("t", 1, None, 1.0, high_inclusive=False)


@pytest.mark.parametrize("value", [3, np.int8(3), np.uint64(3), np.array(3),
                                   jnp.array(3, jnp.int32)])
def test_check_int_accepts_integer_scalars(value):
    out = v.check_int("n_runs", value, 1, 5)
    assert type(out) is int and out == 3


@pytest.mark.parametrize("value", [True, np.bool_(False), jnp.array(True), 3.0, np.float32(3),
                                   "3", None, [3], np.array([3]), jnp.arange(2)])
def test_check_int_rejects_bools_floats_and_arrays(value):
    with pytest.raises(ValueError, match=r"^n_runs must be an integer, got "):
        v.check_int("n_runs", value, 1, None)


def test_check_int_range_message():
    with pytest.raises(ValueError, match=r"weight_bits must be an integer in \[1, 24\], got 32"):
        v.check_int("weight_bits", np.int32(32), 1, 24)
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, inf\], got 0"):
        v.check_int("n", 0, 1, None)


@pytest.mark.parametrize("value", ["layer", None, 1, ["per_tensor"], np.array(["per_tensor"]),
                                   ("per_tensor",)])
def test_check_choice_rejects_with_the_allowed_list(value):
    with pytest.raises(ValueError,
                       match=r"^scale must be one of \['per_channel', 'per_tensor'\], got "):
        v.check_choice("scale", value, ("per_tensor", "per_channel"))
    assert v.check_choice("scale", "per_channel", ("per_tensor", "per_channel")) == "per_channel"


def test_check_same_structure():
    v.check_same_structure("mask", {"a": np.zeros((2, 3))}, {"a": jnp.ones((2, 3))})
    with pytest.raises(ValueError, match="mask must have the same pytree structure as params"):
        v.check_same_structure("mask", {"b": np.zeros(2)}, {"a": np.zeros(2)})
    with pytest.raises(ValueError, match=r"mask\['a'\] must have shape \(2, 3\) \(as in params\), "
                                         r"got \(3, 2\)"):
        v.check_same_structure("mask", {"a": np.zeros((3, 2))}, {"a": np.zeros((2, 3))})
