import functools
import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import qjax
from qjax import formats as F
from qjax.pallas import fake_quant_pallas
from qjax.quantize import decode, encode, round_to_element

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import nvfp4_fake_quant_ref  # noqa: E402

SMALL_FLOATS = {  # every float element encoding of <= 8 bits that we name, plus sweep encodings
    "e4m3fn": F.FloatEncoding(4, 3, "fn"),
    "e5m2": F.FloatEncoding(5, 2, "ieee"),
    "e3m2": F.FloatEncoding(3, 2, "none"),
    "e2m3": F.FloatEncoding(2, 3, "none"),
    "e2m1": F.FloatEncoding(2, 1, "none"),
    "e3m4": F.FloatEncoding(3, 4, "none"),
    "e3m4_ieee": F.FloatEncoding(3, 4, "ieee"),
    "e1m2": F.FloatEncoding(1, 2, "none"),
    "e4m3_ieee": F.FloatEncoding(4, 3, "ieee"),
    "e5m2fn": F.FloatEncoding(5, 2, "fn"),
    "ue5m3": F.FloatEncoding(5, 3, "fn", signed=False),
}
ML = {
    "e4m3fn": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
    "e3m2": ml_dtypes.float6_e3m2fn,
    "e2m3": ml_dtypes.float6_e2m3fn,
    "e2m1": ml_dtypes.float4_e2m1fn,
    "e3m4_ieee": ml_dtypes.float8_e3m4,
}
MX_NAMES = ("mxfp8", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8")


def as_bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def assert_bitwise_equal(actual, expected):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    both_nan = np.isnan(actual) & np.isnan(expected)
    mismatch = (as_bits(actual) != as_bits(expected)) & ~both_nan
    assert not mismatch.any(), (
        f"{mismatch.sum()} mismatches, e.g. at {np.argwhere(mismatch)[:3].tolist()}: "
        f"{actual[mismatch][:5]} vs {expected[mismatch][:5]}")


def edge_inputs(encoding, rng):
    """Dense random values over the encoding's range, plus ties, ±max, beyond max, subnormals, ±0."""
    grid = np.asarray(decode(jnp.arange(2**encoding.bits, dtype=jnp.uint32), encoding))
    grid = np.unique(grid[np.isfinite(grid)])
    midpoints = (grid[1:] + grid[:-1]) / 2
    dense = np.concatenate([
        rng.uniform(-encoding.max * 1.2, encoding.max * 1.2, 4000),
        np.exp2(rng.uniform(np.log2(encoding.min_subnormal) - 4, np.log2(encoding.max) + 2, 4000))
        * rng.choice([-1, 1], 4000),
    ])
    nudged = np.concatenate([np.nextafter(midpoints.astype(np.float32), np.float32(np.inf)),
                             np.nextafter(midpoints.astype(np.float32), np.float32(-np.inf))])
    specials = [0.0, -0.0, encoding.max, -encoding.max, encoding.max * 1.01, encoding.max * 4,
                encoding.min_subnormal / 2, -encoding.min_subnormal / 2, encoding.min_subnormal * 0.75,
                1e-30, -1e-30, 1e-45, np.finfo(np.float32).tiny / 3]
    return np.concatenate([dense, grid, midpoints, nudged, specials]).astype(np.float32)


# --------------------------------------------------------------------------- element rounding


@pytest.mark.parametrize("name", list(SMALL_FLOATS))
def test_every_code_round_trips(name):
    encoding = SMALL_FLOATS[name]
    codes = jnp.arange(2**encoding.bits, dtype=jnp.uint32)
    values = decode(codes, encoding)
    finite = np.isfinite(np.asarray(values))
    assert np.array_equal(np.asarray(encode(values, encoding))[finite], np.asarray(codes)[finite])
    assert_bitwise_equal(round_to_element(values, encoding, saturate=False), values)
    nan_codes = np.asarray(codes)[np.isnan(np.asarray(values))]
    if encoding.specials == "none":
        assert nan_codes.size == 0 and finite.all()
    if encoding.specials == "fn":
        mask = (1 << (encoding.exponent_bits + encoding.mantissa_bits)) - 1
        assert sorted(set((nan_codes & mask).tolist())) == [mask]
    assert float(np.nanmax(np.where(finite, values, np.nan))) == encoding.max


@pytest.mark.parametrize("name", list(ML))
def test_rounding_matches_ml_dtypes(name):
    encoding, dtype = SMALL_FLOATS[name], ML[name]
    x = edge_inputs(encoding, np.random.default_rng(0))
    expected = np.clip(x, -encoding.max, encoding.max).astype(dtype)
    ours = round_to_element(jnp.asarray(x), encoding)
    assert_bitwise_equal(ours, expected.astype(np.float32))
    codes = np.asarray(encode(ours, encoding))
    assert np.array_equal(codes, expected.view(np.uint8).astype(np.uint32))


@pytest.mark.parametrize("name,dtype", [("bf16", ml_dtypes.bfloat16), ("fp16", np.float16)])
def test_non_saturating_wide_formats_equal_the_cast(name, dtype):
    encoding = F.get(name).element
    rng = np.random.default_rng(1)
    x = np.concatenate([
        rng.standard_normal(5000) * 10.0 ** rng.uniform(-45, 38, 5000),
        [np.inf, -np.inf, np.nan, 0.0, -0.0, encoding.max * 1.001, 65520.0, 65519.0],
    ]).astype(np.float32)
    expected = x.astype(dtype).astype(np.float32)
    assert_bitwise_equal(round_to_element(jnp.asarray(x), encoding, saturate=False), expected)
    assert_bitwise_equal(qjax.fake_quant(jnp.asarray(x), name), expected)


def test_satfinite_specials():
    e4m3 = SMALL_FLOATS["e4m3fn"]
    out = np.asarray(round_to_element(jnp.array([np.inf, -np.inf, np.nan, 1e9]), e4m3))
    assert out[0] == 448 and out[1] == -448 and np.isnan(out[2]) and out[3] == 448
    fp4 = round_to_element(jnp.array([np.nan, np.inf]), SMALL_FLOATS["e2m1"])
    assert np.asarray(fp4).tolist() == [0.0, 6.0]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_integer_codes_round_trip(bits):
    encoding = F.IntEncoding(bits)
    k = jnp.arange(-encoding.max_code, encoding.max_code + 1).astype(jnp.float32)
    assert np.array_equal(np.asarray(decode(encode(k, encoding), encoding)), np.asarray(k))
    x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -200.0, 0.49])
    expected = np.clip(np.round(np.asarray(x)), -encoding.max_code, encoding.max_code)
    assert np.array_equal(np.asarray(round_to_element(x, encoding)), expected)


