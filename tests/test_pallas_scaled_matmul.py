"""qjax.pallas.scaled_matmul: the block-scaled matmul kernel against its pure-JAX reference.

On CPU the kernel runs in the Pallas interpreter on small shapes (including shapes that are not
multiples of the tile); the tests marked ``gpu`` compile it with Triton and compare on large and
odd shapes.

Tolerance: the kernel's scaled operand tiles equal the dequantized operands exactly (bf16 holds
them), so kernel and reference differ only in float32 summation order (and, for nvfp4 / per-tensor
fp8, in where the fp32 tensor scale is multiplied). Each element must lie within
``2 (K + 4) 2**-24 (|A| @ |B|)_ij`` of the reference -- twice the worst-case float32 summation
error -- plus half a bf16 ulp of the reference for bf16 outputs. A wrong scale, block or tile is off
by far more. One test constructs inputs whose sums are exact and asserts bit equality.
"""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import formats as F
from qjax.pallas.scaled_matmul import scaled_matmul, scaled_matmul_reference, supports
from qjax.quantize import decode

# The module (qjax.pallas re-exports the function of the same name).
sm = importlib.import_module("qjax.pallas.scaled_matmul")

FORMATS = ("mxfp8", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "nvfp4", "fp8_e4m3",
           "fp8_e5m2")


def operands(fmt, m, k, n, *, seed=0, transpose_b=False):
    kx, kw, ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (m, k), jnp.float32)
    # Rows of x on different scales, so block scales differ across rows and K-blocks.
    x = x * 2.0 ** jax.random.randint(ks, (m, 1), -6, 7).astype(jnp.float32)
    w = jax.random.normal(kw, (k, n), jnp.float32)
    a = qjax.quantize(x, fmt)
    b = qjax.quantize(w.T, fmt) if transpose_b else qjax.quantize(w, fmt, axis=0)
    return a, b


def assert_close(actual, a, b, transpose_b=False, extra=0.0):
    """Elementwise within the summation-order bound stated in the module docstring, plus
    ``extra * (|A| @ |B|)``."""
    x = np.asarray(qjax.dequantize(a, jnp.float32), np.float64)
    w = np.asarray(qjax.dequantize(b, jnp.float32), np.float64)
    if transpose_b:
        w = w.T
    k = x.shape[1]
    ref = scaled_matmul_reference(a, b, jnp.float32, transpose_b=transpose_b)
    ref = np.asarray(ref, np.float64)
    bound = (2 * (k + 4) * 2.0**-24 + extra) * (np.abs(x) @ np.abs(w)) + 1e-30
    out = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    if jnp.asarray(actual).dtype == jnp.bfloat16:
        bound = bound + 2.0**-8 * np.abs(ref)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out)), "non-finite outputs"
    err = np.abs(out - ref)
    bad = np.argwhere(err > bound)
    assert bad.size == 0, (f"{len(bad)} of {out.size} outside the bound, e.g. at "
                           f"{bad[:3].tolist()}: {out[tuple(bad[:3].T)]} vs "
                           f"{ref[tuple(bad[:3].T)]}")


# --------------------------------------------------------------------------- CPU (interpreter)


@pytest.mark.parametrize("fmt", FORMATS)
def test_matches_reference_f32(fmt):
    a, b = operands(fmt, 24, 80, 40, seed=1)  # 2 x 2 tiles with edges, 3 K-steps (K padded)
    matmul = jax.jit(lambda a, b: scaled_matmul(a, b, out_dtype=jnp.float32, block_m=16,
                                                block_n=32, block_k=32, interpret=True))
    out = matmul(a, b)
    assert out.dtype == jnp.float32
    assert_close(out, a, b)


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4", "fp8_e4m3"])
def test_matches_reference_bf16_transposed(fmt):
    a, b = operands(fmt, 33, 160, 17, seed=2, transpose_b=True)  # K = 2.5 tiles of 64
    out = scaled_matmul(a, b, out_dtype=jnp.bfloat16, block_m=32, block_n=16, block_k=64,
                        group_m=1, transpose_b=True, interpret=True)  # 2 groups of row tiles
    assert out.dtype == jnp.bfloat16
    assert_close(out, a, b, transpose_b=True)


def test_default_tiles_single_program():
    a, b = operands("mxfp6_e2m3", 20, 64, 24, seed=3)  # tiles capped to 32 x 32 (one program)
    assert_close(scaled_matmul(a, b, interpret=True), a, b)


@pytest.mark.parametrize("fmt,transpose_b", [("mxfp8", True), ("fp8_e4m3", False)])
def test_fp8_mma_matches_reference(fmt, transpose_b):
    """mma='fp8' (per-block partial products rescaled by the E8M0 scales). The interpreter
    accumulates the fp8 dot in float32, so the strict bound applies on CPU."""
    a, b = operands(fmt, 24, 80, 40, seed=9, transpose_b=transpose_b)
    out = scaled_matmul(a, b, out_dtype=jnp.float32, block_m=16, block_n=32, block_k=64,
                        transpose_b=transpose_b, mma="fp8", interpret=True)
    assert_close(out, a, b, transpose_b=transpose_b)


