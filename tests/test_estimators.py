"""Tests for qjax.estimators: forward values, gradient rules, errors and JAX transformations.

References are independent: NumPy recomputations of scales and masks (tests/reference.py for MX
and NVFP4 scales and element rounding), the QuEST / Quartet constants from their papers' code, and
a NumPy finite difference of Wang et al.'s smooth quantizer approximation. Compiling dominates the
run time on a small CPU, so most checks put several estimators into one ``jax.jit``.
"""

import doctest
import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax
from qjax import estimators as E
from qjax import formats as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from adversarial import families  # noqa: E402
from reference import mx_scales_ref, nvfp4_scales_ref, rne_sat  # noqa: E402

INT4_PER_CHANNEL = F.Format("int4_per_channel_test", F.IntEncoding(4),
                            F.Scaling(F.PerChannel(), F.FP32))
RANDOM = ("stochastic", "gaussian")


def same_bits(a, b) -> bool:
    """Bit-identical float arrays (any NaN equals any NaN)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    both_nan = np.isnan(a) & np.isnan(b)
    return a.shape == b.shape and bool(np.all(both_nan | (a.view(np.uint32) == b.view(np.uint32))))


def within_one_ulp(a, b) -> bool:
    """Equal up to one float32 ulp: for ``x + noise * step``, which XLA on GPU contracts into a
    fused multiply-add in some programs and not in others (one rounding instead of two)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and bool(np.all(np.abs(a.view(np.int32).astype(np.int64)
                                                     - b.view(np.int32).astype(np.int64)) <= 1))


def call(name, x, fmt="mxfp4", key=None, **options):
    """Calls an estimator by name, with a key only for the random ones."""
    key = key if key is not None else (jax.random.key(7) if name in RANDOM else None)
    return E.get(name)(x, fmt, key=key, **options)


def grad_of(name, x, weights, fmt="mxfp4", **options):
    return jax.grad(lambda v: jnp.sum(call(name, v, fmt, **options) * weights))(x)


def adversarial_inputs() -> np.ndarray:
    fams = families(np.random.default_rng(0))
    keep = ("saturate", "zeros", "outliers", "ties_e2m1", "ties_e4m3", "ties_int8", "neg_zero",
            "mixed_signs", "huge", "nvfp4_ties", "tiny", "octaves70")
    return np.concatenate([fams[k][:8, :64] for k in keep])


# --------------------------------------------------------------------------- registry and errors


def test_registry_names_and_unknown_name():
    assert E.names() == ("ste", "clipped_ste", "stochastic", "quest", "dge", "gaussian")
    assert qjax.estimators is E
    for name in E.names():
        assert callable(E.get(name))
    with pytest.raises(ValueError) as err:
        E.get("sttе")
    for name in E.names():
        assert name in str(err.value)


def test_errors_name_the_problem():
    x = jnp.ones((2, 32))
    for name in RANDOM:
        with pytest.raises(ValueError, match="PRNG key"):
            E.get(name)(x, "mxfp4")
    for name in ("ste", "clipped_ste", "dge", "quest"):
        with pytest.raises(ValueError, match="PRNG key"):
            E.get(name)(x, "mxfp4", rounding="stochastic")
    with pytest.raises(TypeError, match="valid options: .*trust"):
        E.quest(x, "mxfp4", trust_factor=2.0)
    with pytest.raises(ValueError, match="unknown format"):
        E.clipped_ste(x, "mxfp5")
    with pytest.raises(ValueError, match="plain cast"):
        E.quest(x, "bf16")
    with pytest.raises(ValueError, match="rotate=True"):
        E.quest(x, "mxfp4", rotate_back=True)
    with pytest.raises(ValueError, match="rotate=True"):
        E.quest(x, "mxfp4", hadamard_block_size=32)
    with pytest.raises(ValueError, match="binary"):
        E.dge(x, "binary")
    with pytest.raises(ValueError, match="outlier_quantile"):
        E.dge(x, "mxfp4", outlier_quantile=1.5)
    with pytest.raises(ValueError, match="trust"):
        E.quest(x, "mxfp4", trust=0.0)
    with pytest.raises(ValueError, match="rounding='nearest'"):
        E.stochastic(x, "mxfp4", key=jax.random.key(0), rounding="nearest")
    with pytest.raises(ValueError, match="scale_mode"):
        E.dge(x, "nvfp4", scale_mode="rceil")