# --------------------------------------------------------------------------- scaled formats


@pytest.mark.parametrize("name", MX_NAMES)
def test_every_value_times_every_scale_is_exact(name):
    fmt = F.get(name)
    element = fmt.element
    grid = np.asarray(decode(jnp.arange(2**element.bits, dtype=jnp.uint32), element))
    grid = grid[np.isfinite(grid) & (np.abs(grid) <= element.max)]  # int8 code -128 is unused
    # Blocks of 31 grid values plus the element max, so each block's floor scale is exactly 2**k.
    grid = np.concatenate([grid, np.zeros(-grid.size % 31, np.float32)]).reshape(-1, 31)
    grid = np.concatenate([grid, np.full((grid.shape[0], 1), element.max, np.float32)], 1).ravel()
    lowest = max(-127, -149 - int(np.log2(element.min_subnormal)))
    highest = 127 - element.emax
    rows = [grid * np.float32(2.0**k) for k in range(lowest, highest + 1)]
    x = jnp.asarray(np.stack(rows).astype(np.float32))
    blocks = x.reshape(x.shape[0], -1, 32)
    assert bool(jnp.all(jnp.max(jnp.abs(blocks), -1) == jnp.max(jnp.abs(blocks), (-1, -2))[:, None]))
    assert_bitwise_equal(qjax.fake_quant(x, fmt), x)


def test_nvfp4_every_block_scale_with_every_value_is_exact():
    e2m1 = np.asarray(decode(jnp.arange(16, dtype=jnp.uint32), F.E2M1_ELEM))
    e4m3 = np.asarray(decode(jnp.arange(1, 127, dtype=jnp.uint32), F.E4M3_ELEM))  # positive scales
    # Tensor amax 2688 = 6 * 448 makes the tensor scale exactly 1; each block's max 6*s_b makes its
    # block scale exactly s_b.
    x = (e2m1[None, :] * e4m3[:, None]).astype(np.float32)
    x[:, 7] = 6 * e4m3
    x = np.concatenate([x, np.full((1, 16), 2688.0, np.float32)])
    q = qjax.quantize(jnp.asarray(x), "nvfp4")
    assert float(q.tensor_scale.reshape(())) == 1.0
    assert_bitwise_equal(q.dequantize(), x)


