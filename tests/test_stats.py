"""qjax.stats: quantization statistics against the independent NumPy reference, and the
"FP4 All the Way" gradient-vs-noise check."""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import ELEMENTS, mx_fake_quant_ref, mx_scales_ref  # noqa: E402


@pytest.mark.parametrize("fmt,elem", [("mxfp4", "e2m1"), ("mxfp8", "e4m3"), ("mxfp6_e3m2", "e3m2")])
def test_stats_match_numpy_reference(fmt, elem):
    rng = np.random.default_rng(abs(hash(fmt)) % 2**32)
    x = (rng.standard_t(3, size=(8, 128)) * np.exp(rng.normal(size=(8, 1)))).astype(np.float32)
    x[0, :5] = 0.0
    x[1, 3] = 1e-9  # flushed next to large neighbours
    got = jax.jit(lambda v: stats.quantization_stats(v, fmt))(x)
    q = mx_fake_quant_ref(x, elem).astype(np.float64)
    x64 = x.astype(np.float64)
    snr = 10 * np.log10(np.sum(x64**2) / np.sum((x64 - q) ** 2))
    top = np.repeat(mx_scales_ref(x, elem), 32, axis=-1) * ELEMENTS[elem][1]
    np.testing.assert_allclose(float(got["snr_db"]), snr, rtol=1e-5)
    assert float(got["flushed"]) == np.mean((x64 != 0) & (q == 0))
    assert float(got["clipped"]) == np.mean(np.abs(x64) > top)
    assert float(got["amax"]) == np.max(np.abs(x))
    np.testing.assert_allclose(float(got["noise_norm"]), np.sqrt(np.sum((x64 - q) ** 2)),
                               rtol=1e-5)
    assert float(got["flushed"]) > 0


def test_clipping_counts_constructed_overflow():
    # OCP "floor" scaling: block amax 7.5 -> scale 2^(2-2) = 1, so |x| > 6 saturates in E2M1.
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [7.5, -7.0, 6.5, 6.0]
    x[0, 4:] = 0.25
    s = stats.quantization_stats(x, "mxfp4")
    assert float(s["clipped"]) == 3 / 32
    s_rceil = stats.quantization_stats(x, "mxfp4", scale_mode="rceil")  # rceil never clips
    assert float(s_rceil["clipped"]) == 0.0


def test_exact_input_has_infinite_snr_and_axis_is_respected():
    x = jnp.array([[1.0, 2.0, 0.5, -4.0] * 8] * 2)
    assert math.isinf(float(stats.quantization_stats(x, "mxfp8")["snr_db"]))
    y = jax.random.normal(jax.random.key(0), (32, 64))
    by_rows = stats.quantization_stats(y, "mxfp4", axis=0)
    transposed = stats.quantization_stats(y.T, "mxfp4", axis=-1)
    for name in ("snr_db", "clipped", "flushed", "amax"):
        np.testing.assert_allclose(float(by_rows[name]), float(transposed[name]), rtol=1e-6)


def test_nvfp4_and_int8_and_cast_formats_run():
    x = jax.random.normal(jax.random.key(1), (16, 64))
    for fmt in ("nvfp4", "int8", "bf16"):
        s = stats.quantization_stats(x, fmt)
        assert 0 <= float(s["clipped"]) <= 1 and 0 <= float(s["flushed"]) <= 1
        assert np.isfinite(float(s["snr_db"])) or fmt == "bf16"
    big = jnp.array([[1e6, 1.0] * 8], jnp.float32)
    assert float(stats.quantization_stats(big, "bf16")["clipped"]) == 0.0


def test_flatten_stats_paths():
    nested = {"qjax_stats": {"block": {"Dense_0": {"qjax": {"lhs": {"amax": jnp.float32(2.0)}}}},
                             "head": {"rhs": {"snr_db": jnp.float32(20.0)}}}}
    flat = stats.flatten_stats(nested, prefix="train")
    assert set(flat) == {"train/block/Dense_0/qjax/lhs/amax", "train/head/rhs/snr_db"}
    assert float(flat["train/head/rhs/snr_db"]) == 20.0


@pytest.mark.parametrize("ratio", [0.5, math.sqrt(3) - 1e-3, math.sqrt(3) + 1e-3, 10.0])
def test_noise_to_gradient_threshold(ratio):
    out = stats.noise_to_gradient_check(jnp.float32(ratio * 2.0), jnp.float32(2.0))
    np.testing.assert_allclose(float(out["ratio"]), ratio, rtol=1e-6)
    assert bool(out["low_precision_effective"]) == (ratio >= math.sqrt(3))


def test_gradient_noise_check_on_a_tree():
    g = {"w": jax.random.normal(jax.random.key(2), (32, 64)), "b": jnp.linspace(-1, 1, 64)}
    out = jax.jit(lambda t: stats.gradient_noise_check(t, "mxfp4"))(g)
    q = {k: mx_fake_quant_ref(np.asarray(v).reshape(-1, 64), "e2m1").reshape(v.shape)
         for k, v in g.items()}
    noise = np.sqrt(sum(np.sum((np.asarray(g[k], np.float64) - q[k]) ** 2) for k in g))
    norm = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in g.values()))
    np.testing.assert_allclose(float(out["noise_norm"]), noise, rtol=1e-5)
    np.testing.assert_allclose(float(out["grad_norm"]), norm, rtol=1e-5)
    assert bool(out["low_precision_effective"]) == (norm / noise >= math.sqrt(3))
    zero = stats.noise_to_gradient_check(jnp.float32(1.0), jnp.float32(0.0))
    assert bool(zero["low_precision_effective"])