# --------------------------------------------------------------------------- forward values


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int8", "int4", "ternary", "binary",
                                 "fp8_e4m3", "mxint8", "bf16"])
def test_deterministic_forwards_equal_fake_quant_bit_exactly(fmt):
    x = jnp.asarray(adversarial_inputs())
    key = jax.random.key(3)

    @jax.jit
    def run(x):
        outs = {"fake_quant": qjax.fake_quant(x, fmt),
                "ste": E.ste(x, fmt),
                "clipped_ste": E.clipped_ste(x, fmt),
                "sr_fake_quant": qjax.fake_quant(x, fmt, rounding="stochastic", key=key),
                "stochastic": E.stochastic(x, fmt, key=key),
                "clipped_sr": E.clipped_ste(x, fmt, rounding="stochastic", key=key)}
        if fmt != "binary":
            outs["dge"] = E.dge(x, fmt)
        return outs

    outs = run(x)
    for name in ("ste", "clipped_ste", "dge"):
        if name in outs:
            assert same_bits(outs[name], outs["fake_quant"]), name
    for name in ("stochastic", "clipped_sr"):
        assert same_bits(outs[name], outs["sr_fake_quant"]), name


def test_element_scale_and_step_match_numpy_references():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((8, 64)) * np.exp2(rng.integers(-8, 8, (8, 1)))).astype(np.float32)
    # MX: X per block of 32; step = X * 2^(clamp(floor(log2 |x|/X), 0, 2) - 1) for e2m1.
    X = np.repeat(mx_scales_ref(x, "e2m1"), 32, axis=-1)
    u = np.abs(x) / X
    binade = np.clip(np.floor(np.log2(np.where(u > 0, u, 1.0))), 0, 2)
    step = X * np.exp2(binade - 1)
    got_scale = np.asarray(E.element_scale(x, "mxfp4"))
    got_step = np.asarray(E.quantization_step(x, "mxfp4"))
    np.testing.assert_array_equal(got_scale, X.astype(np.float32))
    np.testing.assert_array_equal(got_step, step.astype(np.float32))
    # NVFP4: block scale times tensor scale, as dequantize computes it.
    s_b, s_t = nvfp4_scales_ref(x)
    expected = (np.repeat(s_b, 16, axis=-1) * s_t).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(E.element_scale(x, "nvfp4")), expected)


# --------------------------------------------------------------------------- clipped STE


def planted_mx_blocks(rng, rows=8):
    """Blocks whose maximum is planted in [4, 8) so the MX floor scale is 1 and values above 7
    saturate by more than half a step; a few values land in (6, 7] (rounding, not clipping)."""
    x = rng.uniform(-4, 4, (rows, 64)).astype(np.float32)
    x[:, 0] = rng.uniform(4, 8, rows)
    x[:, 1] = rng.uniform(6, 7, rows) * rng.choice([-1, 1], rows)
    x[:, 33] = -rng.uniform(7.01, 7.99, rows)
    x[:, 40] = np.float32(7.0)  # exactly half a step above 6: rounds to 6 without saturating
    return x


def test_clipped_ste_mask_matches_numpy_on_planted_saturations():
    rng = np.random.default_rng(2)
    x = planted_mx_blocks(rng)
    X = np.repeat(mx_scales_ref(x, "e2m1"), 32, axis=-1)
    assert np.all(X == 1.0)
    expected_mask = np.abs(x) / X <= 7.0
    assert 0 < np.sum(~expected_mask) < x.size // 4
    weights = rng.standard_normal(x.shape).astype(np.float32)
    grad = np.asarray(jax.jit(lambda v, w: grad_of("clipped_ste", v, w))(x, weights))
    np.testing.assert_array_equal(grad, np.where(expected_mask, weights, 0))
    # The STE passes everything.
    np.testing.assert_array_equal(np.asarray(grad_of("ste", jnp.asarray(x), weights)), weights)


def test_clipped_ste_mask_for_absmax_and_absmean_scales():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 64)) * 3).astype(np.float32)
    x[0, 5] = 40.0  # an outlier: ternary's absmean scale clips it, absmax scales do not
    weights = np.ones_like(x)
    grads = jax.jit(lambda v: {f: grad_of("clipped_ste", v, weights, f)
                               for f in ("ternary", "int8", "nvfp4")})(x)
    # absmax scales map each group's maximum to about E.max: nothing saturates beyond rounding.
    np.testing.assert_array_equal(np.asarray(grads["int8"]), weights)
    np.testing.assert_array_equal(np.asarray(grads["nvfp4"]), weights)
    # ternary: s = mean |x| over the tensor; values beyond 1.5 s saturate.
    s = np.float32(np.sum(np.abs(x), dtype=np.float64) / x.size)
    np.testing.assert_array_equal(np.asarray(grads["ternary"]),
                                  (np.abs(x) <= 1.5 * s).astype(np.float32))