def test_mx_scale_modes_differ_where_the_spec_says():
    x = jnp.array([[7.0] + [0.0] * 31, [6.0] + [0.0] * 31, [0.1] + [0.0] * 31])
    floor = qjax.quantize(x, "mxfp4", scale_mode="floor")
    rceil = qjax.quantize(x, "mxfp4", scale_mode="rceil")
    # floor: 2^(floor(log2 7) - 2) = 1, so 7 saturates to 6; rceil: 2^ceil(log2(7/6)) = 2, 3.5 -> 4.
    assert np.asarray(floor.scales.astype(jnp.float32))[:, 0].tolist() == [1.0, 1.0, 2.0**-6]
    assert np.asarray(rceil.scales.astype(jnp.float32))[:, 0].tolist() == [2.0, 1.0, 2.0**-5]
    assert np.asarray(floor.dequantize())[:, 0].tolist() == [6.0, 6.0, np.float32(0.09375)]
    assert np.asarray(rceil.dequantize())[:, 0].tolist() == [8.0, 6.0, np.float32(0.09375)]


@pytest.mark.parametrize("name", MX_NAMES + ("nvfp4", "fp8_e4m3", "int8", "int4"))
def test_zero_nan_and_inf_groups(name):
    fmt = F.get(name)
    block = fmt.block_size or 32
    x = np.random.default_rng(2).standard_normal((4, 4 * block)).astype(np.float32)
    x[0, :block] = 0.0
    q = qjax.quantize(jnp.asarray(x), name)
    out = np.asarray(q.dequantize())
    assert (out[0, :block] == 0).all()
    x[1, 2] = np.nan
    x[2, block + 1] = np.inf
    out = np.asarray(qjax.fake_quant(jnp.asarray(x), name))
    if fmt.scaling.tensor_scale or isinstance(fmt.scaling.granularity, F.PerTensor):
        assert np.isnan(out).all()  # the group is the whole tensor
    elif isinstance(fmt.scaling.granularity, F.PerChannel):
        assert np.isnan(out[1:3]).all() and not np.isnan(out[[0, 3]]).any()
    else:
        assert np.isnan(out[1, :block]).all() and np.isnan(out[2, block:2 * block]).all()
        assert np.isnan(out).sum() == 2 * block


def test_nvfp4_tiny_block_next_to_a_huge_one_flushes_to_zero():
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 1e4
    x[0, 16:] = 1e-6  # block scale underflows E4M3 relative to the tensor scale
    q = qjax.quantize(jnp.asarray(x), "nvfp4")
    assert float(q.scales.astype(jnp.float32)[0, 1]) == 0.0
    assert (np.asarray(q.dequantize())[0, 16:] == 0).all()


@pytest.mark.parametrize("magnitude", [1e-36, 3e-36])
def test_nvfp4_tiny_tensor_keeps_its_resolution(magnitude):
    # amax / 2688 would be a subnormal tensor scale, which XLA flushes to 0 (all zeros came out):
    # the floor 2**-126 keeps it and its reciprocal normal, so the tensor quantizes as the
    # reference says, with the error of a normal-sized tensor.
    x = jax.random.normal(jax.random.key(4), (8, 64)) * np.float32(magnitude)
    q = qjax.quantize(x, "nvfp4")
    assert float(q.tensor_scale.reshape(())) == 2.0**-126
    out = np.asarray(q.dequantize())
    assert_bitwise_equal(out, nvfp4_fake_quant_ref(np.asarray(x)))
    assert_bitwise_equal(qjax.fake_quant(x, "nvfp4"), out)
    amax = float(jnp.max(jnp.abs(x)))
    assert np.max(np.abs(out - np.asarray(x))) / amax < 0.2 and np.mean(out != 0) > 0.9


def test_nvfp4_subnormal_tensor_gives_no_nan():
    x = np.zeros((2, 32), np.float32)
    x[0, :16] = 1e-42  # every value subnormal; the other blocks all zero
    out = np.asarray(qjax.fake_quant(jnp.asarray(x), "nvfp4"))
    assert np.isfinite(out).all() and np.all(np.abs(out) <= 2e-42)


