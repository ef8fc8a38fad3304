"""qjax.pallas.quantize_pallas: the QArray of qjax.quantize, bit for bit.

On CPU the kernel runs in the Pallas interpreter on small shapes; the tests marked ``gpu`` compile it
with Triton and compare on large and odd shapes.
"""

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.pallas import quantize_pallas, quantize_supports

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adversarial import families  # noqa: E402
from adversarial import grid as adversarial_grid, midpoints as adversarial_midpoints  # noqa: E402
from test_pallas_fake_quant import adversarial_stack, random_data, with_kernels_off  # noqa: E402

MX = ("mxfp8", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4")  # float-element MX formats

interpret = functools.partial(quantize_pallas, interpret=True)


def _storage_bits(a):
    """The stored bits; NaNs of wide float scales (bf16, fp32: many NaN codes, and XLA on the
    GPU and CPU write different ones, 0x7FFF / 0x7FC0 in bf16) as one canonical NaN. Formats
    with a single NaN code (E8M0, E4M3) keep their bits."""
    a = jnp.asarray(a)
    if a.dtype in (jnp.int8, jnp.uint8, jnp.uint16, jnp.uint32):
        return np.asarray(a)
    if a.dtype in (jnp.bfloat16, jnp.float32):
        a = jnp.where(jnp.isnan(a), jnp.asarray(np.nan, a.dtype), a)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize]
    return np.asarray(jax.lax.bitcast_convert_type(a, width))