# --------------------------------------------------------------------------- stochastic rounding


def test_stochastic_is_unbiased_and_deterministic_per_key():
    rng = np.random.default_rng(4)
    x = rng.uniform(-4.5, 4.5, (4, 64)).astype(np.float32)
    x[:, ::32] = 5.0  # block maxima 5: scale 1, so no value saturates and SR is unbiased
    keys = jax.random.split(jax.random.key(11), 2000)
    weights = np.full(x.shape, 2.0, np.float32)

    @jax.jit
    def run(x):
        samples = jax.vmap(lambda k: E.stochastic(x, "mxfp4", key=k))(keys)
        return samples, E.stochastic(x, "mxfp4", key=keys[0]), grad_of("stochastic", x, weights)

    samples, again, grad = (np.asarray(a) for a in run(x))
    mean = samples.mean(axis=0)
    standard_error = samples.std(axis=0) / math.sqrt(len(keys)) + 1e-6
    assert np.all(np.abs(mean - x) <= 5 * standard_error + 1e-6)
    assert not np.allclose(samples[0], samples[1])  # different keys, different roundings
    assert same_bits(again, samples[0])
    np.testing.assert_array_equal(grad, weights)


# --------------------------------------------------------------------------- DGE


def smooth_quantizer(u, grid, k):
    """Wang et al.'s power-function approximation of rounding u >= 0 to ``grid`` (float64)."""
    index = np.clip(np.searchsorted(grid, u, side="right") - 1, 0, len(grid) - 2)
    lower, delta = grid[index], grid[index + 1] - grid[index]
    t = 2 * (u - lower) / delta - 1
    return lower + delta / 2 * (1 + np.sign(t) * np.abs(t) ** (1 / k))


@pytest.mark.parametrize("fmt, grid", [
    ("mxfp4", np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])),
    ("int4", np.arange(8.0)),
])
def test_dge_gradient_is_the_derivative_of_the_smooth_quantizer(fmt, grid):
    rng = np.random.default_rng(5)
    top = grid[-1]
    x = rng.uniform(-top, top, (8, 64))
    x[:, ::32] = top  # block maximum = E.max: the scale is exactly 1 (E8M0 and bf16 alike)
    x = x.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(E.element_scale(x, fmt)), 1.0)
    k, clip = 5.0, 3.0
    grad = np.asarray(jax.jit(lambda v: grad_of("dge", v, 1.0, fmt, k=k))(x))
    u = np.abs(x).astype(np.float64)
    h = 1e-5
    finite_difference = (smooth_quantizer(u + h, grid, k) - smooth_quantizer(u - h, grid, k)) / (
        2 * h)
    index = np.clip(np.searchsorted(grid, u, side="right") - 1, 0, len(grid) - 2)
    t = (u - grid[index]) / (grid[index + 1] - grid[index])
    smooth_region = (np.abs(2 * t - 1) > 0.05) & (t > 1e-3) & (t < 1 - 1e-3) & (u < top)
    assert smooth_region.mean() > 0.8
    expected = np.minimum(finite_difference, clip)
    np.testing.assert_allclose(grad[smooth_region], expected[smooth_region], rtol=2e-3)
    # Near the middle of an interval the derivative exceeds the clip; at grid points it is 1/k.
    middle = np.abs(2 * t - 1) < 1e-3
    np.testing.assert_array_equal(grad[middle], clip)
    np.testing.assert_allclose(grad[u == top], 1 / k, rtol=1e-6)
    # k = 1 is the straight-through estimator.
    np.testing.assert_allclose(np.asarray(grad_of("dge", jnp.asarray(x), 1.0, fmt, k=1.0)), 1.0,
                               rtol=1e-6)


def test_dge_zero_gradient_where_saturated():
    x = planted_mx_blocks(np.random.default_rng(6))
    grad = np.asarray(grad_of("dge", jnp.asarray(x), 1.0))
    clipped = np.abs(x) > 7.0
    np.testing.assert_array_equal(grad[clipped], 0.0)
    assert np.all(grad[~clipped] > 0)


