"""qjax.pallas.fake_quant_pallas: bit-identical to qjax.fake_quant.

On CPU the kernel runs in the Pallas interpreter on small shapes; the tests marked ``gpu`` compile it
with Triton and compare on large and odd shapes.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.pallas import fake_quant_pallas, supports
from qjax.quantize import _split_outer_scale, prescaled_fake_quant, round_to_element

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adversarial import families  # noqa: E402
from reference import nvfp4_fake_quant_ref  # noqa: E402

MX = ("mxfp8", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8")
interpret = functools.partial(fake_quant_pallas, interpret=True)


def assert_bit_identical(actual, expected):
    """Bit for bit; NaNs of bf16/fp16 outputs compare as NaN: converting float32's NaN to them
    gives a backend's own payload (0x7FFF from Triton on the GPU, 0x7E00 from XLA on the CPU)."""
    narrow = jnp.asarray(actual).dtype != jnp.float32
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    if narrow:
        both = np.isnan(actual) & np.isnan(expected)
        actual, expected = np.where(both, np.float32(np.nan), actual), np.where(both, np.float32(np.nan), expected)
    actual, expected = actual.view(np.uint32), expected.view(np.uint32)
    assert actual.shape == expected.shape
    bad = np.argwhere(actual != expected)
    assert bad.size == 0, (f"{len(bad)} of {actual.size} differ, e.g. at {bad[:3].tolist()}: "
                           f"{actual[tuple(bad[:5].T)]} vs {expected[tuple(bad[:5].T)]} (bits)")


@functools.lru_cache(maxsize=None)
def adversarial_stack():
    """Every adversarial family (first 64 columns), stacked: (481, 64) float32, plus NaN and
    ±Inf blocks."""
    fams = families(np.random.default_rng(0))
    x = np.concatenate([a[:, :64] for a in fams.values()])
    x[3, 5] = np.nan
    x[7, 40] = np.inf
    x[9, 33] = -np.inf
    x[11, :] = np.nan
    return x


