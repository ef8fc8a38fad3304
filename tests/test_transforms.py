"""Tests for qjax.transforms: blockwise (randomized) Hadamard transforms.

The reference is an independent float64 NumPy construction, H[i, j] = (-1)^popcount(i & j) /
sqrt(n) (the closed form, not the Sylvester recursion the library uses), applied as a dense matrix
to each block. Compiling is what costs time on a small CPU, so most checks run several transforms
inside one ``jax.jit``, and the tests of JAX transformations force each code path (``force_path``)
on small blocks instead of using block sizes on both sides of the threshold.
"""

import doctest
import functools
import math
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax import transforms
from qjax.transforms import hadamard, hadamard_matrix, inverse_hadamard, random_signs

RTOL, ATOL = 1e-5, 2e-5  # float32 transform vs float64 reference, inputs ~ N(0, 1)
PATHS = ("dense", "butterfly")


def force_path(path: str):
    """Makes hadamard/inverse_hadamard use one code path for every block size, so the tests of
    the butterfly can use small (cheap to compile) blocks."""
    threshold = 1 << 30 if path == "dense" else 1
    return mock.patch.object(transforms, "DENSE_MAX_BLOCK_SIZE", threshold)


@pytest.fixture(params=PATHS)
def path(request):
    with force_path(request.param):
        yield request.param


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def reference_matrix(n: int) -> np.ndarray:
    """Orthonormal Sylvester Hadamard matrix in float64, from (-1)^popcount(i & j) / sqrt(n)."""
    i = np.arange(n, dtype=np.uint16)
    odd = (np.bitwise_count(np.bitwise_and.outer(i, i)) & 1).astype(bool)
    return np.where(odd, -1.0, 1.0) / math.sqrt(n)


