"""qjax.pallas.hadamard_quant: the rotation and quantization (MX, NVFP4) of a bf16 operand in one
kernel.

On CPU the kernel runs in the Pallas interpreter on small shapes and is compared with its XLA
reference bit for bit (the interpreter adds the rotation's products in the reference's order); the
tests marked ``gpu`` compile it with Triton: bit-identical where every sum of the rotation is exact
(small integers), and on random inputs differing only where the tensor cores' order of the float32
additions moves a value across a rounding boundary: one element step, in few elements.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import transforms as T
from qjax.pallas import hadamard_quant as HQ

DG = importlib.import_module("qjax.ops.dot_general")  # the module; qjax.ops.dot_general is the op
interpret = functools.partial(HQ.hadamard_fake_quant_pallas, interpret=True)
reference = HQ.hadamard_fake_quant_reference

# (shape, axis, hadamard block): last axis, axis 0 (wgrad), a middle axis, lanes that are not a
# multiple of the tile.
LAYOUTS = [((100, 128), -1, 64), ((64, 40), 0, 64), ((3, 64, 24), 1, 32), ((2, 5, 128), 2, 128),
           ((32, 32), 1, 32)]


def integers(shape, seed=0):
    """bf16 integers in [-4, 4]: every sum of the rotation is exact in float32."""
    return jax.random.randint(jax.random.key(seed), shape, -4, 5).astype(jnp.bfloat16)


def normals(shape, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    return (x * 2.0 ** jax.random.randint(jax.random.key(seed + 1), shape, -8, 8)).astype(
        jnp.bfloat16)


def assert_bit_identical(actual, expected):
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    both_nan = np.isnan(actual) & np.isnan(expected)
    bad = np.argwhere((actual.view(np.uint32) != expected.view(np.uint32)) & ~both_nan)
    assert actual.shape == expected.shape
    assert bad.size == 0, (f"{len(bad)} of {actual.size} differ, e.g. at {bad[:3].tolist()}: "
                           f"{actual[tuple(bad[:3].T)]} vs {expected[tuple(bad[:3].T)]}")


# --------------------------------------------------------------------------- CPU (interpreter)


# The backward operands of the mxfp4 recipe (pre-scale 3/4) and of the nvfp4 recipe (elements
# times E4M3 block scales, the tensor scale split off for the GEMM's output).
RECIPE_OPTIONS = {"mxfp4": dict(prescale=0.75), "nvfp4": dict(split_tensor_scale=True)}


def assert_same_operand(actual, expected, tensor_scale_ulps=0):
    """``tensor_scale_ulps``: how far the tensor scale may be from the reference's where the
    rotation's sums are inexact (the kernel's dots add in another order, so the amax may differ
    in its last bit). The elements are held bit-identical either way: one ulp of the tensor scale
    can re-round an E4M3 block scale (docs/numerics.md), which these inputs do not hit."""
    if isinstance(expected, tuple):  # (elements * block scales, tensor scale)
        assert actual[1].shape == expected[1].shape == (1,) * actual[0].ndim
        if tensor_scale_ulps:
            np.testing.assert_array_max_ulp(np.asarray(actual[1]), np.asarray(expected[1]),
                                            maxulp=tensor_scale_ulps)
        else:
            assert_bit_identical(actual[1], expected[1])
        actual, expected = actual[0], expected[0]
    assert actual.dtype == jnp.bfloat16 and actual.shape == expected.shape
    assert_bit_identical(actual, expected)


@pytest.mark.parametrize("shape,axis,h", LAYOUTS)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("data", [integers, normals])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_bit_identical(shape, axis, h, rounding, data, fmt):
    x = data(shape)
    key = jax.random.key(3) if rounding == "stochastic" else None
    signs = T.random_signs(jax.random.key(1), h)
    options = dict(hadamard_block_size=h, signs=signs, axis=axis, rounding=rounding, key=key,
                   **RECIPE_OPTIONS[fmt])
    assert_same_operand(interpret(x, fmt, block_rows=16, **options),
                        reference(x, fmt, **options),
                        tensor_scale_ulps=0 if data is integers else 1)


@pytest.mark.parametrize("axis", [-1, 0])
def test_nvfp4_block_16_and_product_form(axis):
    # nvfp4's own Hadamard block (16, one format block per dot); without the split the values
    # carry the tensor scale (float32 products, not bf16 numbers).
    x = normals((48, 64), seed=14)
    options = dict(hadamard_block_size=16, axis=axis, rounding="stochastic",
                   key=jax.random.key(15))
    # Normal inputs: the tensor amax may differ in its last bit (see assert_same_operand), and
    # the product form carries it into every value.
    split = interpret(x, "nvfp4", split_tensor_scale=True, **options)
    assert_same_operand(split, reference(x, "nvfp4", split_tensor_scale=True, **options),
                        tensor_scale_ulps=1)
    product = interpret(x, "nvfp4", out_dtype=jnp.float32, **options)
    np.testing.assert_array_max_ulp(
        np.asarray(product), np.asarray(reference(x, "nvfp4", out_dtype=jnp.float32, **options)),
        maxulp=2)
    values, tensor_scale = split
    np.testing.assert_allclose(np.asarray(values, np.float32) * np.asarray(tensor_scale),
                               product, rtol=2 ** -23)


@pytest.mark.parametrize("fmt,scale_mode", [("mxfp8", "floor"), ("mxfp6_e2m3", "rceil"),
                                            ("mxfp8_e5m2", "floor")])
def test_formats_and_scale_modes(fmt, scale_mode):
    x = normals((96, 64), seed=4)
    for axis in (-1, 0):
        out = interpret(x, fmt, hadamard_block_size=32, axis=axis, scale_mode=scale_mode,
                        out_dtype=jnp.float32)
        assert out.dtype == jnp.float32
        assert_bit_identical(out, reference(x, fmt, hadamard_block_size=32, axis=axis,
                                            scale_mode=scale_mode, out_dtype=jnp.float32))


def test_deterministic_transform_and_float16():
    x = normals((32, 64), seed=5).astype(jnp.float16)
    out = interpret(x, "mxfp4", hadamard_block_size=64)
    assert_bit_identical(out, reference(x, "mxfp4", hadamard_block_size=64))


def test_nan_and_inf_blocks():
    # A NaN or Inf spreads over its Hadamard block; every format block of it becomes NaN, as the
    # reference's E8M0 NaN scale says.
    x = integers((32, 128), seed=6)
    x = x.at[3, 5].set(jnp.nan).at[9, 70].set(jnp.inf).at[20, 0].set(-jnp.inf)
    for axis in (-1, 0):
        y = x if axis == -1 else x.T
        out = interpret(y, "mxfp4", hadamard_block_size=64, axis=axis, block_rows=16)
        expected = reference(y, "mxfp4", hadamard_block_size=64, axis=axis)
        assert_bit_identical(out, expected)
        assert int(jnp.isnan(out).sum()) == 3 * 64


def test_nvfp4_nan_and_inf():
    # A NaN or Inf makes the tensor amax non-finite, hence the tensor scale and every block NaN,
    # as the reference's two-level scale says.
    for special in (jnp.nan, jnp.inf):
        x = integers((32, 64), seed=16).at[7, 9].set(special)
        for axis in (-1, 0):
            options = dict(hadamard_block_size=16, axis=axis, split_tensor_scale=True)
            got = interpret(x, "nvfp4", **options)
            assert_same_operand(got, reference(x, "nvfp4", **options))
            assert bool(jnp.isnan(got[1]).all()) and bool(jnp.isnan(got[0]).all())


def test_stochastic_rounding_is_unbiased():
    x = normals((16, 64), seed=7)
    rotated = T.hadamard(x, block_size=64, out_dtype=jnp.float32)
    keys = jax.random.split(jax.random.key(8), 256)
    draws = jax.vmap(lambda k: interpret(x, "mxfp4", hadamard_block_size=64, rounding="stochastic",
                                         key=k, out_dtype=jnp.float32))(keys)
    scale = qjax.estimators.element_scale(rotated, "mxfp4")
    error = (draws.mean(0) - rotated) / scale  # in element units; each draw is off by < 2
    # Blocks' largest elements round to the clipped maximum (no prescale): leave |x| near max out.
    inside = jnp.abs(rotated / scale) <= 4
    assert float(jnp.abs(jnp.where(inside, error, 0)).max()) < 6 * 2 / np.sqrt(256)
    assert len(np.unique(np.asarray(draws[:, 0, 0]))) > 1


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_jit_vmap_scan(fmt):
    # Under vmap each example keeps its own tensor scale (nvfp4), as the reference per example.
    x = normals((4, 32, 64), seed=9) * jnp.array([1, 8, 0.25, 2], jnp.bfloat16)[:, None, None]
    fn = lambda v: interpret(v, fmt, hadamard_block_size=32, axis=0)
    expected = jnp.stack([reference(v, fmt, hadamard_block_size=32, axis=0) for v in x])
    assert_bit_identical(jax.jit(jax.vmap(fn))(x), expected)
    _, scanned = jax.lax.scan(lambda c, v: (c, fn(v)), 0, x)
    assert_bit_identical(scanned, expected)


def test_bad_arguments():
    x = normals((16, 64))
    with pytest.raises(ValueError, match="absmax-scaled block formats"):
        interpret(x, "mxint8", hadamard_block_size=64)
    with pytest.raises(ValueError, match="prescale applies to E8M0"):
        interpret(x, "nvfp4", hadamard_block_size=16, prescale=0.75)
    with pytest.raises(ValueError, match="split_tensor_scale needs a two-level format"):
        interpret(x, "mxfp4", hadamard_block_size=64, split_tensor_scale=True)
    with pytest.raises(ValueError, match="split_tensor_scale needs a two-level format"):
        reference(x, "mxfp4", hadamard_block_size=64, split_tensor_scale=True)
    with pytest.raises(ValueError, match="hadamard_block_size=48"):
        interpret(x, "mxfp4", hadamard_block_size=48)
    with pytest.raises(ValueError, match="hadamard_block_size=256"):
        interpret(jnp.zeros((16, 256), jnp.bfloat16), "mxfp4", hadamard_block_size=256)
    with pytest.raises(TypeError, match="bfloat16 or float16"):
        interpret(x.astype(jnp.float32), "mxfp4", hadamard_block_size=64)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        interpret(x, "mxfp4", hadamard_block_size=64, rounding="stochastic")
    with pytest.raises(ValueError, match="unknown rounding"):
        interpret(x, "mxfp4", hadamard_block_size=64, rounding="up")
    with pytest.raises(ValueError, match="multiple of hadamard_block_size"):
        interpret(x, "mxfp4", hadamard_block_size=64, axis=0)
    with pytest.raises(ValueError, match="signs must have shape"):
        interpret(x, "mxfp4", hadamard_block_size=64, signs=jnp.ones(32))
    with pytest.raises(ValueError, match="out of range"):
        interpret(x, "mxfp4", hadamard_block_size=64, axis=2)
    with pytest.raises(ValueError, match="block_rows"):
        interpret(x, "mxfp4", hadamard_block_size=64, block_rows=24)
    assert not HQ.supports("mxint8", 64) and not HQ.supports("mxfp4", None)
    assert HQ.supports("mxfp4", 32) and not HQ.supports("mxfp4", 8)
    assert HQ.supports("nvfp4", 16) and not HQ.supports("nvfp4", 8)


@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4", "quartet"])
def test_dot_general_reference_branch_matches_unfused_path(monkeypatch, recipe):
    # The dispatch's non-CUDA branch is the unfused path's computation: forcing the dispatch on
    # CPU (where platform_dependent takes the reference) leaves the gradients bit for bit.
    x = normals((64, 128), seed=11)
    w = normals((128, 128), seed=12) * 0.1
    key = jax.random.key(13)

    def grads():
        loss = lambda x, w: jnp.sum(qjax.ops.matmul(x, w, recipe=recipe, key=key)
                                    .astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

    expected = grads()
    calls = []

    def applies(v, gemm, spec, axis):
        calls.append(axis)
        return True

    monkeypatch.setattr(DG, "_rotate_quantize_kernel_applies", applies)
    got = grads()
    assert calls  # the dgrad and wgrad operands took the fused route
    for g, e in zip(got, expected):
        assert_bit_identical(g, e)


# --------------------------------------------------------------------------- GPU (Triton)


def tolerance_check(actual, expected, rotated, fmt="mxfp4", max_fraction=1e-3,
                    tensor_scale=1.0):
    """Elements that differ are one element step apart (at most the format's largest gap times
    the block's scale, without the ``tensor_scale`` that a split operand leaves out) and rare."""
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    scale = np.asarray(qjax.estimators.element_scale(rotated, fmt,
                                                     axis=-1 if rotated.ndim == 2 else 1))
    scale = scale / np.float32(tensor_scale)
    gap = {"mxfp4": 2.0, "nvfp4": 2.0, "mxfp8": 32.0}[fmt]
    differ = actual != expected
    assert differ.mean() <= max_fraction, f"{differ.mean():.2e} of the elements differ"
    assert np.all(np.abs(actual - expected)[differ] <= gap * scale[differ])


@pytest.mark.gpu
@pytest.mark.parametrize("shape,axis,h", [((4096, 2048), -1, 64), ((4096, 2048), 0, 64),
                                          ((2, 96, 1000), 1, 32), ((777, 256), -1, 128)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_gpu_exact_on_integers(shape, axis, h, rounding):
    x = integers(shape, seed=21)
    key = jax.random.key(4) if rounding == "stochastic" else None
    signs = T.random_signs(jax.random.key(2), h)
    options = dict(hadamard_block_size=h, signs=signs, axis=axis, rounding=rounding, key=key,
                   prescale=0.75)
    assert_bit_identical(HQ.hadamard_fake_quant_pallas(x, "mxfp4", **options),
                         jax.jit(functools.partial(reference, fmt="mxfp4", **options))(x))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,axis", [((4096, 2048), -1), ((4096, 2048), 0), ((2, 96, 1000), 1),
                                        ((777, 256), -1)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_gpu_nvfp4_exact_on_integers(shape, axis, rounding):
    x = integers(shape, seed=25)
    key = jax.random.key(8) if rounding == "stochastic" else None
    options = dict(hadamard_block_size=16, signs=T.random_signs(jax.random.key(9), 16), axis=axis,
                   rounding=rounding, key=key, split_tensor_scale=True)
    assert_same_operand(HQ.hadamard_fake_quant_pallas(x, "nvfp4", **options),
                        jax.jit(functools.partial(reference, fmt="nvfp4", **options))(x))


@pytest.mark.gpu
@pytest.mark.parametrize("block_rows,num_warps", [(64, 4), (256, 4)])
@pytest.mark.parametrize("axis", [-1, 0])
def test_gpu_nvfp4_random_inputs(axis, block_rows, num_warps):
    x = normals((4096, 2048), seed=26)
    signs = T.random_signs(jax.random.key(10), 16)
    options = dict(hadamard_block_size=16, signs=signs, axis=axis, rounding="stochastic",
                   key=jax.random.key(11), split_tensor_scale=True)
    (out, scale) = HQ.hadamard_fake_quant_pallas(x, "nvfp4", block_rows=block_rows,
                                                 num_warps=num_warps, **options)
    expected, expected_scale = jax.jit(functools.partial(reference, fmt="nvfp4", **options))(x)
    # The tensor amax comes from the kernel's own sums: equal, or one float32 ulp apart.
    np.testing.assert_allclose(np.asarray(scale), np.asarray(expected_scale), rtol=2.5e-7)
    rotated = T.hadamard(x, axis=axis, block_size=16, signs=signs, out_dtype=jnp.float32)
    if axis == 0:
        out, expected, rotated = out.T, expected.T, rotated.T
    tolerance_check(out, expected, rotated, "nvfp4",
                    tensor_scale=np.asarray(expected_scale).reshape(()))


@pytest.mark.gpu
@pytest.mark.parametrize("block_rows,num_warps", [(64, 4), (128, 8), (256, 8)])
@pytest.mark.parametrize("axis", [-1, 0])
def test_gpu_random_inputs(axis, block_rows, num_warps):
    x = normals((4096, 2048), seed=22)
    key = jax.random.key(5)
    signs = T.random_signs(jax.random.key(6), 64)
    options = dict(hadamard_block_size=64, signs=signs, axis=axis, rounding="stochastic",
                   key=key, prescale=0.75)
    out = HQ.hadamard_fake_quant_pallas(x, "mxfp4", block_rows=block_rows, num_warps=num_warps,
                                        **options)
    expected = jax.jit(functools.partial(reference, fmt="mxfp4", **options))(x)
    rotated = T.hadamard(x, axis=axis, block_size=64, signs=signs, out_dtype=jnp.float32)
    if axis == 0:
        out, expected, rotated = out.T, expected.T, rotated.T
    tolerance_check(out, expected, rotated)


@pytest.mark.gpu
@pytest.mark.parametrize("recipe,tolerance", [("mxfp4", 2e-2), ("quartet", 2e-2), ("nvfp4", 6e-2)])
def test_gpu_dot_general_dispatches(recipe, tolerance):
    # The cotangent is fixed rather than taken from the forward output: two compilations of the
    # forward GEMM may add in different orders (autotuning), and one ulp more in dy's largest
    # element moves NVFP4's tensor scale, which re-rounds a share of the E4M3 block scales (on
    # CPU: dx 3.9% apart, against 14.5% for another SR key). The kernel's tensor amax may differ
    # from XLA's by that ulp too, hence nvfp4's wider bound, still far below another draw's.
    x = normals((512, 1024), seed=23)
    w = normals((1024, 768), seed=24) * 0.05
    dy = normals((512, 768), seed=27)
    key = jax.random.key(7)

    def grads(x, w):
        return jax.vjp(lambda x, w: qjax.ops.matmul(x, w, recipe=recipe, key=key), x, w)[1](dy)

    fused = jax.jit(grads)
    assert "hadamard_fake_quant" in fused.lower(x, w).as_text()
    with qjax.use_kernels(False):
        unfused = jax.jit(grads)
        assert "hadamard_fake_quant" not in unfused.lower(x, w).as_text()
        expected = unfused(x, w)
    for g, e in zip(fused(x, w), expected):
        g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
        # One-step flips of a few quantized elements move the gradients by far less than the
        # quantization noise itself.
        assert np.linalg.norm(g - e) <= tolerance * np.linalg.norm(e)