def test_exact_sums_are_bit_identical():
    """mxfp4 operands with amax in [4, 8) per block: every scale is 1, every product a multiple of
    1/4 below 36 and every partial sum of 64 terms exact in float32, so any summation order gives
    the reference's result bit for bit."""
    kx, kw = jax.random.split(jax.random.key(4))
    x = jax.random.uniform(kx, (48, 64), jnp.float32, -8, 8).at[:, ::32].set(7.0)
    w = jax.random.uniform(kw, (64, 40), jnp.float32, -8, 8).at[::32, :].set(-7.0)
    a, b = qjax.quantize(x, "mxfp4"), qjax.quantize(w, "mxfp4", axis=0)
    assert np.all(np.asarray(a.scales.astype(jnp.float32)) == 1)
    out = scaled_matmul(a, b, out_dtype=jnp.float32, block_m=16, block_n=16, block_k=32,
                        interpret=True)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(scaled_matmul_reference(a, b, jnp.float32)))


def test_wrong_block_scale_is_caught():
    """The tolerance is tight enough to see a single scale off by one binade."""
    a, b = operands("mxfp8", 16, 64, 16, seed=5)
    codes = jax.lax.bitcast_convert_type(a.scales, jnp.uint8).at[3, 1].add(1)
    bad = qjax.QArray(a.values, jax.lax.bitcast_convert_type(codes, jnp.float8_e8m0fnu),
                      a.tensor_scale, a.fmt, a.axis, a.block_shape, a.dtype)
    out = scaled_matmul(bad, b, out_dtype=jnp.float32, interpret=True)
    with pytest.raises(AssertionError):
        assert_close(out, a, b)


def test_vmap():
    x = jax.random.normal(jax.random.key(7), (2, 16, 64))
    qa = qjax.quantize(x, "mxfp4")
    qb = qjax.quantize(jax.random.normal(jax.random.key(8), (64, 16)), "mxfp4", axis=0)
    batched = jax.vmap(lambda q: scaled_matmul(q, qb, out_dtype=jnp.float32, interpret=True))(qa)
    for i in range(2):
        qi = dataclasses.replace(jax.tree.map(lambda v: v[i], qa), block_shape=(1, 32))
        assert_close(batched[i], qi, qb)


@pytest.mark.parametrize("name", ["mxfp4", "mxfp6_e3m2", "mxfp6_e2m3", "fp8_e4m3", "fp8_e5m2",
                                  "nvfp4"])
def test_decode_codes_matches_qjax_decode(name):
    """The kernel's element decoder on every code, against qjax.quantize.decode (NaN as NaN)."""
    element = F.get(name).element
    codes = jnp.arange(1 << element.bits, dtype=jnp.uint32).astype(jnp.uint8)
    got = np.asarray(sm._decode_codes(codes, element))
    want = np.asarray(decode(codes.astype(jnp.uint32), element))
    np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(want)],
                                  want.view(np.uint32)[~np.isnan(want)])
    assert np.array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.parametrize("encoding", [F.E8M0, F.E4M3])
def test_decode_block_scales(encoding):
    codes = jnp.arange(256, dtype=jnp.uint32).astype(jnp.uint8)
    got = np.asarray(sm._decode_block_scales(codes, encoding))
    if encoding.power_of_two:
        want = np.asarray(jax.lax.bitcast_convert_type(codes, jnp.float8_e8m0fnu)
                          .astype(jnp.float32))
    else:
        want = np.asarray(jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn)
                          .astype(jnp.float32))
    assert np.array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(want)], want[~np.isnan(want)])


def test_grouped_program_order_is_a_bijection():
    for n_i, n_j, group_m in [(1, 1, 8), (5, 3, 2), (9, 4, 8), (16, 1, 8), (3, 7, 1)]:
        tiles = {tuple(int(v) for v in sm._grouped_ij(np.int32(pid), n_i, n_j, group_m))
                 for pid in range(n_i * n_j)}
        assert tiles == {(i, j) for i in range(n_i) for j in range(n_j)}


@pytest.mark.parametrize("fmt,mma", [("nvfp4", "bf16"), ("mxfp6_e2m3", "bf16"),
                                     ("mxfp8", "fp8"), ("fp8_e4m3", "fp8")])
