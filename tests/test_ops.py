"""Tests of qjax.ops: dot_general / einsum under training recipes, against plain compositions.

References are built from qjax.fake_quant / qjax.hadamard and float32 matmuls at HIGHEST precision,
following the three-GEMM definition in qjax/ops/dot_general.py's docstring, independently of the
op's canonicalisation and custom VJP.
"""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import qjax
from qjax import ops
from qjax import recipes as R

# The module (qjax.ops.dot_general is the function it defines), for its private _gemm_operand.
dot_general_module = importlib.import_module("qjax.ops.dot_general")

HI = lax.Precision.HIGHEST
DN = (((1,), (0,)), ((), ()))  # x (M, K) @ w (K, N)
# A per-tensor format with a power-of-two scale: quick to compile, and the reference can quantize
# operands of any layout as given.
PT_FMT = qjax.formats.Format("e4m3_per_tensor_e8m0", qjax.formats.E4M3_ELEM,
                             qjax.formats.Scaling(qjax.formats.PerTensor(), qjax.formats.E8M0))
PER_TENSOR = R.Recipe("per_tensor", *[R.GemmSpec(R.OperandSpec(PT_FMT), R.OperandSpec(PT_FMT))] * 3)
DETERMINISTIC_STE = ("fp8", "fp8_blockwise", "mxfp8", "bitnet158", "switchback", "int8")


def _has_estimators():
    try:
        from qjax import estimators  # noqa: F401
    except ImportError:
        return False
    return True


needs_estimators = pytest.mark.skipif(not _has_estimators(), reason="qjax.estimators not built yet")


def _normal(seed, shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def _fq(v, spec: R.OperandSpec, axis, key=None):
    """Reference quantizer of one operand (float32 in, float32 out)."""
    if spec.fmt is None:
        return v
    assert spec.prescale == 1, "reference covers plain quantizers"
    return qjax.fake_quant(v, spec.fmt, axis=axis, rounding=spec.rounding,
                           key=key if spec.rounding == "stochastic" else None,
                           scale_mode=spec.scale_mode)


def _mm(a, b):
    return jnp.matmul(a, b, precision=HI)


def reference_forward(recipe, x, w):
    """Y = Q(x) Q(w) for 2-D x (M, K), w (K, N) with a deterministic, untransformed forward."""
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    return _mm(_fq(x32, recipe.forward.lhs, -1), _fq(w32, recipe.forward.rhs, 0))


def reference_grads(recipe, x, w, dy):
    """(dx, dw) of a deterministic STE recipe without transforms, from its three GEMMs."""
    x32, w32, dy32 = (a.astype(jnp.float32) for a in (x, w, dy))
    if recipe.save_for_backward == "quantized":
        x32, w32 = _fq(x32, recipe.forward.lhs, -1), _fq(w32, recipe.forward.rhs, 0)
    dx = _mm(_fq(dy32, recipe.dgrad.lhs, -1), _fq(w32, recipe.dgrad.rhs, 1).T)
    dw = _mm(_fq(x32, recipe.wgrad.lhs, 0).T, _fq(dy32, recipe.wgrad.rhs, 0))
    return dx.astype(x.dtype), dw.astype(w.dtype)


@functools.partial(jax.jit, static_argnames=("recipe", "dn"))
def op_value_and_grads(recipe, x, w, dy, key=None, dn=DN):
    y, vjp = jax.vjp(lambda a, b: ops.dot_general(a, b, dn, recipe=recipe, key=key), x, w)
    return (y, *vjp(dy.astype(y.dtype)))


# --------------------------------------------------------------------------- bf16: exactly lax


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("dn, lhs_shape, rhs_shape", [
    (DN, (8, 24), (24, 12)),
    ((((2,), (1,)), ((0,), (0,))), (3, 5, 16), (3, 16, 7)),
    ((((1, 3), (0, 2)), ((0,), (1,))), (4, 6, 5, 8), (6, 4, 8, 3)),
])
def test_bf16_recipe_is_exactly_lax_dot_general(dtype, dn, lhs_shape, rhs_shape):
    x, w = _normal(0, lhs_shape, dtype), _normal(1, rhs_shape, dtype)
    want_y, want_vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dn), x, w)
    dy = _normal(2, want_y.shape, want_y.dtype)
    y, dx, dw = op_value_and_grads("bf16", x, w, dy, dn=dn)
    for got, want in zip((y, dx, dw), (want_y, *want_vjp(dy))):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_bf16_recipe_passes_precision_and_preferred_element_type():
    x, w = _normal(0, (4, 8), jnp.bfloat16), _normal(1, (8, 4), jnp.bfloat16)
    got = ops.dot_general(x, w, DN, HI, jnp.float32, recipe="bf16")
    want = lax.dot_general(x, w, DN, HI, jnp.float32)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- named recipes