def test_dge_outlier_clamping_and_compensation():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    x.flat[rng.choice(x.size, 6, replace=False)] = rng.choice([-1, 1], 6) * 50.0
    q = 0.99
    ordered = np.sort(x.ravel())
    lower, upper = ordered[int((1 - q) * x.size)], ordered[int(q * x.size)]
    clamped = jnp.clip(x, lower, upper)
    expected = qjax.fake_quant(clamped, "mxfp4") + (x - clamped)
    out, grad = jax.jit(lambda v: (E.dge(v, "mxfp4", outlier_quantile=q),
                                   grad_of("dge", v, 1.0, outlier_quantile=q)))(x)
    assert same_bits(out, expected)
    outside = (x < lower) | (x > upper)
    assert outside.sum() >= 6
    np.testing.assert_array_equal(np.asarray(grad)[outside], 1.0)
    inside_grad = np.asarray(grad_of("dge", clamped, 1.0))
    np.testing.assert_array_equal(np.asarray(grad)[~outside], inside_grad[~outside])
    # Without OCC the outliers set their blocks' scales and the rest of those blocks flush to 0.
    plain_error = np.abs(np.asarray(E.dge(x, "mxfp4")) - x)[~outside].max()
    assert np.abs(np.asarray(out) - x)[~outside].max() < plain_error


# --------------------------------------------------------------------------- Gaussian PQT


def test_gaussian_noise_has_the_variance_of_the_rounding_error():
    rng = np.random.default_rng(8)
    x = (rng.standard_normal((4, 64)) * 2).astype(np.float32)
    X = np.repeat(mx_scales_ref(x, "e2m1"), 32, axis=-1)
    u = np.abs(x) / X
    step = X * np.exp2(np.clip(np.floor(np.log2(np.where(u > 0, u, 1.0))), 0, 2) - 1)
    keys = jax.random.split(jax.random.key(12), 512)
    weights = np.full(x.shape, 3.0, np.float32)

    @jax.jit
    def run(x):
        samples = jax.vmap(lambda k: E.gaussian(x, "mxfp4", key=k))(keys)
        return (samples, E.gaussian(x, "mxfp4", key=keys[3]),
                E.gaussian(x, "mxfp4", key=keys[3], noise_scale=0.5),
                grad_of("gaussian", x, weights))

    samples, again, scaled, grad = (np.asarray(a) for a in run(x))
    z = (samples - x) / step  # standardised noise: N(0, 1/12) per element
    n = z.size
    assert abs(z.mean()) < 5 * math.sqrt(1 / 12 / n)
    assert abs(z.var() / (1 / 12) - 1) < 5 * math.sqrt(2 / n)
    assert abs(np.mean(np.abs(z) > 3 * math.sqrt(1 / 12)) - 0.0027) < 0.001  # Gaussian tails
    assert within_one_ulp(again, samples[3])
    np.testing.assert_allclose((scaled - x) / step, z[3] * math.sqrt(3), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(grad, weights)


# --------------------------------------------------------------------------- QuEST


def test_gaussian_clip_ratios_reproduce_the_papers_constants():
    # QuEST's table (IST-DASLab/QuEST, OPTIMAL_GAUSSIAN_SCALES) for centred uniform 2^b-level
    # grids; 1.585 bits is ternary.
    quest_table = {1: 0.7978845587140913, 2: 1.4935346200015913, 3: 2.051068354131873,
                   4: 2.513930578568423}
    for bits, alpha in quest_table.items():
        grid = tuple(np.arange(2 ** bits // 2) + 0.5)
        assert E._mse_optimal_clip(grid) == pytest.approx(alpha, rel=1e-4)
    assert E.gaussian_clip_ratio("ternary") == pytest.approx(1.2240089519030855, rel=1e-5)
    assert E.gaussian_clip_ratio("binary") == pytest.approx(math.sqrt(2 / math.pi), rel=1e-6)
    # Quartet's MXFP4 forward (IST-DASLab/Quartet): gaussian_scale = 2.92247856 / 6.
    assert E.gaussian_clip_ratio("mxfp4") == pytest.approx(2.92247856, rel=1e-5)
    assert E.gaussian_clip_ratio("nvfp4") == E.gaussian_clip_ratio("mxfp4")


def quest_inputs(rng):
    z = rng.standard_normal((8, 64)).astype(np.float32)
    z[0, 3], z[5, 40] = 9.0, -12.0  # outliers far outside the Gaussian clipping range
    return z


def test_quest_forward_matches_reference_composition():
    rng = np.random.default_rng(9)
    z = quest_inputs(rng)
    alpha_fp4, alpha_int4 = E.gaussian_clip_ratio("mxfp4"), E.gaussian_clip_ratio(
        INT4_PER_CHANNEL)
    out_fp4, out_int4, (_, scale_int4) = jax.jit(lambda v: (
        E.quest(v, "mxfp4"), E.quest(v, INT4_PER_CHANNEL),
        E._quantize_with_scale(v, INT4_PER_CHANNEL, 1, "nearest", None, "floor", alpha_int4)))(z)
    # MXFP4: the E8M0 scale the format picks for a block maximum of c = alpha * RMS (OCP floor).
    z64 = z.astype(np.float64).reshape(8, 2, 32)
    c = alpha_fp4 * np.sqrt(np.mean(z64**2, axis=-1, keepdims=True))
    X = np.exp2(np.floor(np.log2(c)) - 2)
    expected = (rne_sat(z64 / X, "e2m1") * X).reshape(8, 64).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out_fp4), expected)
    # INT4 per channel, FP32 scale s = c / 7; values round(z / s) clamped to [-7, 7], times s.
    c = alpha_int4 * np.sqrt(np.mean(z.astype(np.float64) ** 2, axis=-1, keepdims=True))
    scale_int4 = np.asarray(scale_int4)
    np.testing.assert_allclose(scale_int4, np.broadcast_to(c / 7, z.shape), rtol=1e-6)
    s = scale_int4[:, :1]
    reciprocal = (np.float32(1) / s).astype(np.float32)
    expected = (np.clip(np.rint(z * reciprocal), -7, 7) * s).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out_int4), expected)