def random_data(shape, dtype, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    scales = 2.0 ** jax.random.randint(jax.random.key(seed + 1), shape[:-1] + (1,), -20, 20)
    return (x * scales).astype(dtype)


# --------------------------------------------------------------------------- CPU (interpreter)


@pytest.mark.parametrize("scale_mode", ["floor", "rceil"])
@pytest.mark.parametrize("fmt", MX)
def test_mx_adversarial_bit_identical(fmt, scale_mode):
    x = jnp.asarray(adversarial_stack())
    # 16 x 2 blocks per tile: the 481 rows end in a partial tile.
    out = interpret(x, fmt, scale_mode=scale_mode, block_rows=16, block_cols=64)
    assert_bit_identical(out, qjax.fake_quant(x, fmt, scale_mode=scale_mode))


@pytest.mark.parametrize("fmt,scale_mode", [("mxfp4", "floor"), ("mxfp8", "rceil"),
                                            ("mxint8", "floor"), ("int4", "floor")])
def test_stochastic_bit_identical(fmt, scale_mode):
    x = jnp.asarray(adversarial_stack()[:160])
    key = jax.random.key(7)
    out = interpret(x, fmt, rounding="stochastic", key=key, scale_mode=scale_mode,
                    block_rows=32, block_cols=64)
    expected = qjax.fake_quant(x, fmt, rounding="stochastic", key=key, scale_mode=scale_mode)
    assert_bit_identical(out, expected)


@pytest.mark.parametrize("fmt", MX)
def test_stochastic_adversarial_bit_identical(fmt):
    # The whole stack: its subnormal and tiny families take the exact branch of the SR rounding.
    x = jnp.asarray(adversarial_stack())
    key = jax.random.key(11)
    out = interpret(x, fmt, rounding="stochastic", key=key, block_rows=16, block_cols=64)
    assert_bit_identical(out, qjax.fake_quant(x, fmt, rounding="stochastic", key=key))


def test_int4_bf16_scales_bit_identical():
    x = jnp.asarray(adversarial_stack())
    assert_bit_identical(interpret(x, "int4", block_rows=32, block_cols=64),
                         qjax.fake_quant(x, "int4"))


def test_nvfp4_bit_identical():
    # Normal-range families: the NumPy reference's float products do not flush subnormals, XLA's
    # on the CPU do (docs/numerics.md), so tiny inputs are left to the GPU tests.
    fams = families(np.random.default_rng(1))
    x = np.concatenate([fams[n][:, :64] for n in ("nvfp4_ties", "outliers", "mixed_signs",
                                                  "neg_zero", "zeros", "saturate")])
    out = interpret(jnp.asarray(x), "nvfp4", block_rows=64, block_cols=64)
    assert_bit_identical(out, nvfp4_fake_quant_ref(x))
    assert_bit_identical(out, qjax.fake_quant(jnp.asarray(x), "nvfp4"))


def test_nvfp4_tiny_tensor_bit_identical():
    # amax ~1e-35: the tensor scale takes its floor 2**-126 in the kernel's operand as in XLA's path
    x = jax.random.normal(jax.random.key(5), (64, 64)) * np.float32(1e-37)
    x = x * 2.0 ** jax.random.randint(jax.random.key(6), (64, 1), 0, 6).astype(jnp.float32)
    out = interpret(x, "nvfp4", block_rows=64, block_cols=64)
    assert_bit_identical(out, qjax.fake_quant(x, "nvfp4"))
    assert np.mean(np.asarray(out) != 0) > 0.5


@pytest.mark.parametrize("special", [None, np.nan, np.inf])
def test_nvfp4_stochastic_bit_identical(special):
    # The float-scaled SR path rounds with the shortcut shift of the E8M0 kernels and handles
    # NaN itself; a NaN or Inf anywhere makes the tensor scale NaN and every element with it.
    fams = families(np.random.default_rng(2))
    x = np.concatenate([fams[n][:, :64] for n in ("nvfp4_ties", "outliers", "mixed_signs",
                                                  "neg_zero", "zeros", "saturate")])
    if special is not None:
        x[7, 9] = special
    key = jax.random.key(13)
    out = interpret(jnp.asarray(x), "nvfp4", rounding="stochastic", key=key, block_rows=32,
                    block_cols=64)
    expected = qjax.fake_quant(jnp.asarray(x), "nvfp4", rounding="stochastic", key=key)
    assert_bit_identical(out, expected)
    assert np.isnan(np.asarray(out)).any() == (special is not None)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(dtype):
    x = random_data((40, 256), dtype)
    out = interpret(x, "mxfp6_e3m2", block_rows=16, block_cols=128)
    assert out.dtype == dtype
    assert_bit_identical(out, qjax.fake_quant(x, "mxfp6_e3m2"))


def test_leading_axes_and_partial_tiles():
    x = random_data((3, 5, 96), jnp.float32)  # 15 rows, 3 blocks: partial tiles in both directions
    out = interpret(x, "mxfp8", block_rows=8, block_cols=64)
    assert out.shape == x.shape
    assert_bit_identical(out, qjax.fake_quant(x, "mxfp8"))


def test_exact_subnormal_branch_is_per_tile():
    # One tile whose blocks need the exact subnormal path (scale < 2^-121 for e4m3), next to
    # ordinary tiles, and a tile mixing both.
    x = np.array(random_data((32, 128), jnp.float32))
    rng = np.random.default_rng(3)
    x[:8] = rng.integers(-2**23 + 1, 2**23, size=(8, 128)) * np.float32(2.0**-149)
    x[8:16, 64:] = rng.normal(size=(8, 64)) * 1e-38
    x = jnp.asarray(x, jnp.float32)
    assert_bit_identical(interpret(x, "mxfp8", block_rows=8, block_cols=64),
                         qjax.fake_quant(x, "mxfp8"))


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "mxint8", "int4"])
def test_non_last_axis_bit_identical(fmt):
    # Blocks down the columns (the wgrad operands' layout): axis 0 of the adversarial stack
    # (NaN/Inf, subnormals, ties) and a middle axis of a 3-D array, with partial tiles.
    x = jnp.asarray(adversarial_stack()[:448].T.copy())  # (64, 448): blocks along axis 0
    assert_bit_identical(interpret(x, fmt, axis=0, block_rows=64, block_cols=64),
                         qjax.fake_quant(x, fmt, axis=0))
    y = random_data((3, 96, 20), jnp.float32, seed=4)  # 3 blocks along axis 1; 20 inner columns
    assert_bit_identical(interpret(y, fmt, axis=1, block_rows=8, block_cols=64),
                         qjax.fake_quant(y, fmt, axis=1))