@pytest.mark.parametrize("name, dtype", [
    *[(n, jnp.float32) for n in DETERMINISTIC_STE + ("nvfp4", "fp4_all_the_way")],
    *[(n, jnp.bfloat16) for n in ("fp8", "mxfp8")]])
def test_forward_matches_reference_composition(name, dtype):
    recipe = R.get(name)
    x, w = _normal(3, (32, 256), dtype, 3.0), _normal(4, (256, 64), dtype)
    key = jax.random.key(5) if recipe.needs_key else None
    y = ops.dot_general(x, w, DN, recipe=recipe, key=key)
    want = np.asarray(reference_forward(recipe, x, w).astype(dtype), np.float32)
    assert y.dtype == dtype
    # The same quantized values; the GEMM sums in another order (in bfloat16 with an outer scale
    # split off where that is exact: test_gemm_operands_are_the_quantized_values).
    tol = (1e-2 if dtype == jnp.bfloat16 else 1e-5) * np.abs(want).max()
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=0, atol=tol)


def _wide_range(seed, shape):
    """Normal values times 2^e, e uniform in [-30, 30] per element: blocks of every scale."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    exponents = jax.random.randint(k2, shape, -30, 31).astype(jnp.float32)
    return jax.random.normal(k1, shape) * jnp.exp2(exponents)


@pytest.mark.parametrize("spec", [
    *[R.OperandSpec(n) for n in qjax.formats.names() if qjax.formats.get(n).bf16_gemm],
    *[R.OperandSpec(f) for f in (R.NVFP4_16x16, R.INT8_PER_TENSOR, R.INT4_PER_CHANNEL)],
    R.OperandSpec("mxfp4", "stochastic", prescale=0.75),
    R.OperandSpec("nvfp4", "stochastic", prescale=0.75),
    R.OperandSpec("int4"), R.OperandSpec(R.FP8_E4M3_1x128),
    R.OperandSpec(qjax.formats.Format(  # two-level, 4 + 4 significant bits: still exact in bf16
        "e2m3_two_level", qjax.formats.E2M3_ELEM,
        qjax.formats.Scaling(qjax.formats.Block(16), qjax.formats.E4M3, tensor_scale=True)))],
    ids=lambda s: (
        f"{s.fmt.name}-{s.rounding}-{s.prescale}"))
def test_gemm_operands_are_the_quantized_values(spec):
    """What the quantized GEMMs multiply: values (bfloat16 where ``Format.bf16_gemm`` says that
    is exact) times an outer scale give ``quantize_operand``'s result: bit for bit for MX formats
    and pre-scaled quantizers, to one float32 rounding where a float outer scale is split off."""
    x = _wide_range(60, (2, 64, 96))
    kind = spec.fmt.bf16_gemm
    for axis in (1, 2):
        key = jax.random.key(axis) if spec.needs_key else None
        values, outer = dot_general_module._gemm_operand(x, spec, axis=axis, key=key)
        want = np.asarray(ops.quantize_operand(x, spec, axis=axis, key=key))
        narrow = kind == "dequantized" or (kind == "outer_scale" and spec.prescale == 1)
        assert values.dtype == (jnp.bfloat16 if narrow else jnp.float32)
        got = np.asarray(values.astype(jnp.float32) * (1 if outer is None else outer))
        if outer is None or spec.prescale != 1:
            np.testing.assert_array_equal(got, want)
        else:
            assert np.ndim(outer) == 3 and np.shape(outer)[axis] == 1
            np.testing.assert_allclose(got, want, rtol=2**-23, atol=0)


def test_mxfp4_forward_is_unquantized():
    x, w = _normal(3, (64, 64)), _normal(4, (64, 64))
    y = ops.dot_general(x, w, DN, recipe="mxfp4", key=jax.random.key(0))
    np.testing.assert_array_equal(y, _mm(x, w))


@pytest.mark.parametrize("name, dtype", [
    *[(n, jnp.float32) for n in DETERMINISTIC_STE],
    *[(n, jnp.bfloat16) for n in ("fp8", "switchback")]])
def test_ste_recipe_gradients_equal_their_three_gemm_composition(name, dtype):
    recipe = R.get(name)
    x, w = _normal(6, (256, 128), dtype, 2.0), _normal(7, (128, 128), dtype)
    dy = _normal(8, (256, 128), dtype)
    _, dx, dw = op_value_and_grads(recipe, x, w, dy)
    # Same quantized operands; the GEMMs may sum in another order than jnp.matmul of a transpose.
    for got, want in zip((dx, dw), reference_grads(recipe, x, w, dy)):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        tol = (1e-2 if dtype == jnp.bfloat16 else 1e-5) * np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)


@pytest.mark.parametrize("fmt", ["mxfp8", "ternary"])
def test_ste_forward_only_recipe_gradient_is_the_gradient_of_fake_quant(fmt):
    """Forward quantized, backward unquantized on the saved quantized operands: exactly autodiff
    of fake_quant(x) @ fake_quant(w) (fake_quant's gradient is the STE)."""
    recipe = R.Recipe("ste_fwd", forward=R.GemmSpec(R.OperandSpec(fmt), R.OperandSpec(fmt)),
                      save_for_backward="quantized")
    x, w = _normal(9, (16, 64)), _normal(10, (64, 32))

    def composed(a, b):
        return (_mm(qjax.fake_quant(a, fmt, axis=-1), qjax.fake_quant(b, fmt, axis=0)) ** 2).sum()

    def op(a, b):
        return (ops.dot_general(a, b, DN, recipe=recipe) ** 2).sum()

    for got, want in zip(jax.grad(op, (0, 1))(x, w), jax.grad(composed, (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_nvfp4_weight_and_its_transpose_quantize_identically():
    """16x16 2-D scaling: W blocked along K (forward) equals W blocked along N (dgrad)."""
    w = _normal(11, (64, 48), scale=5.0)
    along_k = qjax.fake_quant(w, R.NVFP4_16x16, axis=0)
    along_n = qjax.fake_quant(w, R.NVFP4_16x16, axis=1)
    np.testing.assert_array_equal(along_k, along_n)
    # and the 1x16 format does not have that property (the test can fail)
    assert not np.array_equal(qjax.fake_quant(w, "nvfp4", axis=0),
                              qjax.fake_quant(w, "nvfp4", axis=1))


# --------------------------------------------------------------------------- stochastic recipes


def _mean_and_stderr(samples):
    samples = np.asarray(samples, np.float64)
    return samples.mean(0), samples.std(0, ddof=1) / np.sqrt(len(samples))


def _sampled_grads(recipe, x, w, dy, n_keys):
    keys = jax.random.split(jax.random.key(123), n_keys)
    fn = jax.jit(jax.vmap(lambda k: op_value_and_grads(recipe, x, w, dy, key=k)[1:]))
    return fn(keys)


def _assert_unbiased(samples, expected, z=5.0):
    mean, se = _mean_and_stderr(samples)
    bound = z * se + 1e-5 * np.abs(expected).max()
    assert np.all(np.abs(mean - expected) <= bound), np.abs(mean - expected).max()


def test_mxfp4_backward_gemms_are_unbiased():
    x, w, dy = _normal(12, (64, 64)), _normal(13, (64, 64)), _normal(14, (64, 64), scale=1e-3)
    dxs, dws = _sampled_grads(R.get("mxfp4"), x, w, dy, 256)
    _assert_unbiased(dxs, np.asarray(_mm(dy, w.T), np.float64))
    _assert_unbiased(dws, np.asarray(_mm(x.T, dy), np.float64))
    assert np.std(np.asarray(dxs), 0).max() > 0  # the draws differ across keys


def test_mxfp4_without_the_3_4_prescale_is_biased():
    """With OCP floor scales, SR clips block maxima in [6, 8): the pre-scale is what removes it."""
    spec = R.OperandSpec("mxfp4", "stochastic")
    biased = R.Recipe("mxfp4_no_prescale", dgrad=R.GemmSpec(spec, spec, "random_hadamard", 64))
    x = _normal(12, (64, 64))
    w = jnp.full((64, 64), 7.0) * jnp.sign(_normal(13, (64, 64)))  # every block max at 7 -> 6
    dy = jnp.eye(64)
    dxs, _ = _sampled_grads(dataclasses.replace(biased, dgrad=R.GemmSpec(spec, spec)), x, w, dy,
                            64)
    mean, _ = _mean_and_stderr(dxs)
    assert np.abs(mean - np.asarray(w.T)).max() > 0.5


def test_fp4_all_the_way_dgrad_is_unbiased_given_the_rtn_weight():
    recipe = R.get("fp4_all_the_way")
    x, w, dy = _normal(15, (32, 64)), _normal(16, (64, 64)), _normal(17, (32, 64), scale=1e-2)
    dxs, _ = _sampled_grads(recipe, x, w, dy, 256)
    # E[SR(dy)] = dy except where NVFP4's rounded E4M3 block scale clips a block maximum; the
    # expectation is then the clipped value, which the RTN quantizer at the same scale also hits.
    expected = _mm(dy, qjax.fake_quant(w, "nvfp4", axis=1).T)
    mean, se = _mean_and_stderr(dxs)
    rel = np.abs(mean - np.asarray(expected)).max() / np.abs(expected).max()
    assert rel < 0.02


def test_nvfp4_with_sr_activations_in_wgrad_is_unbiased():
    nv = R.get("nvfp4")
    recipe = dataclasses.replace(nv, name="nvfp4_sr_x", wgrad=dataclasses.replace(
        nv.wgrad, lhs=R.OperandSpec("nvfp4", "stochastic")))
    x, w, dy = _normal(18, (64, 32)), _normal(19, (32, 32)), _normal(20, (64, 32))
    _, dws = _sampled_grads(recipe, x, w, dy, 256)
    mean, se = _mean_and_stderr(dws)
    expected = np.asarray(_mm(x.T, dy), np.float64)
    # NVFP4's rounded E4M3 scales can clip block maxima (a small bias): allow 1% of the scale.
    assert np.all(np.abs(mean - expected) <= 5 * se + 0.01 * np.abs(expected).max())


def test_keys_are_split_per_gemm_and_reproducible():
    sr = R.OperandSpec("mxfp8", "stochastic")
    recipe = R.Recipe("sr_dy", dgrad=R.GemmSpec(sr, R.OperandSpec("mxfp8")),
                      wgrad=R.GemmSpec(R.OperandSpec("mxfp8"), sr))
    x, w, dy = _normal(21, (32, 64)), _normal(22, (64, 32)), _normal(23, (32, 32))
    a = op_value_and_grads(recipe, x, w, dy, key=jax.random.key(1))
    b = op_value_and_grads(recipe, x, w, dy, key=jax.random.key(1))
    c = op_value_and_grads(recipe, x, w, dy, key=jax.random.key(2))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[2], c[2])
    # each draw uses its documented slot of the key layout
    k = ops.gemm_keys(jax.random.key(1))
    dyq = qjax.fake_quant(dy, "mxfp8", axis=-1, rounding="stochastic", key=k["dgrad.lhs"])
    np.testing.assert_allclose(a[1], _mm(dyq, qjax.fake_quant(w, "mxfp8", axis=1).T),
                               rtol=1e-6, atol=1e-5)
    dyq = qjax.fake_quant(dy, "mxfp8", axis=0, rounding="stochastic", key=k["wgrad.rhs"])
    np.testing.assert_allclose(a[2], _mm(qjax.fake_quant(x, "mxfp8", axis=0).T, dyq),
                               rtol=1e-6, atol=1e-5)


def test_missing_key_is_a_clear_error():
    with pytest.raises(ValueError, match="recipe 'nvfp4' draws random numbers.*pass key="):
        ops.dot_general(jnp.ones((16, 32)), jnp.ones((32, 16)), DN, recipe="nvfp4")


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("transform", ["hadamard", "random_hadamard"])
def test_hadamard_gemms_equal_the_plain_product_without_quantization(transform):
    gemm = R.GemmSpec(transform=transform, hadamard_block_size=16)
    recipe = R.Recipe("rot", forward=gemm, dgrad=gemm, wgrad=gemm)
    x, w, dy = _normal(24, (32, 64)), _normal(25, (64, 48)), _normal(26, (32, 48))
    got = op_value_and_grads(recipe, x, w, dy, key=jax.random.key(0))
    want_y, vjp = jax.vjp(lambda a, b: _mm(a, b), x, w)
    for g, v in zip(got, (want_y, *vjp(dy))):
        np.testing.assert_allclose(g, v, rtol=1e-5, atol=1e-4)


def test_hadamard_changes_the_quantized_product():
    """The rotation is applied before quantizing (else the Hadamard tests could not fail)."""
    spec = R.OperandSpec("mxfp4")
    plain = R.Recipe("plain", forward=R.GemmSpec(spec, spec))
    rotated = R.Recipe("rot", forward=R.GemmSpec(spec, spec, "hadamard", 32))
    x, w = _normal(27, (16, 64)), _normal(28, (64, 16))
    x = x.at[:, 3].mul(30.0)  # an outlier channel: rotation spreads it, shrinking the error
    exact = _mm(x, w)
    err = lambda r: float(jnp.linalg.norm(ops.dot_general(x, w, DN, recipe=r) - exact))  # noqa
    assert err(rotated) < 0.8 * err(plain)
    rotated_ref = _mm(qjax.fake_quant(qjax.hadamard(x, axis=1, block_size=32), "mxfp4", axis=1),
                      qjax.fake_quant(qjax.hadamard(w, axis=0, block_size=32), "mxfp4", axis=0))
    np.testing.assert_array_equal(ops.dot_general(x, w, DN, recipe=rotated), rotated_ref)


def test_transform_block_must_tile_the_contraction():
    with pytest.raises(ValueError, match="dgrad GEMM applies a random_hadamard.*length 32 must "
                                         "be a multiple of 64"):
        ops.dot_general(jnp.ones((64, 64)), jnp.ones((64, 32)), DN, recipe="mxfp4",
                        key=jax.random.key(0))


# --------------------------------------------------------------------------- estimators


@needs_estimators
def test_quest_forward_and_trust_gradient_follow_the_estimator():
    from qjax import estimators

    recipe = R.get("quartet")
    x, w = _normal(29, (32, 64), scale=2.0), _normal(30, (64, 32))
    quest = estimators.get("quest")
    xr = qjax.hadamard(x, axis=1, block_size=32)
    wr = qjax.hadamard(w, axis=0, block_size=32)
    want = _mm(quest(xr, "mxfp4", axis=-1), quest(wr, "mxfp4", axis=0))
    np.testing.assert_allclose(ops.dot_general(x, w, DN, recipe=recipe, key=jax.random.key(0)),
                               want, rtol=1e-6, atol=1e-5)
    # gradient: the op's dx equals the estimator's VJP applied to the (quantized) dgrad
    fwd_only = dataclasses.replace(recipe, dgrad=R.UNQUANTIZED, wgrad=R.UNQUANTIZED)
    dy = _normal(31, (32, 32))
    _, dx, _ = op_value_and_grads(fwd_only, x, w, dy, key=jax.random.key(0))
    composed = jax.vjp(lambda a: _mm(quest(qjax.hadamard(a, axis=1, block_size=32), "mxfp4",
                                           axis=-1), quest(wr, "mxfp4", axis=0)), x)[1]
    np.testing.assert_allclose(dx, composed(dy)[0], rtol=1e-4, atol=1e-4)


@needs_estimators
@pytest.mark.parametrize("name", ["quest"])  # quartet: test_quest_forward_and_trust_gradient...
def test_quest_recipes_run_and_train_signal(name):
    x, w, dy = _normal(32, (64, 64)), _normal(33, (64, 64)), _normal(34, (64, 64))
    y, dx, dw = op_value_and_grads(name, x, w, dy, key=jax.random.key(0))
    assert np.isfinite(np.asarray(dx)).all() and np.isfinite(np.asarray(dw)).all()
    cos = lambda a, b: float(jnp.vdot(a, b) / jnp.linalg.norm(a) / jnp.linalg.norm(b))  # noqa
    assert cos(y, _mm(x, w)) > 0.9 and cos(dx, _mm(dy, w.T)) > 0.8


# --------------------------------------------------------------------------- transformations


def _loss(recipe, key, x, w):
    return (ops.dot_general(x, w, DN, recipe=recipe, key=key) ** 2).mean()


_MXFP8_SR = R.OperandSpec("mxfp8", "stochastic")
MXFP8_SR_RHT = R.Recipe(  # cheap to compile; random draws in both backward GEMMs
    "mxfp8_sr_rht", forward=R.GemmSpec(R.OperandSpec("mxfp8"), R.OperandSpec("mxfp8")),
    dgrad=R.GemmSpec(_MXFP8_SR, _MXFP8_SR, "random_hadamard", 32),
    wgrad=R.GemmSpec(R.OperandSpec("mxfp8"), _MXFP8_SR))


def test_jit_grad_vmap_scan_remat():
    recipe, key = MXFP8_SR_RHT, jax.random.key(7)
    x, w = _normal(35, (32, 64)), _normal(36, (64, 32))
    loss = functools.partial(_loss, recipe, key)
    grad = jax.jit(jax.grad(loss, (0, 1)))
    base = grad(x, w)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), (0, 1)))(x, w)
    for g, e in zip(remat, base):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-7)
    # vmap over a batch of independent problems equals the problems one by one
    xs, ws = jnp.stack([x, 3 * x]), jnp.stack([w, -w])
    batched = jax.jit(jax.vmap(jax.grad(loss, (0, 1))))(xs, ws)
    for i in range(2):
        for g, e in zip(batched, grad(xs[i], ws[i])):  # same shapes: no new compilation
            np.testing.assert_allclose(g[i], e, rtol=1e-5, atol=1e-6)

    # lax.scan over layers equals the unrolled chain
    def chain(ws, x, scan):
        def body(h, w):
            return jnp.tanh(ops.dot_general(h, w, DN, recipe=recipe, key=key)), None
        if scan:
            return lax.scan(body, x, ws)[0].sum()
        for i in range(ws.shape[0]):
            x = body(x, ws[i])[0]
        return x.sum()

    layers = jnp.stack([_normal(37 + i, (64, 64), scale=0.2) for i in range(2)])
    x64 = _normal(40, (32, 64))
    g_scan = jax.jit(jax.grad(functools.partial(chain, scan=True)))(layers, x64)
    g_loop = jax.jit(jax.grad(functools.partial(chain, scan=False)))(layers, x64)
    np.testing.assert_allclose(g_scan, g_loop, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- dimension numbers


DIMENSION_CASES = [
    # (dimension_numbers, lhs shape, rhs shape)
    ((((2,), (1,)), ((0,), (0,))), (2, 16, 64), (2, 64, 32)),           # batched matmul
    ((((0,), (1,)), ((), ())), (64, 8), (16, 64)),                      # transposed operands
    ((((1, 3), (0, 2)), ((0,), (1,))), (3, 8, 4, 16), (8, 3, 16, 5)),   # 2 contracting, batch
    ((((2,), (0,)), ((), ())), (4, 6, 32), (32, 2, 3)),                  # several free dims
]


@pytest.mark.parametrize("dn, lhs_shape, rhs_shape", DIMENSION_CASES)
def test_arbitrary_dimension_numbers_per_tensor_recipe(dn, lhs_shape, rhs_shape):
    """A per-tensor format ignores the layout, so the reference quantizes the operands as given
    and differentiates lax.dot_general itself."""
    x, w = _normal(41, lhs_shape, scale=2.0), _normal(42, rhs_shape)
    dy = _normal(43, lax.dot_general(x, w, dn).shape)
    y, dx, dw = op_value_and_grads(PER_TENSOR, x, w, dy, dn=dn)
    xq, wq, dyq = (qjax.fake_quant(a, PT_FMT) for a in (x, w, dy))
    np.testing.assert_allclose(y, lax.dot_general(xq, wq, dn, precision=HI), rtol=1e-6, atol=1e-5)
    _, ref_vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dn, precision=HI), xq, wq)
    for got, want in zip((dx, dw), ref_vjp(dyq)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("dn, lhs_shape, rhs_shape", DIMENSION_CASES)
def test_arbitrary_dimension_numbers_blocked_recipe_matches_canonical_form(dn, lhs_shape,
                                                                          rhs_shape):
    """Block formats: the op on general dimension numbers equals the op on the hand-made
    canonical (batch, M, K) x (batch, K, N) layout."""
    (lc, rc), (lb, rb) = dn
    x, w = _normal(44, lhs_shape), _normal(45, rhs_shape)
    lf = [d for d in range(x.ndim) if d not in lc + lb]
    rf = [d for d in range(w.ndim) if d not in rc + rb]
    size = lambda a, ds: int(np.prod([a.shape[d] for d in ds]))  # noqa: E731
    xc = jnp.transpose(x, lb + tuple(lf) + lc).reshape(size(x, lb), size(x, lf), size(x, lc))
    wc = jnp.transpose(w, rb + rc + tuple(rf)).reshape(size(w, rb), size(w, rc), size(w, rf))
    canonical = (((2,), (1,)), ((0,), (0,)))
    got = ops.dot_general(x, w, dn, recipe="mxfp8")
    want = ops.dot_general(xc, wc, canonical, recipe="mxfp8").reshape(got.shape)
    np.testing.assert_array_equal(got, want)
    ref = _mm(qjax.fake_quant(xc, "mxfp8", axis=2, scale_mode="rceil"),
              qjax.fake_quant(wc, "mxfp8", axis=1, scale_mode="rceil"))
    np.testing.assert_array_equal(want, ref.reshape(got.shape))


@pytest.mark.parametrize("subscripts, lhs_shape, rhs_shape", [
    ("btd,dh->bth", (2, 3, 64), (64, 8)),
    ("bhqd,bhkd->bhqk", (2, 2, 4, 32), (2, 2, 5, 32)),
    ("...d,df->...f", (2, 3, 32), (32, 4)),
    ("ij,jk", (4, 32), (32, 6)),
    ("bqd,dh->bhq", (2, 3, 32), (32, 5)),
    ("ijx,jk->ik", (4, 32, 3), (32, 6)),  # x summed out of the lhs first
])
def test_einsum_matches_jnp_einsum(subscripts, lhs_shape, rhs_shape):
    a, b = _normal(46, lhs_shape), _normal(47, rhs_shape)
    np.testing.assert_allclose(ops.einsum(subscripts, a, b, recipe="bf16", precision=HI),
                               jnp.einsum(subscripts, a, b, precision=HI), rtol=1e-6, atol=1e-5)
    got, vjp = jax.vjp(lambda u, v: ops.einsum(subscripts, u, v, recipe=PER_TENSOR), a, b)
    a_gemm, gemm_subscripts = a, subscripts
    if "x" in subscripts:  # an index of one operand only is summed before the GEMM quantizes
        a_gemm, gemm_subscripts = a.sum(-1), subscripts.replace("x", "")
    want = jnp.einsum(gemm_subscripts, qjax.fake_quant(a_gemm, PT_FMT),
                      qjax.fake_quant(b, PT_FMT), precision=HI)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert all(g.shape == o.shape for g, o in zip(vjp(jnp.ones_like(got)), (a, b)))


def test_einsum_keeps_operand_roles():
    """The first operand is always X: its format applies to it, not to the second."""
    spec_x = R.OperandSpec("int8")
    recipe = R.Recipe("x_only", forward=R.GemmSpec(spec_x, R.HIGH_PRECISION))
    a, b = _normal(48, (4, 32)), _normal(49, (6, 32))
    got = ops.einsum("ik,jk->ij", a, b, recipe=recipe)
    np.testing.assert_allclose(got, _mm(qjax.fake_quant(a, "int8", axis=1), b.T), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("subscripts, shapes, match", [
    ("ij,jk,kl", [(2, 3), (3, 4), (4, 5)], "exactly two operands"),
    ("ii,ij", [(3, 3), (3, 4)], "repeated index"),
    ("ij,jk->iz", [(2, 3), (3, 4)], "appear in no operand"),
    ("ij,jk", [(2, 3), (4, 5)], "index 'j' has size 3 in lhs and 4 in rhs"),
    ("ijk,jk", [(2, 3), (3, 4)], "name 3 axes but the operand has rank 2"),
])
def test_einsum_errors(subscripts, shapes, match):
    with pytest.raises(ValueError, match=match):
        ops.einsum(subscripts, *[jnp.ones(s) for s in shapes], recipe="fp8")


def test_dot_general_errors():
    with pytest.raises(ValueError, match="unknown recipe 'fp9'; valid names: bf16"):
        ops.dot_general(jnp.ones((2, 32)), jnp.ones((32, 2)), DN, recipe="fp9")
    with pytest.raises(ValueError, match="lhs axis 1 \\(size 32\\) and rhs axis 0 \\(size 16\\)"):
        ops.dot_general(jnp.ones((2, 32)), jnp.ones((16, 2)), DN, recipe="fp8")
    with pytest.raises(TypeError, match="floating-point operands; lhs has dtype int32"):
        ops.dot_general(jnp.ones((2, 32), jnp.int32), jnp.ones((32, 2)), DN, recipe="fp8")


def test_flax_dense_accepts_the_op_as_dot_general():
    import flax.linen as nn

    dense = nn.Dense(8, dot_general=functools.partial(ops.dot_general, recipe="mxfp8"))
    x = _normal(50, (4, 32))
    params = dense.init(jax.random.key(0), x)
    kernel = params["params"]["kernel"]
    want = _mm(qjax.fake_quant(x, "mxfp8", scale_mode="rceil"),
               qjax.fake_quant(kernel, "mxfp8", axis=0, scale_mode="rceil"))
    np.testing.assert_array_equal(dense.apply(params, x), want)


# --------------------------------------------------------------------------- training


# Final training loss relative to the unquantized (bf16-recipe) run: fp8 / mxfp8 within 10% (the
# issue's bound); mxfp4 (unquantized forward) within 25%; nvfp4 within 2x and quartet within
# 2.25x on this tiny 64-wide model, whose GEMMs see ~14% relative FP4 error in the forward pass
# (measured ratios are in docs/recipes.md).
TRAINING_BOUNDS = {"fp8": 1.10, "mxfp8": 1.10, "mxfp4": 1.25, "nvfp4": 2.0, "quartet": 2.25}


@functools.lru_cache(maxsize=None)
def _train(recipe_name, steps=150):
    """A 2-layer MLP (64 -> 64 -> 64) fit to a fixed noisy teacher; returns the final loss."""
    teacher = [_normal(60, (64, 64), scale=0.3), _normal(61, (64, 64), scale=0.3)]
    x = _normal(62, (256, 64))
    y = jnp.tanh(x @ teacher[0]) @ teacher[1] + 0.3 * _normal(63, (256, 64))
    params = {"w1": _normal(64, (64, 64), scale=0.125), "w2": _normal(65, (64, 64), scale=0.125)}
    opt = optax.adam(1e-2)
    recipe = R.get(recipe_name)

    def loss(p, key):
        k1, k2 = jax.random.split(key)
        h = jnp.tanh(ops.dot_general(x, p["w1"], DN, recipe=recipe, key=k1))
        return ((ops.dot_general(h, p["w2"], DN, recipe=recipe, key=k2) - y) ** 2).mean()

    @jax.jit
    def run(params):
        def step(carry, key):
            p, s = carry
            value, g = jax.value_and_grad(loss)(p, key)
            updates, s = opt.update(g, s, p)
            return (optax.apply_updates(p, updates), s), value

        (p, _), losses = lax.scan(step, (params, opt.init(params)),
                                  jax.random.split(jax.random.key(0), steps))
        return loss(p, jax.random.key(1)), losses[0]

    final, first = run(params)
    return float(final), float(first)


@pytest.mark.parametrize("name", [
    n if n != "quartet" else pytest.param(n, marks=needs_estimators) for n in TRAINING_BOUNDS])
def test_training_reaches_the_unquantized_loss(name):
    base, first = _train("bf16")
    assert base < 0.1 * first  # the task is learnt
    final, _ = _train(name)
    assert final <= TRAINING_BOUNDS[name] * base, (name, final, base)


# --------------------------------------------------------------------------- convolution

CONV_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, strides=(1, 1), padding="SAME", rhs_dilation=None):
    return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=rhs_dilation,
                                    dimension_numbers=CONV_DN, precision=HI)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_conv_bf16_recipe_is_exactly_lax(dtype):
    x, w = _normal(70, (2, 6, 6, 8), dtype), _normal(71, (3, 3, 8, 4), dtype)
    conv = lambda a, b, fn: fn(a, b, (2, 1), "SAME", dimension_numbers=CONV_DN)  # noqa: E731
    y, vjp = jax.vjp(lambda a, b: conv(a, b, functools.partial(ops.conv_general_dilated,
                                                               recipe="bf16")), x, w)
    want_y, want_vjp = jax.vjp(lambda a, b: conv(a, b, lax.conv_general_dilated), x, w)
    dy = _normal(72, y.shape, dtype)
    for got, want in zip((y, *vjp(dy)), (want_y, *want_vjp(dy))):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_conv_three_gemms_follow_the_recipe():
    """Forward: features blocked; dgrad: output features; wgrad: batch (the tokens)."""
    recipe = R.get("mxfp8")
    x, w = _normal(73, (4, 5, 5, 64), scale=2.0), _normal(74, (3, 3, 64, 32))
    q = lambda v, axis: qjax.fake_quant(v, "mxfp8", axis=axis, scale_mode="rceil")  # noqa: E731
    conv = functools.partial(ops.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                             rhs_dilation=(2, 1), dimension_numbers=CONV_DN, recipe=recipe)
    y, vjp = jax.jit(lambda a, b: jax.vjp(lambda u, v: conv(u, v), a, b))(x, w)
    np.testing.assert_array_equal(y, _conv(q(x, 3), q(w, 2), rhs_dilation=(2, 1)))
    dy = _normal(75, y.shape)
    dx, dw = vjp(dy)
    ref = functools.partial(_conv, rhs_dilation=(2, 1))
    want_dx = jax.vjp(lambda a: ref(a, q(w, 3)), x)[1](q(dy, 3))[0]
    want_dw = jax.vjp(lambda b: ref(q(x, 0), b), w)[1](q(dy, 0))[0]
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5 * np.abs(want_dx).max())
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5 * np.abs(want_dw).max())