def test_ternary_and_binary_follow_bitnet():
    w = jnp.array([[0.05, -0.5, 0.2, 1.0, -0.01, 0.3]])
    gamma = float(jnp.mean(jnp.abs(w)))
    expected = np.clip(np.round(np.asarray(w) / np.float32(gamma)), -1, 1) * np.float32(gamma)
    assert np.allclose(np.asarray(qjax.fake_quant(w, "ternary")), expected, rtol=1e-6)
    assert np.allclose(np.asarray(qjax.fake_quant(w, "binary")), np.sign(np.asarray(w)) * gamma)
    assert set(np.asarray(qjax.quantize(w, "ternary").values).ravel().tolist()) <= {-1, 0, 1}


def test_padding_equals_explicit_zero_padding():
    x = jax.random.normal(jax.random.key(3), (5, 50))
    padded = jnp.pad(x, [(0, 0), (0, 14)])
    for name in ("mxfp4", "nvfp4", "int4"):
        assert_bitwise_equal(qjax.fake_quant(x, name), qjax.fake_quant(padded, name)[:, :50])
    q = qjax.quantize(x, "mxfp4")
    assert q.values.shape == (5, 50) and q.scales.shape == (5, 2)


def test_axis_selects_the_block_direction():
    x = jax.random.normal(jax.random.key(4), (64, 96))
    assert_bitwise_equal(qjax.fake_quant(x, "mxfp8", axis=0), qjax.fake_quant(x.T, "mxfp8").T)
    q = qjax.quantize(x, "mxfp8", axis=0)
    assert q.scales.shape == (2, 96) and q.axis == -2


def test_tiles_quantize_w_and_its_transpose_identically():
    tile = F.Format("nvfp4_16x16", F.E2M1_ELEM, F.Scaling(F.Tile(16, 16), F.E4M3, tensor_scale=True))
    w = jax.random.normal(jax.random.key(5), (48, 80))
    assert_bitwise_equal(qjax.fake_quant(w, tile, axis=0), qjax.fake_quant(w.T, tile, axis=1).T)
    q = qjax.quantize(w, tile, axis=0)
    assert q.scales.shape == (3, 5)
    blocks = F.Format("fp8_128", F.E4M3_ELEM, F.Scaling(F.Tile(128, 128), F.FP32))
    assert qjax.quantize(jnp.ones((3, 256, 130)), blocks, axis=-1).scales.shape == (3, 2, 2)


# --------------------------------------------------------------------------- stochastic rounding


@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "mxfp6_e3m2", "int8", "bf16", "ternary"])
def test_stochastic_rounding_is_unbiased_with_the_right_variance(name):
    x = jax.random.normal(jax.random.key(6), (1, 64)) * 3.0
    x = x.at[0, 0].set(-7.0).at[0, 1].set(1e-3)
    n = 4096
    keys = jax.random.split(jax.random.key(7), n)
    sample = jax.vmap(lambda k: qjax.fake_quant(x, name, rounding="stochastic", key=k))(keys)
    # The grid points around each x (the scale does not depend on the draw).
    nearest = qjax.fake_quant(x, name)
    lo = jnp.min(sample, 0)
    hi = jnp.max(sample, 0)
    assert bool(jnp.all((sample == lo) | (sample == hi)))
    # Unbiased wherever nothing saturates: keep values well inside every format's range (a block
    # saturates above 0.75 of its amax at the worst; ternary above its absmean scale).
    block_amax = jnp.repeat(jnp.max(jnp.abs(x).reshape(1, -1, 16), -1), 16, axis=-1)
    limit = jnp.mean(jnp.abs(x)) if name == "ternary" else 0.7 * block_amax
    inside = jnp.abs(x) < limit
    assert int(inside.sum()) >= 20
    lo, hi, x, sample, nearest = lo[inside], hi[inside], x[inside], sample[:, inside], nearest[inside]
    assert bool(jnp.all((lo <= x) & (x <= hi)))
    p = jnp.where(hi > lo, (x - lo) / (hi - lo), 0.0)
    mean = jnp.mean(sample, 0)
    std_error = (hi - lo) * jnp.sqrt(p * (1 - p) / n)
    assert bool(jnp.all(jnp.abs(mean - x) <= 5 * std_error + 1e-7 * jnp.abs(x))), name
    var = jnp.var(sample, 0)
    theory = (hi - lo) ** 2 * p * (1 - p)
    informative = theory > 0
    ratio = var[informative] / theory[informative]
    assert 0.8 < float(jnp.median(ratio)) < 1.2
    assert bool(jnp.all((nearest == lo) | (nearest == hi)))