def reference_transform(x, axis, block_size, signs=None, inverse=False):
    """Maps each block v of ``block_size`` along ``axis`` to H (s v), or s (H v) if inverse."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    b = x.shape[-1] if block_size is None else block_size
    blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // b, b))
    s = np.ones(b) if signs is None else np.asarray(signs, np.float64)
    h = reference_matrix(b)
    if inverse:
        out = s * np.einsum("ij,...j->...i", h, blocks)
    else:
        out = np.einsum("ij,...j->...i", h, s * blocks)
    return np.moveaxis(out.reshape(x.shape), -1, axis)


def normal(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def rademacher(n, seed=1):
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0], np.float32), size=n)


# --------------------------------------------------------------------------- hadamard_matrix


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 1024])
def test_hadamard_matrix_is_symmetric_orthonormal_sylvester(n):
    h = np.asarray(hadamard_matrix(n))
    assert h.shape == (n, n) and h.dtype == np.float32
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_array_equal(np.abs(h), np.float32(1 / math.sqrt(n)))
    np.testing.assert_allclose(h.astype(np.float64) @ h, np.eye(n), atol=1e-6)
    np.testing.assert_array_equal(np.sign(h), np.sign(reference_matrix(n)))
    if n >= 2:  # Sylvester recursion H_n = [[H, H], [H, -H]] / sqrt(2)
        half = np.sign(np.asarray(hadamard_matrix(n // 2)))
        np.testing.assert_array_equal(np.sign(h), np.block([[half, half], [half, -half]]))


def test_hadamard_matrix_dtypes():
    h16 = hadamard_matrix(32, jnp.bfloat16)
    assert h16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(h16, np.float32),
                                  np.asarray(hadamard_matrix(32)).astype(jnp.bfloat16)
                                  .astype(np.float32))


@pytest.mark.parametrize("n", [0, 3, 12, -4])
def test_hadamard_matrix_rejects_non_powers_of_two(n):
    with pytest.raises(ValueError, match=rf"n must be a power of two .*got {n}"):
        hadamard_matrix(n)


# --------------------------------------------------------------------------- against the reference

REFERENCE_CASES = [  # (shape, axis, block_size, with_signs): block sizes 2 ... 4096, ranks 1 ... 4
    ((3, 4096), -1, 4096, True),
    ((2, 4096), 1, 2048, False),
    ((4096, 3), 0, 1024, True),
    ((5, 1024), -1, 512, False),
    ((2, 512, 3), 1, 256, True),
    ((256, 2, 3), 0, 128, False),
    ((2, 3, 4, 128), -1, 64, True),
    ((2, 64, 3, 2), -3, 32, False),
    ((96,), 0, 16, True),
    ((4, 3, 40), 2, 8, False),
    ((6, 12, 5), -2, 4, True),
    ((10, 7), 0, 2, False),
    ((7, 256), -1, None, True),
    ((32, 5), 0, None, False),
]


@pytest.mark.parametrize("shape,axis,block_size,with_signs", REFERENCE_CASES)
def test_matches_dense_reference(shape, axis, block_size, with_signs):
    x = normal(shape, seed=len(shape) + (block_size or 0))
    s = rademacher(block_size or shape[axis]) if with_signs else None
    kw = dict(axis=axis, block_size=block_size, signs=s)
    forward, inverse = hadamard(x, **kw), inverse_hadamard(x, **kw)
    assert forward.shape == inverse.shape == x.shape
    assert forward.dtype == inverse.dtype == jnp.float32
    np.testing.assert_allclose(forward, reference_transform(x, axis, block_size, s), RTOL, ATOL)
    np.testing.assert_allclose(inverse, reference_transform(x, axis, block_size, s, inverse=True),
                               RTOL, ATOL)


@pytest.mark.parametrize("block_size", [16, 512])
def test_spike_is_spread_evenly(block_size):
    """The reason for the rotation: a lone outlier becomes block_size values of size 1/sqrt(b)."""
    x = np.zeros((2, 2 * block_size), np.float32)
    x[1, block_size + 3 % block_size] = 1.0
    y = np.asarray(hadamard(x, block_size=block_size))
    np.testing.assert_array_equal(y[0], 0)
    np.testing.assert_array_equal(y[1, :block_size], 0)
    np.testing.assert_allclose(np.abs(y[1, block_size:]), 1 / math.sqrt(block_size), rtol=1e-6)


# --------------------------------------------------------------------------- the two code paths


PATH_CASES = [  # (block_size, axis, inverse): both sides of DENSE_MAX_BLOCK_SIZE = 256, small ends
    (2, -1, False), (16, -1, False), (256, -1, False), (512, -1, False),
    (4, -1, True), (8, 0, True), (64, 0, False),
]


def test_dense_and_butterfly_paths_agree():
    inputs = [(normal((2, 2 * b) if axis == -1 else (2 * b, 3), seed=b), rademacher(b))
              for b, axis, _ in PATH_CASES]

    @jax.jit  # one program for all cases: compiling is what costs time here
    def both_paths(inputs):
        return [tuple(transforms._transform(x, axis, b, s, inverse, path)
                      for path in (transforms._dense_path, transforms._butterfly_path))
                for (x, s), (b, axis, inverse) in zip(inputs, PATH_CASES)]

    for (x, s), (b, axis, inverse), (dense, butterfly) in zip(inputs, PATH_CASES,
                                                               both_paths(inputs)):
        case = f"block_size={b}, axis={axis}, inverse={inverse}"
        np.testing.assert_allclose(dense, butterfly, rtol=1e-5, atol=1e-5, err_msg=case)
        np.testing.assert_allclose(butterfly, reference_transform(x, axis, b, s, inverse), RTOL,
                                   ATOL, err_msg=case)


def test_dispatch_threshold():
    """Blocks up to DENSE_MAX_BLOCK_SIZE use the dense GEMM, larger ones the butterfly."""

    def uses_gemm(block_size):
        f = functools.partial(hadamard, block_size=block_size)
        return "dot_general" in str(jax.make_jaxpr(f)(jnp.zeros((2, 2 * block_size))))

    assert uses_gemm(2) and uses_gemm(transforms.DENSE_MAX_BLOCK_SIZE)
    assert not uses_gemm(2 * transforms.DENSE_MAX_BLOCK_SIZE) and not uses_gemm(4096)
    with force_path("butterfly"):
        assert not uses_gemm(16)
    with force_path("dense"):
        assert uses_gemm(1024)


# --------------------------------------------------------------------------- orthonormality


@pytest.mark.parametrize("block_size", [2, 64, 512])
def test_orthonormal_norm_preserved_and_invertible(block_size):
    x = normal((3, 2048), seed=7)
    s = rademacher(block_size, seed=block_size)
    kw = dict(block_size=block_size)

    @jax.jit
    def run(x, s):
        y = hadamard(x, **kw, signs=s)
        plain = hadamard(x, **kw)
        return dict(y=y, back=inverse_hadamard(y, **kw, signs=s), plain=plain,
                    plain_inverse=inverse_hadamard(x, **kw), twice=hadamard(plain, **kw))

    out = run(x, s)
    norms = lambda a: np.linalg.norm(np.asarray(a, np.float64).reshape(3, -1, block_size), axis=-1)
    np.testing.assert_allclose(norms(out["y"]), norms(x), rtol=1e-5)  # per-block norms
    np.testing.assert_allclose(out["back"], x, rtol=1e-5, atol=1e-5)  # inverse ∘ forward = I
    # Without signs H is symmetric and its own inverse: hadamard == inverse_hadamard, an involution.
    np.testing.assert_array_equal(out["plain"], out["plain_inverse"])
    np.testing.assert_allclose(out["twice"], x, rtol=1e-5, atol=1e-5)


def test_transform_matrix_is_block_diagonal_symmetric(path):
    """The matrix of hadamard along an axis of length 2b is diag(H_b, H_b) (no signs)."""
    block_size = 16
    eye = np.eye(2 * block_size, dtype=np.float32)
    m = np.asarray(hadamard(eye, axis=0, block_size=block_size))  # column j = transform of e_j
    np.testing.assert_allclose(m, m.T, atol=1e-7)
    np.testing.assert_allclose(m, np.kron(np.eye(2), reference_matrix(block_size)), atol=1e-6)


# --------------------------------------------------------------------------- GEMM invariance

# Tolerance: max |rotated product - exact float64 product| <= GEMM_ATOL * sqrt(K) * max|X| * max|W|.
# Observed: about 2e-8 of that scale, the same as the unrotated float32 product X @ W.
GEMM_ATOL = 1e-6


@pytest.mark.parametrize("block_size,with_signs", [(16, False), (128, True), (512, True)])
def test_gemm_invariance(block_size, with_signs):
    m, k, n = 24, 1024, 40
    x, w = normal((m, k), seed=1), normal((k, n), seed=2)
    x[3, 5] = 60.0  # an outlier, as in real activations
    s = rademacher(block_size, seed=block_size) if with_signs else None

    @jax.jit
    def rotated_product(x, w, s):
        xr = hadamard(x, axis=1, block_size=block_size, signs=s)
        wr = hadamard(w, axis=0, block_size=block_size, signs=s)
        return xr, jnp.matmul(xr, wr, precision="highest")

    xr, got = rotated_product(x, w, s)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    scale = math.sqrt(k) * np.abs(x).max() * np.abs(w).max()
    assert np.abs(np.asarray(got, np.float64) - exact).max() <= GEMM_ATOL * scale
    assert np.abs(xr).max() < 0.5 * np.abs(x).max()  # the outlier was spread out


def test_gemm_invariance_batched_activations():
    b, k = 64, 256
    x, w = normal((2, 5, k), seed=3), normal((k, 12), seed=4)
    s = random_signs(jax.random.key(0), b)
    got = jax.jit(lambda x, w, s: jnp.einsum(
        "btk,kn->btn", hadamard(x, block_size=b, signs=s),
        hadamard(w, axis=0, block_size=b, signs=s), precision="highest"))(x, w, s)
    exact = np.einsum("btk,kn->btn", x.astype(np.float64), w.astype(np.float64))
    scale = math.sqrt(k) * np.abs(x).max() * np.abs(w).max()
    np.testing.assert_allclose(got, exact, rtol=0, atol=GEMM_ATOL * scale)


# --------------------------------------------------------------------------- random_signs


def test_random_signs():
    key = jax.random.key(42)
    s = random_signs(key, 4096)
    assert s.shape == (4096,) and s.dtype == jnp.float32
    assert set(np.unique(np.asarray(s)).tolist()) == {-1.0, 1.0}
    np.testing.assert_array_equal(s, random_signs(key, 4096))  # deterministic
    np.testing.assert_array_equal(s, jax.jit(random_signs, static_argnums=1)(key, 4096))
    assert not np.array_equal(s, random_signs(jax.random.key(43), 4096))
    assert abs(float(np.mean(s))) < 4 / math.sqrt(4096)  # 4 standard deviations
    others = {tuple(np.asarray(random_signs(jax.random.key(i), 4096)[:32]).tolist())
              for i in range(5)}
    assert len(others) == 5  # five keys, five different vectors
    s16 = random_signs(key, 4096, dtype=jnp.bfloat16)
    assert s16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(s16, np.float32), s)
    legacy = random_signs(jax.random.PRNGKey(0), 4096)
    assert set(np.unique(np.asarray(legacy)).tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("block_size", [0, 1, 3, 48, -16])
def test_random_signs_rejects_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size must be a power of two >= 2"):
        random_signs(jax.random.key(0), block_size)


# --------------------------------------------------------------------------- errors


def test_error_axis_length_not_a_multiple():
    with pytest.raises(ValueError, match=r"axis 1 has length 48, which is not a multiple of "
                                         r"block_size=32.*largest allowed block size that "
                                         r"divides 48 is 16"):
        hadamard(jnp.zeros((4, 48)), axis=-1, block_size=32)
    with pytest.raises(ValueError, match=r"axis 0 has length 100, which is not a multiple of "
                                         r"block_size=64"):
        inverse_hadamard(jnp.zeros((100, 3)), axis=0, block_size=64)


@pytest.mark.parametrize("block_size", [0, 1, 3, 24, 100, -8])
def test_error_block_size_not_a_power_of_two(block_size):
    with pytest.raises(ValueError, match=rf"block_size must be a power of two >= 2 .*"
                                         rf"got {block_size}"):
        hadamard(jnp.zeros((2, 96)), block_size=block_size)


def test_error_whole_axis_not_a_power_of_two():
    with pytest.raises(ValueError, match=r"block_size=None .* axis 1 has length 96.*"
                                         r"divides 96 is 32"):
        hadamard(jnp.zeros((2, 96)))
    with pytest.raises(ValueError, match=r"axis 0 has length 1"):
        hadamard(jnp.zeros((1,)))


def test_other_argument_errors():
    with pytest.raises(ValueError, match=r"signs must have shape \(block_size,\) = \(16,\); "
                                         r"got shape \(32,\)"):
        hadamard(jnp.zeros((2, 64)), block_size=16, signs=jnp.ones(32))
    with pytest.raises(ValueError, match="axis 2 is out of range for an array of rank 2"):
        hadamard(jnp.zeros((2, 64)), axis=2)
    with pytest.raises(ValueError, match="axis -3 is out of range"):
        hadamard(jnp.zeros((2, 64)), axis=-3, block_size=2)
    with pytest.raises(TypeError, match="floating-point input, got dtype int32"):
        hadamard(jnp.zeros((2, 64), jnp.int32))
    with pytest.raises(TypeError, match="block_size must be an int"):
        hadamard(jnp.zeros((2, 64)), block_size=16.0)
    with pytest.raises(TypeError, match="block_size must be an int, got a bool"):
        hadamard(jnp.zeros((2, 64)), block_size=True)


# --------------------------------------------------------------------------- dtypes and shapes


@pytest.mark.parametrize("dtype,path", [(jnp.bfloat16, "dense"), (jnp.bfloat16, "butterfly"),
                                        (jnp.float16, "butterfly")])
def test_low_precision_input_computes_in_float32_and_rounds_once(dtype, path):
    block_size = 8
    x = jnp.asarray(normal((2, 64), seed=5), dtype)
    s = rademacher(block_size)
    kw = dict(block_size=block_size, signs=s)
    with force_path(path):
        y = hadamard(x, **kw)  # eager: the public entry point, as a user calls it
        assert y.dtype == dtype and y.shape == x.shape
        expected, back = jax.jit(lambda x, y: (hadamard(x.astype(jnp.float32), **kw).astype(dtype),
                                               inverse_hadamard(y, **kw)))(x, y)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))
    assert back.dtype == dtype
    np.testing.assert_allclose(np.asarray(back, np.float32), np.asarray(x, np.float32),
                               rtol=0.02, atol=0.02)


def test_float64_stays_float64():
    with jax.enable_x64(True):
        x = normal((3, 512), seed=6, dtype=np.float64)
        for path in PATHS:
            with force_path(path):
                y = hadamard(jnp.asarray(x), block_size=64)
            assert y.dtype == jnp.float64
            np.testing.assert_allclose(y, reference_transform(x, -1, 64), rtol=1e-12, atol=1e-12)


def test_empty_and_singleton_axes():
    assert hadamard(jnp.zeros((0, 64)), block_size=16).shape == (0, 64)
    assert hadamard(jnp.zeros((64, 0)), axis=0, block_size=64).shape == (64, 0)
    x = normal((1, 1, 32), seed=8)
    np.testing.assert_allclose(hadamard(x), reference_transform(x, -1, None), RTOL, ATOL)


# --------------------------------------------------------------------------- JAX transformations
# Each test runs once per code path (the `path` fixture), on blocks of B = 8.

B = 8


def test_jit_with_traced_signs(path):
    x = normal((2, 4 * B), seed=9)
    s = rademacher(B)
    f = jax.jit(inverse_hadamard, static_argnames=("axis", "block_size"))
    np.testing.assert_allclose(f(x, axis=-1, block_size=B, signs=s),
                               reference_transform(x, 1, B, s, inverse=True), RTOL, ATOL)


def test_vmap(path):
    x = normal((4 * B, 5, 3), seed=10)
    s = rademacher(B)
    # vmap over axis 1; each (4B, 3) slice is transformed along its axis 0.
    f = jax.vmap(lambda a: hadamard(a, axis=0, block_size=B, signs=s), in_axes=1, out_axes=1)
    np.testing.assert_allclose(jax.jit(f)(x), reference_transform(x, 0, B, s), RTOL, ATOL)


def test_grad_is_the_transpose(path):
    """d/dx sum(hadamard(x) * g) = (H diag(s))ᵀ g = diag(s) H g = inverse_hadamard(g)."""
    x, g = normal((2, 4 * B), seed=11), normal((2, 4 * B), seed=12)
    s = rademacher(B)

    @jax.jit
    def grads(x, g, s):
        return (jax.grad(lambda a: jnp.sum(hadamard(a, block_size=B, signs=s) * g))(x),
                jax.grad(lambda a: jnp.sum(hadamard(a, block_size=B) * g))(x),
                jax.grad(lambda a: jnp.sum(inverse_hadamard(a, block_size=B, signs=s) * g))(x),
                jax.grad(lambda sg: jnp.sum(hadamard(x, block_size=B, signs=sg) * g))(s))

    grad, grad_plain, grad_inv, grad_signs = grads(x, g, s)
    np.testing.assert_allclose(grad, reference_transform(g, -1, B, s, inverse=True), RTOL, ATOL)
    # Without signs H is symmetric, so the VJP is H g itself.
    np.testing.assert_allclose(grad_plain, reference_transform(g, -1, B), RTOL, ATOL)
    # The gradient of the inverse is the forward transform.
    np.testing.assert_allclose(grad_inv, reference_transform(g, -1, B, s), RTOL, ATOL)
    # With respect to the signs: the sum over blocks of x * (H g), per position in the block.
    expected = (x.astype(np.float64) * reference_transform(g, -1, B)).reshape(-1, B).sum(0)
    np.testing.assert_allclose(grad_signs, expected, rtol=1e-5, atol=1e-5)


def test_grad_bfloat16_and_forward_mode(path):
    x = jnp.asarray(normal((2, 4 * B), seed=13), jnp.bfloat16)
    t = normal((2, 4 * B), seed=14)

    @jax.jit
    def run(x, t):
        grad = jax.grad(lambda a: jnp.sum(hadamard(a, block_size=B).astype(jnp.float32)))(x)
        _, tangent = jax.jvp(lambda a: hadamard(a, block_size=B), (t,), (t,))
        return grad, tangent

    grad, tangent = run(x, t)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(tangent, reference_transform(t, -1, B), RTOL, ATOL)


def test_scan_and_checkpoint(path):
    xs = normal((3, 2, 4 * B), seed=15)
    g = normal((2, 4 * B), seed=16)
    s = rademacher(B)
    kw = dict(block_size=B, signs=s)

    def step(total, x):
        y = hadamard(x, **kw)
        return total + jnp.sum(y * y), inverse_hadamard(y, **kw)

    loss = lambda a: jnp.sum(jnp.sin(hadamard(a, **kw)) * g)

    @jax.jit
    def run(xs):
        return jax.lax.scan(step, jnp.float32(0), xs), jax.grad(jax.checkpoint(loss))(xs[0])

    (total, back), remat_grad = run(xs)
    np.testing.assert_allclose(back, xs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total, np.sum(xs.astype(np.float64) ** 2), rtol=1e-5)
    expected = reference_transform(np.cos(reference_transform(xs[0], -1, B, s)) * g, -1, B, s,
                                   inverse=True)
    np.testing.assert_allclose(remat_grad, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- properties


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_random_shapes_match_reference_and_invert(data):
    rank = data.draw(st.integers(1, 4), label="rank")
    axis = data.draw(st.integers(-rank, rank - 1), label="axis")
    log_b = data.draw(st.integers(1, 8), label="log2 block_size")
    n_blocks = data.draw(st.integers(1, 3), label="blocks")
    shape = [data.draw(st.integers(1, 3)) for _ in range(rank)]
    shape[axis] = n_blocks << log_b
    block_size = data.draw(st.sampled_from([1 << log_b, None] if n_blocks == 1 else [1 << log_b]))
    with_signs = data.draw(st.booleans(), label="signs")
    x = normal(tuple(shape), seed=data.draw(st.integers(0, 2 ** 16), label="seed"))
    s = rademacher(1 << log_b) if with_signs else None
    kw = dict(axis=axis, block_size=block_size)
    with force_path(data.draw(st.sampled_from(PATHS), label="path")):
        y, back = jax.jit(lambda x, s: (hadamard(x, **kw, signs=s), inverse_hadamard(
            hadamard(x, **kw, signs=s), **kw, signs=s)))(x, s)
    np.testing.assert_allclose(y, reference_transform(x, axis, block_size, s), RTOL, ATOL)
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)


def test_docstring_examples():
    result = doctest.testmod(transforms, extraglobs={"jax": jax, "jnp": jnp, "np": np},
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8 and result.failed == 0


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("axis", [0, -1])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_narrow_input_with_float32_output(block_size, axis, dtype):
    # bf16/f16 x, float32 out: a GEMM in x's dtype with the ±1 matrix, scaled once afterwards;
    # the same transform as on the upcast x up to float32 rounding of the sums.
    rng = np.random.default_rng(block_size)
    x = jnp.asarray(rng.standard_normal((128, 192)) * 2.0 ** rng.integers(-6, 6, (128, 1)), dtype)
    signs = random_signs(jax.random.key(block_size), block_size)
    out = jax.jit(lambda x, s: hadamard(x, axis=axis, block_size=block_size, signs=s,
                                        out_dtype=jnp.float32))(x, signs)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    expected = hadamard(np.asarray(x, np.float64), axis=axis, block_size=block_size,
                        signs=np.asarray(signs, np.float64))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-6, atol=1e-6 * np.abs(expected).max())
    # Small integers: every sum is exact, and 1/sqrt(16), 1/sqrt(64) are powers of two.
    ints = jnp.asarray(rng.integers(-8, 9, (64, 128)), dtype)
    if block_size != 32:
        np.testing.assert_array_equal(
            np.asarray(hadamard(ints, axis=axis, block_size=block_size, signs=signs,
                                out_dtype=jnp.float32)),
            np.asarray(hadamard(ints.astype(jnp.float32), axis=axis, block_size=block_size,
                                signs=signs)))
    with pytest.raises(TypeError, match="out_dtype must be a float dtype"):
        hadamard(x, block_size=block_size, out_dtype=jnp.int32)
    # The inverse (signs after H) the same way: what the saved quantized operands go through.
    back = inverse_hadamard(x, axis=axis, block_size=block_size, signs=signs,
                            out_dtype=jnp.float32)
    assert back.dtype == jnp.float32
    expected = inverse_hadamard(np.asarray(x, np.float64), axis=axis, block_size=block_size,
                                signs=np.asarray(signs, np.float64))
    np.testing.assert_allclose(np.asarray(back), expected, rtol=2e-6,
                               atol=1e-6 * np.abs(expected).max())