def test_conv_hadamard_without_quantization_is_the_plain_conv():
    gemm = R.GemmSpec(transform="random_hadamard", hadamard_block_size=4)
    recipe = R.Recipe("rot", forward=gemm, dgrad=gemm, wgrad=gemm)
    x, w = _normal(76, (4, 5, 5, 8), scale=2.0), _normal(77, (3, 3, 8, 4))
    y, vjp = jax.vjp(lambda a, b: ops.conv_general_dilated(
        a, b, (1, 1), "VALID", dimension_numbers=CONV_DN, recipe=recipe,
        key=jax.random.key(0)), x, w)
    want_y, want_vjp = jax.vjp(lambda a, b: _conv(a, b, padding="VALID"), x, w)
    dy = _normal(78, y.shape)
    for got, want in zip((y, *vjp(dy)), (want_y, *want_vjp(dy))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_conv_errors():
    x, w = jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 4, 8))
    with pytest.raises(ValueError, match="feature_group_count=1"):
        ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=CONV_DN,
                                 feature_group_count=2, recipe="mxfp8")
    with pytest.raises(ValueError, match="recipe 'nvfp4' draws random numbers"):
        ops.conv_general_dilated(x, jnp.ones((3, 3, 8, 8)), (1, 1), "SAME",
                                 dimension_numbers=CONV_DN, recipe="nvfp4")