def assert_same_qarray(actual, expected):
    """Same pytree (static fields included), same dtypes, same bits in values, scales and
    tensor scale."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for name in ("values", "scales", "tensor_scale"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert (a is None) == (e is None), name
        if a is None:
            continue
        assert a.dtype == e.dtype and a.shape == e.shape, (name, a.dtype, e.dtype, a.shape, e.shape)
        a, e = _storage_bits(a), _storage_bits(e)
        bad = np.argwhere(a != e)
        assert bad.size == 0, (f"{name}: {len(bad)} of {a.size} differ, e.g. at "
                               f"{bad[:3].tolist()}: {a[tuple(bad[:5].T)]} vs {e[tuple(bad[:5].T)]}")


# --------------------------------------------------------------------------- CPU (interpreter)


@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
@pytest.mark.parametrize("fmt", MX)
def test_mx_adversarial_bit_identical(fmt, scale_mode):
    x = jnp.asarray(adversarial_stack())  # NaN and ±Inf blocks, subnormals, ties, saturation
    out = interpret(x, fmt, scale_mode=scale_mode, block_rows=16, block_cols=64)
    assert_same_qarray(out, qjax.quantize(x, fmt, scale_mode=scale_mode))


@pytest.mark.parametrize("fmt,scale_mode", [("mxfp4", "floor"), ("mxfp8", "rceil"),
                                            ("mxfp6_e2m3", "floor"), ("nvfp4", "floor")])
def test_stochastic_bit_identical(fmt, scale_mode):
    x = jnp.asarray(adversarial_stack()[:160])
    key = jax.random.key(7)
    out = interpret(x, fmt, rounding="stochastic", key=key, scale_mode=scale_mode,
                    block_rows=32, block_cols=64)
    assert_same_qarray(out, qjax.quantize(x, fmt, rounding="stochastic", key=key,
                                          scale_mode=scale_mode))


@pytest.mark.parametrize("fmt", ["mxint8", "int4"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_integer_elements_bit_identical(fmt, rounding):
    x = np.array(adversarial_stack()[:96])  # NaN/Inf blocks store 0 elements, as XLA converts
    if fmt == "int4":  # bf16 scales: float products, kept in the normal range (see nvfp4 below)
        x = np.where(np.abs(x) < 2.0**-100, np.float32(0), x)
    key = jax.random.key(5) if rounding == "stochastic" else None
    x = jnp.asarray(x)
    out = interpret(x, fmt, rounding=rounding, key=key, block_rows=32, block_cols=64)
    assert out.values.dtype == jnp.int8
    assert_same_qarray(out, qjax.quantize(x, fmt, rounding=rounding, key=key))


def test_nvfp4_bit_identical():
    # Normal-range families, as in test_pallas_fake_quant: XLA on the CPU flushes subnormal float
    # products, the interpreter's own products are XLA's too, but tiny inputs go to the GPU tests.
    fams = families(np.random.default_rng(1))
    x = np.concatenate([fams[n][:, :64] for n in ("nvfp4_ties", "outliers", "mixed_signs",
                                                  "neg_zero", "zeros", "saturate")])
    x[5, 3] = np.nan
    out = interpret(jnp.asarray(x), "nvfp4", block_rows=64, block_cols=64)
    expected = qjax.quantize(jnp.asarray(x), "nvfp4")
    assert_same_qarray(out, expected)
    assert np.isnan(float(out.tensor_scale.ravel()[0]))  # a NaN anywhere poisons the tensor scale


def test_elements_of_products_below_float32_normal_range_are_signed_zeros():
    # A block whose scale is large (2^10) next to values so small that x * 2^-e is a float32
    # subnormal or below: the kernel takes them to ±0 without rounding twice.
    x = np.zeros((4, 64), np.float32)
    x[:, 0] = 2.0**12
    x[0, 1:32] = -np.float32(2.0**-120)
    x[1, 1:32] = np.float32(2.0**-140)  # a float32 subnormal input
    x[2, 1:32] = -np.float32(2.0**-149)
    x[3, 32:] = np.float32(2.0**-130) * np.arange(1, 33)  # a subnormal-only block, scale 2^-127
    x = jnp.asarray(x)
    for fmt in ("mxfp8", "mxfp8_e5m2", "mxfp4"):
        assert_same_qarray(interpret(x, fmt, block_rows=4, block_cols=64), qjax.quantize(x, fmt))


_ELEMENT_OF = {"mxfp8": "e4m3", "mxfp8_e5m2": "e5m2", "mxfp6_e3m2": "e3m2",
               "mxfp6_e2m3": "e2m3", "mxfp4": "e2m1"}


def every_code_at_edge_exponents(fmt):
    """One row per block exponent (the bottom, middle and top of the E8M0 range, where the kernel
    switches between its two encoders), each row every signed grid value and every midpoint of the
    element times 2**e, with the largest element first in each block so that it sets the scale."""
    grid = adversarial_grid(_ELEMENT_OF[fmt])
    values = np.concatenate([grid, adversarial_midpoints(_ELEMENT_OF[fmt])])
    values = np.concatenate([values, -values])
    per_block = 31
    values = np.pad(values, (0, -len(values) % per_block)).reshape(-1, per_block)
    blocks = np.concatenate([np.full((len(values), 1), grid[-1]), values], axis=1).ravel()
    exponents = np.r_[-127:-105, -8:8, 110:128]
    return (blocks[None, :] * 2.0 ** exponents[:, None].astype(np.float64)).astype(np.float32)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("fmt", MX)
def test_every_code_at_edge_block_exponents(fmt, rounding):
    x = jnp.asarray(every_code_at_edge_exponents(fmt))
    key = jax.random.key(3) if rounding == "stochastic" else None
    for scale_mode in ("floor", "rceil"):
        out = interpret(x, fmt, rounding=rounding, key=key, scale_mode=scale_mode, block_rows=1,
                        block_cols=32 * 2 ** math.ceil(math.log2(x.shape[1] // 32)))
        assert_same_qarray(out, qjax.quantize(x, fmt, rounding=rounding, key=key,
                                              scale_mode=scale_mode))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
    x = random_data((40, 256), dtype)
    out = interpret(x, "mxfp6_e3m2", block_rows=16, block_cols=128)
    assert out.dtype == dtype
    assert_same_qarray(out, qjax.quantize(x, "mxfp6_e3m2"))


def test_leading_axes_partial_tiles_and_round_trip():
    x = random_data((3, 5, 96), jnp.float32)  # 15 rows, 3 blocks: partial tiles in both directions
    out = interpret(x, "mxfp8", block_rows=8, block_cols=64)
    assert_same_qarray(out, qjax.quantize(x, "mxfp8"))
    np.testing.assert_array_equal(np.asarray(qjax.dequantize(out)),
                                  np.asarray(qjax.fake_quant(x, "mxfp8")))


def test_under_jit_and_vmap():
    x = random_data((4, 6, 64), jnp.float32)
    batched = jax.jit(jax.vmap(lambda v: interpret(v, "mxfp4", block_rows=4, block_cols=64)))(x)
    for i in range(x.shape[0]):
        assert_same_qarray(jax.tree.map(lambda a, i=i: a[i], batched), qjax.quantize(x[i], "mxfp4"))


def test_supports_and_argument_checks():
    x = jnp.ones((4, 64))
    assert quantize_supports("mxfp4") and quantize_supports("nvfp4")
    assert not quantize_supports("fp8_e4m3") and not quantize_supports("ternary")
    assert quantize_supports("mxint8") and quantize_supports("int4")
    assert not quantize_supports(qjax.formats.float_format(8, 3, block_size=32))  # 12-bit element
    with pytest.raises(ValueError, match="at most 8 bits"):
        quantize_pallas(x, "fp8_e4m3", interpret=True)
    with pytest.raises(ValueError, match="PRNG key"):
        quantize_pallas(x, "mxfp4", rounding="stochastic", interpret=True)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_pallas(jnp.ones((4, 48)), "mxfp4", interpret=True)
    with pytest.raises(ValueError, match="unknown scale_mode"):
        quantize_pallas(x, "mxfp4", scale_mode="ceil", interpret=True)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantize_pallas(jnp.ones((4, 64), jnp.int32), "mxfp4", interpret=True)


# --------------------------------------------------------------------------- GPU (Triton)

GPU_FORMATS = MX + ("nvfp4", "mxint8", "int4")


xla_quantize = functools.partial(with_kernels_off, qjax.quantize)


def reference(x, fmt, **kwargs):
    """MX: qjax.quantize on the CPU (integer-only, backend-independent); float-scaled formats
    multiply in float32, where XLA on the CPU flushes subnormal products: XLA on the GPU."""
    if fmt in MX:
        cpu = jax.devices("cpu")[0]
        with jax.default_device(cpu):
            return jax.device_get(qjax.quantize(jax.device_put(np.asarray(x), cpu), fmt, **kwargs))
    return xla_quantize(x, fmt, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", GPU_FORMATS)
def test_gpu_large_and_adversarial(fmt):
    x = random_data((4096, 8192), jnp.bfloat16, seed=11)
    assert_same_qarray(jax.jit(lambda x: quantize_pallas(x, fmt))(x), reference(x, fmt))
    x = jnp.asarray(adversarial_stack())
    for scale_mode in (["floor", "rceil"] if fmt in MX else ["floor"]):
        assert_same_qarray(quantize_pallas(x, fmt, scale_mode=scale_mode),
                           reference(x, fmt, scale_mode=scale_mode))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", MX)
def test_gpu_every_code_at_edge_block_exponents(fmt):
    x = jnp.asarray(every_code_at_edge_exponents(fmt))
    key = jax.random.key(3)
    cols = 32 * 2 ** math.ceil(math.log2(x.shape[1] // 32))
    for scale_mode in ("floor", "rceil"):
        assert_same_qarray(quantize_pallas(x, fmt, scale_mode=scale_mode, block_rows=1,
                                           block_cols=cols),
                           reference(x, fmt, scale_mode=scale_mode))
        assert_same_qarray(quantize_pallas(x, fmt, rounding="stochastic", key=key,
                                           scale_mode=scale_mode, block_rows=1, block_cols=cols),
                           reference(x, fmt, rounding="stochastic", key=key,
                                     scale_mode=scale_mode))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "nvfp4"])
def test_gpu_stochastic_and_odd_shapes(fmt):
    key = jax.random.key(3)
    x = random_data((512, 1024), jnp.bfloat16, seed=9)
    assert_same_qarray(quantize_pallas(x, fmt, rounding="stochastic", key=key),
                       xla_quantize(x, fmt, rounding="stochastic", key=key))
    for shape, dtype in [((3, 5, 96), jnp.float32), ((1000, 160), jnp.float16)]:
        x = random_data(shape, dtype, seed=5)
        assert_same_qarray(quantize_pallas(x, fmt), reference(x, fmt))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "mxint8", "nvfp4"])
def test_gpu_quantize_dispatches_to_the_kernel(fmt):
    x = random_data((256, 512), jnp.bfloat16, seed=2)
    text = jax.jit(lambda x: qjax.quantize(x, fmt)).lower(x).as_text().lower()
    assert "triton" in text  # the Pallas kernel's custom call
    with qjax.use_kernels(False):
        assert "triton" not in jax.jit(lambda x: qjax.quantize(x, fmt)).lower(x).as_text().lower()
    assert_same_qarray(jax.jit(lambda x: qjax.quantize(x, fmt))(x), reference(x, fmt))


def test_use_kernels_switch_is_validated_and_restored():
    assert qjax.config.kernels_enabled()
    with qjax.use_kernels(False):
        assert not qjax.config.kernels_enabled()
        x = random_data((4, 64), jnp.float32)
        assert_same_qarray(qjax.quantize(x, "mxfp4"), interpret(x, "mxfp4"))
    assert qjax.config.kernels_enabled()
    with pytest.raises(TypeError, match="True or False"):
        with qjax.use_kernels("no"):
            pass


def test_use_kernels_retraces_functions_traced_before():
    # jax.jit(f) made twice shares f's cached trace: the switch must not be ignored by it, and a
    # function compiled inside keeps its kernel-free executable after it (the A/B benchmarks).
    def f(x):
        return x * (2.0 if qjax.config.kernels_enabled() else 3.0)

    fast = jax.jit(f)
    assert float(fast(1.0)) == 2.0
    with qjax.use_kernels(False):
        reference = jax.jit(f)
        assert float(reference(1.0)) == 3.0
        with qjax.use_kernels(False):  # no change, nothing cleared
            assert float(jax.jit(f)(1.0)) == 3.0
    assert float(reference(1.0)) == 3.0
    assert float(jax.jit(lambda x: f(x))(1.0)) == 2.0