def test_stochastic_rounding_is_deterministic_per_key_and_needs_one():
    x = jax.random.normal(jax.random.key(8), (4, 64))
    a = qjax.fake_quant(x, "mxfp4", rounding="stochastic", key=jax.random.key(1))
    b = qjax.fake_quant(x, "mxfp4", rounding="stochastic", key=jax.random.key(1))
    c = qjax.fake_quant(x, "mxfp4", rounding="stochastic", key=jax.random.key(2))
    assert bool(jnp.all(a == b)) and not bool(jnp.all(a == c))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        qjax.fake_quant(x, "mxfp4", rounding="stochastic")
    legacy = qjax.fake_quant(x, "mxfp4", rounding="stochastic", key=jax.random.PRNGKey(1))
    assert legacy.shape == x.shape


def test_stochastic_rounding_of_values_far_below_the_grid():
    # 1e-3 * 2^-10 of a step: rounds up with that probability, never more than one step.
    x = jnp.full((1 << 16,), 2.0**-30, jnp.float32)
    out = qjax.fake_quant(x, "fp16", rounding="stochastic", key=jax.random.key(9))
    step = 2.0**-24
    ups = float(jnp.sum(out == step))
    assert float(jnp.sum((out != 0) & (out != step))) == 0
    expected = x.size * 2.0**-6
    assert abs(ups - expected) < 5 * np.sqrt(expected)


# --------------------------------------------------------------------------- properties


finite_rows = st.lists(
    st.floats(-2.0**100, 2.0**100, allow_nan=False, allow_infinity=False, width=32), min_size=32, max_size=32)


@settings(max_examples=40, deadline=None)
@given(row=finite_rows, name=st.sampled_from(MX_NAMES + ("nvfp4", "fp8_e4m3", "int4")))
def test_idempotent_and_sign_symmetric(row, name):
    x = jnp.asarray(np.array(row, np.float32)[None])
    fq = _jit_fake_quant(name)
    once = fq(x)
    if name in MX_NAMES:  # exact power-of-two scales; a float scale recomputed from the rounded
        assert_bitwise_equal(fq(once), once)  # amax may move by an ulp, so others are near-idempotent
    else:
        np.testing.assert_allclose(np.asarray(fq(once)), np.asarray(once), rtol=1e-6)
    assert np.array_equal(np.asarray(fq(-x)), -np.asarray(once))  # integers have no -0


@settings(max_examples=40, deadline=None)
@given(row=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=32, max_size=32),
       shift=st.integers(-60, 60), name=st.sampled_from(MX_NAMES))
def test_mx_is_invariant_to_power_of_two_rescaling(row, shift, name):
    x = np.array(row, np.float32)[None]
    if np.abs(x).max() < 1e-3:
        return  # keep scales away from the E8M0 clamp at 2^-127
    fq = _jit_fake_quant(name)
    scaled = fq(jnp.asarray(x * np.float32(2.0**shift)))
    assert_bitwise_equal(scaled, np.asarray(fq(jnp.asarray(x))) * np.float32(2.0**shift))


@settings(max_examples=40, deadline=None)
@given(row=finite_rows, name=st.sampled_from(MX_NAMES + ("nvfp4", "int8")))
def test_monotone_within_a_block(row, name):
    x = np.sort(np.array(row, np.float32))[None]
    out = np.asarray(_jit_fake_quant(name)(jnp.asarray(x)))
    assert (np.diff(out[0]) >= 0).all()


@functools.cache
def _jit_fake_quant(name):
    return jax.jit(lambda x: qjax.fake_quant(x, name))


# --------------------------------------------------------------------------- transformations


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", ["mxfp4", "nvfp4", "fp8_e4m3", "mxfp6_e2m3", "int8", "bf16"])
def test_dtypes_jit_and_dequantize_agree(name, dtype):
    x = (jax.random.normal(jax.random.key(10), (8, 64)) * 4).astype(dtype)
    fq = jax.jit(qjax.fake_quant, static_argnums=1)(x, name)
    assert fq.dtype == dtype and fq.shape == x.shape
    q = jax.jit(qjax.quantize, static_argnums=1)(x, name)
    assert q.dequantize().dtype == dtype
    assert_bitwise_equal(q.dequantize().astype(jnp.float32), fq.astype(jnp.float32))
    assert_bitwise_equal(qjax.fake_quant(x, name).astype(jnp.float32), fq.astype(jnp.float32))