def test_quest_trust_mask():
    rng = np.random.default_rng(10)
    z = quest_inputs(rng)
    alpha = E.gaussian_clip_ratio("mxfp4")

    @jax.jit
    def run(v):
        return (E._quantize_with_scale(v, F.get("mxfp4"), 1, "nearest", None, "floor", alpha),
                grad_of("quest", v, 1.0), grad_of("quest", v, 1.0, trust=0.5))

    (value, scale), grad, grad_half = run(z)
    value, scale = np.asarray(value, np.float64), np.asarray(scale, np.float64)
    u = np.abs(z) / scale
    # trust = 1: everything within the range passes; values clipped by more than half a step
    # (beyond (6 + 1) * scale for E2M1) do not.
    np.testing.assert_array_equal(np.asarray(grad), (u <= 7.0).astype(np.float32))
    assert grad[0, 3] == 0 and grad[5, 40] == 0
    assert 2 / z.size <= 1 - np.asarray(grad).mean() < 0.15  # the planted outliers, and a few
    # trust = 1/2: |z - q| <= step / 4, step the grid spacing at |z| (NumPy recomputation).
    binade = np.clip(np.floor(np.log2(np.where(u > 0, np.minimum(u, 6.0), 1.0))), 0, 2)
    step = np.exp2(binade - 1) * scale
    expected = np.abs(z - value) <= 0.25 * step
    np.testing.assert_array_equal(np.asarray(grad_half), expected.astype(np.float32))
    assert np.asarray(grad_half).mean() < np.asarray(grad).mean()