def test_non_last_axis_stochastic_and_nvfp4():
    x = random_data((64, 40), jnp.bfloat16, seed=6)
    key = jax.random.key(9)
    out = interpret(x, "mxfp4", axis=0, rounding="stochastic", key=key, block_rows=16,
                    block_cols=32)
    assert_bit_identical(out, qjax.fake_quant(x, "mxfp4", axis=0, rounding="stochastic", key=key))
    y = random_data((3, 96, 20), jnp.float32, seed=8)  # a middle axis: outer, blocks and inner
    out = interpret(y, "mxfp8", axis=1, rounding="stochastic", key=key, block_rows=8,
                    block_cols=64)
    assert_bit_identical(out, qjax.fake_quant(y, "mxfp8", axis=1, rounding="stochastic", key=key))
    fams = families(np.random.default_rng(2))
    z = np.concatenate([fams[n][:, :64] for n in ("nvfp4_ties", "outliers", "mixed_signs")]).T
    z = jnp.asarray(z.copy())  # (64, rows): NVFP4 blocks of 16 along axis 0
    assert_bit_identical(interpret(z, "nvfp4", axis=0, block_rows=32, block_cols=32),
                         qjax.fake_quant(z, "nvfp4", axis=0))


@pytest.mark.parametrize("axis,rounding", [(-1, "nearest"), (-1, "stochastic"), (0, "stochastic")])
def test_nvfp4_split_tensor_scale(axis, rounding):
    # The GEMM's factors (qjax.ops.dot_general dispatches this for NVFP4 operands): the values
    # without the tensor scale, in bfloat16, and the tensor scale, as XLA's split computes them.
    fams = families(np.random.default_rng(3))
    x = np.concatenate([fams[n][:, :64] for n in ("nvfp4_ties", "outliers", "mixed_signs",
                                                  "saturate")])
    x = jnp.asarray(x if axis == -1 else x.T.copy())
    key = jax.random.key(17) if rounding == "stochastic" else None
    values, tensor_scale = fake_quant_pallas(x, "nvfp4", axis=axis, rounding=rounding, key=key,
                                             out_dtype=jnp.bfloat16, split_tensor_scale=True,
                                             interpret=True, block_rows=16, block_cols=32)
    ref_values, ref_scale = _split_outer_scale(x, qjax.formats.get("nvfp4"), axis % 2, rounding,
                                               key, "floor")
    assert values.dtype == jnp.bfloat16 and tensor_scale.shape == (1, 1)
    assert_bit_identical(values, ref_values.astype(jnp.bfloat16))
    assert_bit_identical(tensor_scale, jnp.reshape(ref_scale, (1, 1)))
    # Their product is fake_quant's value up to one float32 rounding (the order of the products).
    np.testing.assert_allclose(values.astype(jnp.float32) * tensor_scale,
                               qjax.fake_quant(x, "nvfp4", axis=axis, rounding=rounding, key=key),
                               rtol=2.0**-23, atol=0)
    with pytest.raises(ValueError, match="two-level"):
        fake_quant_pallas(x, "mxfp4", split_tensor_scale=True, interpret=True)


def test_block_length_must_divide_the_axis():
    with pytest.raises(ValueError, match="multiple of 32"):
        fake_quant_pallas(jnp.ones((4, 48)), "mxfp4", interpret=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        fake_quant_pallas(jnp.ones((4, 40)), "nvfp4", interpret=True)


def test_argument_checks():
    x = jnp.ones((4, 64))
    assert not supports("fp8_e4m3") and not supports("ternary") and supports("nvfp4")
    with pytest.raises(ValueError, match="Block scaling"):
        fake_quant_pallas(x, "fp8_e4m3", interpret=True)
    with pytest.raises(ValueError, match="PRNG key"):
        fake_quant_pallas(x, "mxfp4", rounding="stochastic", interpret=True)
    with pytest.raises(ValueError, match="E8M0"):
        fake_quant_pallas(x, "int4", scale_mode="rceil", interpret=True)
    with pytest.raises(ValueError, match="block_cols"):
        fake_quant_pallas(x, "mxfp4", block_cols=96, interpret=True)
    with pytest.raises(ValueError, match="block_rows"):
        fake_quant_pallas(x, "mxfp4", block_rows=6, interpret=True)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        fake_quant_pallas(x, "mxfp4", axis=2, interpret=True)
    with pytest.raises(ValueError, match="along axis 0 in blocks of 32"):
        fake_quant_pallas(x, "mxfp4", axis=0, interpret=True)


def test_straight_through_gradient():
    x = random_data((8, 64), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(interpret(x, "mxfp4") * 3.0))(x)
    np.testing.assert_array_equal(np.asarray(grad), np.full(x.shape, 3.0, np.float32))


# --------------------------------------------------------------------------- GPU (Triton)

GPU_FORMATS = MX + ("int4", "nvfp4")


def cpu_reference(x, fmt, **kwargs):
    """qjax.fake_quant run on the CPU: MX formats are integer-only, hence backend-independent, and
    the CPU results are the ones checked against the NumPy reference (tests/reference.py)."""
    with jax.default_device(jax.devices("cpu")[0]):
        return qjax.fake_quant(jax.device_put(np.asarray(x), jax.devices("cpu")[0]), fmt, **kwargs)


def with_kernels_off(op, x, fmt, **kwargs):
    """``op(x, fmt, **kwargs)`` (``qjax.fake_quant`` or ``qjax.quantize``) jitted with the kernels
    switched off: on the GPU it would dispatch to the kernel under test otherwise."""
    with qjax.use_kernels(False):
        return jax.jit(functools.partial(op, fmt=fmt, **kwargs))(x)


xla_fake_quant = functools.partial(with_kernels_off, qjax.fake_quant)


def reference(x, fmt, **kwargs):
    """MX: qjax.fake_quant on the CPU. Float-scaled formats (int4, nvfp4) multiply in float32,
    where XLA on CPU flushes subnormal products: XLA's version on the GPU."""
    if fmt in MX:
        return cpu_reference(x, fmt, **kwargs)
    return xla_fake_quant(x, fmt, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", GPU_FORMATS)
def test_gpu_large_bf16(fmt):
    x = random_data((8192, 8192), jnp.bfloat16, seed=11)
    out = jax.jit(lambda x: fake_quant_pallas(x, fmt))(x)
    assert_bit_identical(out, xla_fake_quant(x, fmt))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", GPU_FORMATS)
def test_gpu_adversarial(fmt):
    x = jnp.asarray(adversarial_stack())
    for scale_mode in (["floor", "rceil"] if fmt in MX else ["floor"]):
        assert_bit_identical(fake_quant_pallas(x, fmt, scale_mode=scale_mode),
                             reference(x, fmt, scale_mode=scale_mode))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((24, 4096), jnp.bfloat16), ((3, 5, 96), jnp.float32),
                                         ((1000, 160), jnp.float16), ((7, 32), jnp.float32)])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "nvfp4"])