def test_grad_is_straight_through():
    x = jax.random.normal(jax.random.key(11), (4, 32))
    g = jax.grad(lambda x: jnp.sum(qjax.fake_quant(x, "mxfp4") * jnp.arange(32.0)))(x)
    assert_bitwise_equal(g, jnp.broadcast_to(jnp.arange(32.0), x.shape))
    g = jax.grad(lambda x: jnp.sum(qjax.fake_quant(x, "nvfp4", rounding="stochastic",
                                                   key=jax.random.key(0)) ** 2))(x)
    assert g.shape == x.shape
    _, tangent = jax.jvp(lambda x: qjax.fake_quant(x, "mxfp8"), (x,), (jnp.ones_like(x),))
    assert bool(jnp.all(tangent == 1))


def test_vmap_scan_and_remat():
    xs = jax.random.normal(jax.random.key(12), (3, 4, 64))
    per_example = jnp.stack([qjax.fake_quant(x, "nvfp4") for x in xs])
    assert_bitwise_equal(jax.vmap(lambda x: qjax.fake_quant(x, "nvfp4"))(xs), per_example)
    qs = jax.vmap(lambda x: qjax.quantize(x, "nvfp4"))(xs)
    assert qs.values.shape == (3, 4, 64) and qs.tensor_scale.shape == (3, 1, 1)
    assert_bitwise_equal(qs.dequantize(), per_example)  # leading batch axis from vmap

    def body(carry, x):
        q = qjax.quantize(x, "mxfp4")
        return carry + jnp.sum(q.dequantize()), q

    total, stacked = jax.lax.scan(body, 0.0, xs)
    assert_bitwise_equal(stacked.dequantize(), jax.vmap(lambda x: qjax.fake_quant(x, "mxfp4"))(xs))
    assert np.isclose(float(total), float(jnp.sum(stacked.dequantize())))
    remat = jax.grad(jax.checkpoint(lambda x: jnp.sum(qjax.fake_quant(x, "mxfp8") ** 2)))(xs)
    assert_bitwise_equal(remat, 2 * qjax.fake_quant(xs, "mxfp8"))