def test_lowers_to_triton_ir(fmt, mma, monkeypatch):
    """Lowers the kernel to Triton IR for sm_90 without a GPU (the GPU description is faked), so
    CI catches primitives or tile shapes the Triton backend rejects. Compiling the IR to PTX still
    needs the device."""
    registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    from jax import export

    fake_gpu = type("FakeGpuInfo", (), {"compute_capability": 90})()
    fake_lib = type("FakeGpuInfoLib", (), {"get_gpu_info": staticmethod(lambda: fake_gpu)})
    monkeypatch.setattr(registration, "gpu_info_lib", fake_lib)
    a, b = operands(fmt, 200, 96, 72, seed=14, transpose_b=True)
    fn = jax.jit(lambda a, b: scaled_matmul(a, b, transpose_b=True, mma=mma))
    exported = export.export(fn, platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(a, b)
    assert "xla.gpu.triton" in exported.mlir_module()


def test_supports():
    for name in FORMATS:
        assert supports(name), name
    for name in ("int8", "int4", "mxint8", "ternary", "bf16"):
        assert not supports(name), name


def test_errors():
    a, b = operands("mxfp8", 16, 64, 16)
    with pytest.raises(ValueError, match="handles formats"):
        mxint8 = F.get("mxint8")
        scaled_matmul(dataclasses.replace(a, fmt=mxint8), dataclasses.replace(b, fmt=mxint8),
                      interpret=True)
    with pytest.raises(ValueError, match="one format"):
        scaled_matmul(a, dataclasses.replace(b, fmt=F.get("mxfp4")), interpret=True)
    with pytest.raises(ValueError, match="transpose_b"):
        scaled_matmul(a, b, transpose_b=True, interpret=True)
    with pytest.raises(ValueError, match="last axis"):
        scaled_matmul(b, b, interpret=True)
    with pytest.raises(ValueError, match="contraction lengths"):
        scaled_matmul(a, jax.tree.map(lambda v: v[:32], b), interpret=True)
    with pytest.raises(ValueError, match="multiple of the format's block size"):
        scaled_matmul(a, b, block_k=16, interpret=True)
    with pytest.raises(ValueError, match="power of two"):
        scaled_matmul(a, b, block_m=48, interpret=True)
    with pytest.raises(ValueError, match="out_dtype"):
        scaled_matmul(a, b, out_dtype=jnp.int32, interpret=True)
    with pytest.raises(ValueError, match="mma"):
        scaled_matmul(a, b, mma="int8", interpret=True)
    with pytest.raises(ValueError, match="mma='fp8'"):
        mxfp4 = F.get("mxfp4")
        scaled_matmul(dataclasses.replace(a, fmt=mxfp4), dataclasses.replace(b, fmt=mxfp4),
                      mma="fp8", interpret=True)
    with pytest.raises(TypeError, match="QArray"):
        scaled_matmul(jnp.ones((16, 64)), b, interpret=True)


# --------------------------------------------------------------------------- GPU (Triton)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("transpose_b", [False, True])
def test_gpu_1024(fmt, transpose_b):
    a, b = operands(fmt, 1024, 1024, 1024, seed=10, transpose_b=transpose_b)
    assert_close(scaled_matmul(a, b, out_dtype=jnp.float32, transpose_b=transpose_b), a, b,
                 transpose_b=transpose_b)
    assert_close(scaled_matmul(a, b, transpose_b=transpose_b), a, b, transpose_b=transpose_b)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4", "mxfp6_e3m2", "fp8_e4m3"])
@pytest.mark.parametrize("shape", [(1000, 4096, 3000), (129, 96, 4000), (17, 2080, 33)])
def test_gpu_odd_shapes(fmt, shape):
    m, k, n = shape
    a, b = operands(fmt, m, k, n, seed=11)
    assert_close(scaled_matmul(a, b, out_dtype=jnp.float32), a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(64, 64, 64, 4, 3), (128, 128, 128, 8, 3),
                                    (128, 256, 64, 8, 3), (256, 128, 64, 8, 4)])
def test_gpu_block_configs(config):
    bm, bn, bk, warps, stages = config
    for fmt in ("mxfp8", "nvfp4"):
        a, b = operands(fmt, 1536, 1024, 768, seed=12)
        out = scaled_matmul(a, b, out_dtype=jnp.float32, block_m=bm, block_n=bn, block_k=bk,
                            num_warps=warps, num_stages=stages)
        assert_close(out, a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp8_e5m2", "fp8_e4m3"])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_gpu_fp8_mma(fmt, transpose_b):
    """Hopper's fp8 MMA keeps about 14 bits while accumulating (DeepSeek-V3 report, section
    3.3.2), so the bound gets 2**-12 (|A| @ |B|) on top of the fp32 one."""
    a, b = operands(fmt, 1000, 4096, 1536, seed=13, transpose_b=transpose_b)
    out = scaled_matmul(a, b, out_dtype=jnp.float32, transpose_b=transpose_b, mma="fp8")
    assert_close(out, a, b, transpose_b=transpose_b, extra=2.0**-12)