def test_gpu_odd_shapes(fmt, shape, dtype):
    x = random_data(shape, dtype, seed=5)
    assert_bit_identical(fake_quant_pallas(x, fmt), reference(x, fmt))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8", "mxint8", "int4", "nvfp4"])
def test_gpu_stochastic(fmt):
    x = random_data((512, 1024), jnp.bfloat16, seed=9)
    key = jax.random.key(3)
    assert_bit_identical(fake_quant_pallas(x, fmt, rounding="stochastic", key=key),
                         xla_fake_quant(x, fmt, rounding="stochastic", key=key))


@pytest.mark.gpu
@pytest.mark.parametrize("block_rows,block_cols,num_warps", [(1, 32, 1), (64, 256, 8),
                                                             (2, 2048, 4)])
def test_gpu_block_shapes(block_rows, block_cols, num_warps):
    x = jnp.asarray(adversarial_stack())
    out = fake_quant_pallas(x, "mxfp8", block_rows=block_rows, block_cols=block_cols,
                            num_warps=num_warps)
    assert_bit_identical(out, cpu_reference(x, "mxfp8"))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", GPU_FORMATS)
def test_gpu_non_last_axis(fmt):
    # The wgrad operands' layout (blocks down the columns), with the default tile of that layout.
    x = random_data((4096, 1000), jnp.bfloat16, seed=13)
    assert_bit_identical(fake_quant_pallas(x, fmt, axis=0), reference(x, fmt, axis=0))
    key = jax.random.key(4)
    assert_bit_identical(fake_quant_pallas(x, fmt, axis=0, rounding="stochastic", key=key),
                         xla_fake_quant(x, fmt, axis=0, rounding="stochastic", key=key))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp8", "nvfp4"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gpu_fake_quant_dispatches_along_any_axis(axis, fmt):
    x = random_data((64, 64, 96), jnp.bfloat16, seed=17)
    fn = jax.jit(lambda x: qjax.fake_quant(x, fmt, axis=axis))
    assert "triton" in fn.lower(x).as_text().lower()
    assert_bit_identical(fn(x), reference(x, fmt, axis=axis))


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_prescaled_bit_identical(axis, rounding):
    # Tseng et al.'s quantizer (the mxfp4 recipe's backward operands): scales from x, elements
    # from 0.75 x; on the adversarial stack (NaN/Inf blocks, subnormals, ties) and both layouts.
    x = jnp.asarray(adversarial_stack()[:448])
    x = x if axis == -1 else x.T.copy()
    key = jax.random.key(5) if rounding == "stochastic" else None
    out = interpret(x, "mxfp4", axis=axis, rounding=rounding, key=key, prescale=0.75,
                    block_rows=16, block_cols=64)
    assert_bit_identical(out, prescaled_fake_quant(x, "mxfp4", 0.75, axis=axis,
                                                   rounding=rounding, key=key))
    narrow = interpret(x, "mxfp4", axis=axis, rounding=rounding, key=key, prescale=0.75,
                       block_rows=16, block_cols=64, out_dtype=jnp.bfloat16)
    assert narrow.dtype == jnp.bfloat16  # MX values are bfloat16 numbers: the same values
    assert_bit_identical(narrow, out.astype(jnp.bfloat16))