def test_sharded_inputs_give_the_unsharded_result():
    devices = np.array(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(devices.reshape(2, 4), ("data", "model"))
    x = jax.random.normal(jax.random.key(13), (16, 256))
    sharded = jax.device_put(x, NamedSharding(mesh, P("data", "model")))
    for name in ("mxfp4", "nvfp4", "fp8_e4m3"):
        out = jax.jit(lambda x: qjax.fake_quant(x, name))(sharded)
        assert_bitwise_equal(out, qjax.fake_quant(x, name))
        q = jax.jit(lambda x: qjax.quantize(x, name))(sharded)
        assert_bitwise_equal(q.dequantize(), qjax.fake_quant(x, name))


# --------------------------------------------------------------------------- packing and errors


@pytest.mark.parametrize("name", list(F.names()))
def test_packing_round_trips_exactly(name):
    x = jax.random.normal(jax.random.key(14), (6, 70)) * 5
    q = qjax.quantize(x, name)
    packed = q.pack()
    assert packed.nbytes == q.nbytes_packed
    bits = F.get(name).element.bits
    assert packed.data.shape == (6, -(-70 * bits // 8))
    back = packed.unpack()
    assert back.values.dtype == q.values.dtype
    assert np.array_equal(np.asarray(back.codes()), np.asarray(q.codes()))
    assert_bitwise_equal(back.dequantize().astype(jnp.float32), q.dequantize().astype(jnp.float32))


def test_fp4_packs_two_per_byte_low_nibble_first():
    x = jnp.array([[0.5, 6.0, -1.0, 0.0] + [0.0] * 28])  # scale 1: codes 1, 7, 0b1010, 0
    packed = qjax.quantize(x, "mxfp4").pack()
    assert np.asarray(packed.data)[0, :2].tolist() == [0x71, 0x0A]
    assert qjax.quantize(jnp.ones((1, 32)), "mxfp6_e2m3").pack().data.shape == (1, 24)


def test_clear_errors():
    x = jnp.ones((4, 32))
    with pytest.raises(ValueError, match="unknown format 'fp3'.*valid names"):
        qjax.quantize(x, "fp3")
    with pytest.raises(ValueError, match="axis 2 is out of range.*rank 2"):
        qjax.quantize(x, "mxfp4", axis=2)
    with pytest.raises(ValueError, match="unknown rounding 'up'"):
        qjax.fake_quant(x, "mxfp4", rounding="up")
    with pytest.raises(ValueError, match="unknown scale_mode 'ceil'.*floor, rceil"):
        qjax.fake_quant(x, "mxfp4", scale_mode="ceil")
    with pytest.raises(ValueError, match="E8M0"):
        qjax.fake_quant(x, "nvfp4", scale_mode="rceil")
    with pytest.raises(TypeError, match="floating-point input"):
        qjax.quantize(jnp.ones((4, 32), jnp.int32), "mxfp4")
    tile = F.Format("t", F.E4M3_ELEM, F.Scaling(F.Tile(16, 16), F.FP32))
    with pytest.raises(ValueError, match="rank >= 2"):
        qjax.quantize(jnp.ones((64,)), tile)
    with pytest.raises(ValueError, match="rank >= 1"):
        qjax.quantize(jnp.float32(1.0), "mxfp4")


def test_reciprocal_is_correctly_rounded():
    from qjax.quantize import _reciprocal  # float division is not correctly rounded on every GPU

    rng = np.random.default_rng(15)
    d = np.concatenate([np.exp2(rng.uniform(-149, 128, 100000)),
                        [1.0, 2.0, 3.0, 6.0, 2688.0, 2.0**-126, 7e-39, 1e-45, 3e38, np.inf, np.nan]])
    d = d.astype(np.float32)
    with np.errstate(all="ignore"):
        expected = np.float32(1) / d
    assert_bitwise_equal(jax.jit(_reciprocal)(jnp.asarray(d)), expected)


# --------------------------------------------------------------------------- stochastic_bits


def test_stochastic_bits_are_uniform_keyed_and_depend_on_the_flat_index_only():
    key = jax.random.key(0)
    bits = qjax.stochastic_bits(key, (256, 1024))
    assert bits.dtype == jnp.uint32 and bits.shape == (256, 1024)
    np.testing.assert_array_equal(np.asarray(bits).ravel(),
                                  np.asarray(qjax.stochastic_bits(key, (4, 64, 32, 32))).ravel())
    flat = np.asarray(bits, np.uint64).ravel()
    # Each of the 32 bit positions is set in half of the 262144 words (5 sigma: 0.005).
    ones = ((flat[:, None] >> np.arange(32, dtype=np.uint64)) & 1).mean(axis=0)
    assert np.all(np.abs(ones - 0.5) < 0.005), ones
    # Top byte: chi-square over 256 cells (255 degrees of freedom; 99.99th percentile ~ 360).
    counts = np.bincount((flat >> 24).astype(np.int64), minlength=256)
    expected = flat.size / 256
    assert ((counts - expected) ** 2 / expected).sum() < 360
    # Neighbouring elements and other keys are uncorrelated.
    u = flat.astype(np.float64) / 2**32 - 0.5
    assert abs(np.mean(u[1:] * u[:-1])) / np.var(u) < 0.01
    other = np.asarray(qjax.stochastic_bits(jax.random.key(1), (256, 1024)), np.float64).ravel()
    assert abs(np.corrcoef(u, other)[0, 1]) < 0.01
    legacy = qjax.stochastic_bits(jax.random.PRNGKey(0), (8,))  # raw uint32 keys work too
    np.testing.assert_array_equal(np.asarray(legacy), np.asarray(bits).ravel()[:8])


def test_stochastic_bits_under_vmap_and_limits():
    keys = jax.random.split(jax.random.key(3), 4)
    batched = jax.jit(jax.vmap(lambda k: qjax.stochastic_bits(k, (5, 7))))(keys)
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(batched[i]),
                                      np.asarray(qjax.stochastic_bits(keys[i], (5, 7))))
    with pytest.raises(ValueError, match="at most 2\\*\\*32 - 1"):
        qjax.stochastic_bits(jax.random.key(0), (2**16, 2**16))
    big = jax.ShapeDtypeStruct((2**16, 2**16), jnp.bfloat16)  # traced only: nothing is allocated
    with pytest.raises(ValueError, match="at most 2\\*\\*32 - 1"):
        jax.eval_shape(lambda x: fake_quant_pallas(x, "mxfp4", rounding="stochastic",
                                                   key=jax.random.key(0), interpret=True), big)