def test_quest_rotation_domains_and_gradient():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[1, 7] = 30.0  # the rotation spreads this outlier over its block
    signs = qjax.random_signs(jax.random.key(2), 32)
    rotation = dict(hadamard_block_size=32, signs=signs)
    weights = rng.standard_normal(x.shape).astype(np.float32)

    @jax.jit
    def run(x):
        z = qjax.hadamard(x, block_size=32, signs=signs)
        in_rotated = E.quest(x, "mxfp4", rotate=True, **rotation)
        of_rotated = E.quest(z, "mxfp4")
        restored = E.quest(x, "mxfp4", rotate=True, rotate_back=True, **rotation)
        grad_x = jax.grad(lambda v: jnp.sum(
            E.quest(v, "mxfp4", rotate=True, **rotation) * weights))(x)
        grad_z = jax.grad(lambda v: jnp.sum(E.quest(v, "mxfp4") * weights))(z)
        return in_rotated, of_rotated, restored, grad_x, grad_z

    in_rotated, of_rotated, restored, grad_x, grad_z = run(x)
    assert same_bits(in_rotated, of_rotated)
    back = qjax.hadamard(restored, block_size=32, signs=signs)
    np.testing.assert_allclose(np.asarray(back), np.asarray(of_rotated), atol=1e-5)
    # The quantized value rotated back is close to x (quantization error only).
    assert np.abs(np.asarray(restored) - x).max() < 0.5 * np.abs(x).max()
    # Chain rule: the mask lives in the rotated domain, the cotangent is rotated back.
    expected = qjax.inverse_hadamard(grad_z, block_size=32, signs=signs)
    np.testing.assert_allclose(np.asarray(grad_x), np.asarray(expected), atol=1e-5)
    # Rotating spreads the outlier: the rotated operand has a smaller quantization error.
    plain = np.asarray(E.quest(x, "mxfp4"))
    assert np.linalg.norm(np.asarray(restored) - x) < np.linalg.norm(plain - x)


# --------------------------------------------------------------------------- JAX transformations

CONFIGS = [("ste", {}), ("clipped_ste", {}), ("stochastic", {}), ("dge", {}),
           ("dge", {"outlier_quantile": 0.99}), ("quest", {}),
           ("quest", {"rotate": True, "rotate_back": True, "hadamard_block_size": 32}),
           ("gaussian", {})]


@pytest.mark.parametrize("name, options", CONFIGS, ids=lambda c: str(c))
def test_jit_vmap_grad_scan_remat(name, options):
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((3, 4, 64)) * 2).astype(np.float32)
    weights = rng.standard_normal(x.shape[1:]).astype(np.float32)
    key = jax.random.key(5)

    def f(v, k):
        return call(name, v, key=k if name in RANDOM else None, **options)

    def loss(v, k):
        return jnp.sum(f(v, k) * weights)

    eager = [f(x[i], key) for i in range(3)]
    eager_grads = [jax.grad(loss)(x[i], key) for i in range(3)]

    @jax.jit
    def transformed(x):
        jitted = jax.vmap(f, in_axes=(0, None))(x, key)
        grads = jax.vmap(jax.grad(loss), in_axes=(0, None))(x, key)
        remat_grad = jax.grad(jax.checkpoint(loss))(x[0], key)

        def step(total, v):
            return total + jax.grad(loss)(v, key), None

        scanned, _ = jax.lax.scan(step, jnp.zeros_like(x[0]), x)
        return jitted, grads, remat_grad, scanned

    jitted, grads, remat_grad, scanned = transformed(x)
    for i in range(3):
        # quest's own rotation runs a float32 GEMM whose rounding XLA may fuse differently.
        if name == "quest" and options.get("rotate"):
            np.testing.assert_allclose(np.asarray(jitted[i]), np.asarray(eager[i]), atol=1e-5)
        elif name == "gaussian":
            assert within_one_ulp(jitted[i], eager[i]), i
        else:
            assert same_bits(jitted[i], eager[i]), i
        np.testing.assert_allclose(np.asarray(grads[i]), np.asarray(eager_grads[i]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(remat_grad), np.asarray(eager_grads[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(sum(eager_grads)), atol=1e-4)


@pytest.mark.parametrize("name, options", CONFIGS, ids=lambda c: str(c))
def test_bfloat16_inputs(name, options):
    rng = np.random.default_rng(13)
    x = (rng.standard_normal((4, 64)) * 2).astype(ml_dtypes.bfloat16)
    x32 = x.astype(np.float32)

    @jax.jit
    def run(x, x32):
        out = call(name, x, **options)
        grad = jax.grad(lambda v: jnp.sum(call(name, v, **options).astype(jnp.float32)))(x)
        return out, call(name, x32, **options), grad

    out, out32, grad = run(x, x32)
    assert out.dtype == jnp.bfloat16 and grad.dtype == jnp.bfloat16
    if name == "quest" and options.get("rotate"):  # rotated back in float32, then rounded once
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out32), rtol=1e-2,
                                   atol=1e-2)
    else:
        assert same_bits(np.asarray(out, np.float32),
                         np.asarray(out32.astype(jnp.bfloat16), np.float32))


def test_doctests():
    result = doctest.testmod(E, extraglobs={"jax": jax, "jnp": jnp, "np": np},
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0