def test_prescaled_fake_quant_is_tsengs_quantizer():
    x = random_data((64, 256), jnp.float32, seed=21)
    key = jax.random.key(2)
    for rounding in ("nearest", "stochastic"):
        scale = qjax.estimators.element_scale(x, "mxfp4")
        bits = None if rounding == "nearest" else qjax.stochastic_bits(key, x.shape)
        expected = round_to_element(x * 0.75 / scale, qjax.formats.get("mxfp4").element,
                                    rounding=rounding, random_bits=bits) * scale
        got = prescaled_fake_quant(x, "mxfp4", 0.75, rounding=rounding, key=key)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    with pytest.raises(ValueError, match="E8M0 block scales"):
        prescaled_fake_quant(x, "nvfp4", 0.75)
    with pytest.raises(ValueError, match="positive"):
        prescaled_fake_quant(x, "mxfp4", 0.0)
    with pytest.raises(ValueError, match="E8M0-scaled"):
        fake_quant_pallas(x, "int4", prescale=0.75, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("axis", [-1, 0])
def test_gpu_prescaled(axis):
    x = random_data((2048, 4096), jnp.float32, seed=23)
    key = jax.random.key(6)
    for rounding in ("nearest", "stochastic"):
        with qjax.use_kernels(False):
            expected = jax.jit(lambda x: prescaled_fake_quant(x, "mxfp4", 0.75, axis=axis,
                                                              rounding=rounding, key=key))(x)
        fn = jax.jit(lambda x: prescaled_fake_quant(x, "mxfp4", 0.75, axis=axis,
                                                    rounding=rounding, key=key))
        assert "triton" in fn.lower(x).as_text().lower()
        assert_bit_identical(fn(x), expected)
        narrow = jax.jit(lambda x: prescaled_fake_quant(x, "mxfp4", 0.75, axis=axis,
                                                        rounding=rounding, key=key,
                                                        out_dtype=jnp.bfloat16))(x)
        assert_bit_identical(narrow, expected.astype(jnp.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_gpu_nvfp4_split_tensor_scale(axis, rounding):
    x = random_data((2048, 4096), jnp.bfloat16, seed=25)
    key = jax.random.key(8) if rounding == "stochastic" else None
    fmt = qjax.formats.get("nvfp4")
    values, tensor_scale = jax.jit(lambda x: fake_quant_pallas(
        x, fmt, axis=axis, rounding=rounding, key=key, out_dtype=jnp.bfloat16,
        split_tensor_scale=True))(x)
    ref_values, ref_scale = jax.jit(lambda x: _split_outer_scale(x, fmt, axis % 2, rounding, key,
                                                                 "floor"))(x)
    assert_bit_identical(values, ref_values.astype(jnp.bfloat16))
    assert_bit_identical(tensor_scale, jnp.reshape(ref_scale, (1, 1)))


@pytest.mark.gpu
def test_gpu_nvfp4_gemm_operands_dispatch():
    # The nvfp4 recipe's un-rotated operands (forward x and w, dgrad dy and w) go through the
    # kernel, bit-identical to XLA's split: with a fixed cotangent only the GEMMs' summation
    # order (and the wgrad operands' rotation kernel, tested in test_pallas_hadamard_quant)
    # separates the results.
    x = random_data((512, 1024), jnp.bfloat16, seed=27)
    w = random_data((1024, 768), jnp.bfloat16, seed=28) * 0.05
    dy = random_data((512, 768), jnp.bfloat16, seed=29)
    key = jax.random.key(9)

    def run(x, w):
        y, vjp = jax.vjp(lambda x, w: qjax.ops.matmul(x, w, recipe="nvfp4", key=key), x, w)
        return (y, *vjp(dy))

    fused = jax.jit(run)
    assert "fake_quant_nvfp4" in fused.lower(x, w).as_text()
    with qjax.use_kernels(False):
        unfused = jax.jit(run)
        assert "fake_quant_nvfp4" not in unfused.lower(x, w).as_text()
        expected = unfused(x, w)
    for got, want, tolerance in zip(fused(x, w), expected, (1e-2, 1e-2, 6e-2)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.linalg.norm(got - want) <= tolerance * np.linalg.norm(want)
