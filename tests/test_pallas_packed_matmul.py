"""qjax.pallas.packed_matmul: the small-M packed-weight matmul against its pure-JAX reference.

On CPU the kernel runs in the Pallas interpreter (``decode="bits"``) on small shapes, including
M = 1 and shapes that are not multiples of the tiles; the inline-PTX decode routine runs in a NumPy
model of its instructions (``emulate_decode``) against the bits decode, and the kernel is lowered to
Triton IR with a faked GPU. The tests marked ``gpu`` compile and run every decode and method.

Tolerance: the decoded weight elements are exact in bf16 and ``x * element`` is exact in fp32, so
kernel and reference (``dequantize`` in fp32, one fp32 matmul) differ only in the order and grouping
of fp32 sums (the kernel rounds each group's partial sum times its scale once). Each element must
lie within ``2 (K + 4) 2**-24 (|x| @ |W|)_ij`` of the reference -- twice the worst-case fp32
summation error -- plus half a bf16 ulp of the reference for bf16 outputs. A wrong scale, group,
nibble or column is off by far more (``test_wrong_scale_is_caught``).
"""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import formats as F
from qjax.pallas.packed_matmul import (
    emulate_decode,
    pack_weight,
    packed_matmul,
    packed_matmul_reference,
    supports,
)

pm = importlib.import_module("qjax.pallas.packed_matmul")

FORMATS = ("mxfp4", "nvfp4", "int4")


def int4_group(size, scale=F.BF16):
    base = F.get("int4")
    return dataclasses.replace(base, name=f"int4_g{size}", scaling=dataclasses.replace(
        base.scaling, granularity=F.Block(size), scale=scale))


def weight(fmt, k, n, seed=0):
    kw, ks = jax.random.split(jax.random.key(seed))
    w = jax.random.normal(kw, (k, n), jnp.float32)
    # Columns on different scales, so group scales differ along N and K.
    w = w * 2.0 ** jax.random.randint(ks, (1, n), -5, 6).astype(jnp.float32)
    return qjax.quantize(w, fmt, axis=0)


def activations(m, k, seed=1, batch=()):
    x = jax.random.normal(jax.random.key(seed), (*batch, m, k), jnp.float32)
    return x.astype(jnp.bfloat16)


def assert_close(actual, x, q):
    """Elementwise within the bound stated in the module docstring."""
    xf = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    wf = np.asarray(qjax.dequantize(q, jnp.float32), np.float64)
    k = wf.shape[0]
    ref = np.asarray(packed_matmul_reference(x, q, jnp.float32), np.float64)
    bound = 2 * (k + 4) * 2.0**-24 * (np.abs(xf) @ np.abs(wf)) + 1e-30
    out = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    if jnp.asarray(actual).dtype == jnp.bfloat16:
        bound = bound + 2.0**-8 * np.abs(ref)
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out)), "non-finite outputs"
    bad = np.argwhere(np.abs(out - ref) > bound)
    assert bad.size == 0, (f"{len(bad)} of {out.size} outside the bound, e.g. at "
                           f"{bad[:3].tolist()}: {out[tuple(bad[:3].T)]} vs "
                           f"{ref[tuple(bad[:3].T)]}")


# --------------------------------------------------------------------------- layout and decode


@pytest.mark.parametrize("kind", ["e2m1", "int4"])
@pytest.mark.parametrize("part", ["both", "split"])
def test_asm_decode_routine_matches_bits(kind, part):
    """The PTX routine of decode='asm' / 'asm_split', run instruction by instruction by a NumPy
    model, decodes every byte as the interpreter's decode does."""
    rng = np.random.default_rng(0)
    packed = np.concatenate([np.arange(256, dtype=np.uint8),
                             rng.integers(0, 256, 1024, dtype=np.uint8)]).reshape(40, 32)
    low, high = emulate_decode(packed, kind, part)
    want_low, want_high = pm._decode_bits(jnp.asarray(packed), kind)
    np.testing.assert_array_equal(low, np.asarray(want_low).view(np.uint16))
    np.testing.assert_array_equal(high, np.asarray(want_high).view(np.uint16))


def test_asm_decode_values():
    """Independent of the code: nibble c of a byte decodes to the E2M1 / int4 value of code c."""
    e2m1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    byte = np.array([0x1F, 0xA7, 0x38, 0xC4], np.uint8)  # low nibbles F, 7, 8, 4; high 1, A, 3, C
    low, high = emulate_decode(byte, "e2m1")
    as_float = lambda v: np.asarray(v).view(jnp.bfloat16).astype(np.float32)  # noqa: E731
    np.testing.assert_array_equal(as_float(low), [-6, 6, -0.0, 2])
    np.testing.assert_array_equal(as_float(high), [e2m1[1], -e2m1[2], e2m1[3], -e2m1[4]])
    low, high = emulate_decode(byte, "int4")
    np.testing.assert_array_equal(as_float(low), [-7, 7, 0, 4])
    np.testing.assert_array_equal(as_float(high), [1, -2, 3, -4])


@pytest.mark.parametrize("fmt", [*FORMATS, int4_group(64), int4_group(128, F.FP32)])
@pytest.mark.parametrize("k", [96, 1000])
def test_pack_round_trip(fmt, k):
    q = weight(fmt, k, 24, seed=k)
    for source in (q, q.pack()):
        pw = pack_weight(source)
        assert pw.data.dtype == jnp.uint8 and pw.data.shape == (pw.k_padded // 2, 64)
        assert pw.k_padded % 256 == 0 and pw.k_padded >= k
        back = pw.unpack()
        assert jax.tree.structure(back) == jax.tree.structure(q)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(q)):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_array_equal(np.asarray(a).view(np.uint8),
                                          np.asarray(b).view(np.uint8))
        np.testing.assert_array_equal(np.asarray(pw.dequantize(jnp.float32)),
                                      np.asarray(qjax.dequantize(q, jnp.float32)))


def test_layout_halves():
    """Byte [r, n] holds W[r, n] in its low and W[r + Kp/2, n] in its high nibble."""
    q = weight("mxfp4", 512, 16)
    pw = pack_weight(q, n_multiple=16)
    codes = np.asarray(q.values)
    data = np.asarray(pw.data)
    np.testing.assert_array_equal(data & 0xF, codes[:256])
    np.testing.assert_array_equal(data >> 4, codes[256:])


# --------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("fmt,scale_mode", [("mxfp4", "weight"), ("mxfp4", "acc"),
                                            ("nvfp4", "weight"), ("nvfp4", "acc"), ("int4", "acc")])
@pytest.mark.parametrize("m", [1, 33])
def test_matches_reference_f32(fmt, scale_mode, m):
    q = weight(fmt, 200, 72, seed=2)  # K padded to 256, N to 128: 2 tiles of 64, two K-steps
    x = activations(m, 200, seed=m)
    out = packed_matmul(x, pack_weight(q), out_dtype=jnp.float32, block_n=64, block_k=128,
                        block_m=16, scale_mode=scale_mode, interpret=True)
    assert out.dtype == jnp.float32
    assert_close(out, x, q)


@pytest.mark.parametrize("fmt", [int4_group(64), int4_group(128, F.FP32)])
def test_int4_groups(fmt):
    q = weight(fmt, 300, 40, seed=3)
    x = activations(5, 300)
    assert_close(packed_matmul(x, pack_weight(q), out_dtype=jnp.float32, block_n=16,
                               interpret=True), x, q)


@pytest.mark.parametrize("fmt", FORMATS)
def test_split_k_bf16_batched(fmt):
    q = weight(fmt, 512, 48, seed=4)
    x = activations(3, 512, batch=(2,))
    out = jax.jit(lambda x, pw: packed_matmul(x, pw, block_n=16, block_k=64, split_k=4,
                                              interpret=True))(x, pack_weight(q, n_multiple=16))
    assert out.shape == (2, 3, 48) and out.dtype == jnp.bfloat16
    assert_close(out, x, q)


@pytest.mark.parametrize("fmt,scale_mode", [("mxfp4", "weight"), ("nvfp4", "acc"),
                                            ("nvfp4", "weight"), ("int4", "acc")])
def test_vector_method(fmt, scale_mode):
    q = weight(fmt, 384, 40, seed=5)
    x = activations(1, 384)
    out = packed_matmul(x, pack_weight(q, n_multiple=16), out_dtype=jnp.float32, block_n=16,
                        split_k=2, method="vector", scale_mode=scale_mode, interpret=True)
    assert_close(out, x, q)


def test_exact_sums_are_bit_identical():
    """mxfp4 weights with amax in [4, 8) per group (every scale 1) and small-integer activations:
    every product and partial sum is exact in fp32, so any summation order gives the reference's
    result bit for bit."""
    kx, kw = jax.random.split(jax.random.key(6))
    w = jax.random.uniform(kw, (256, 32), jnp.float32, -8, 8).at[::32, :].set(-7.0)
    q = qjax.quantize(w, "mxfp4", axis=0)
    assert np.all(np.asarray(q.scales.astype(jnp.float32)) == 1)
    x = jax.random.randint(kx, (16, 256), -4, 5).astype(jnp.bfloat16)
    out = packed_matmul(x, pack_weight(q), out_dtype=jnp.float32, block_n=16, interpret=True)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(packed_matmul_reference(x, q, jnp.float32)))


def test_wrong_scale_is_caught():
    """The tolerance sees a single group scale off by one binade."""
    q = weight("mxfp4", 256, 16, seed=7)
    pw = pack_weight(q)
    bad = dataclasses.replace(pw, scales=pw.scales.at[3, 5].add(1))
    x = activations(4, 256)
    with pytest.raises(AssertionError):
        assert_close(packed_matmul(x, bad, out_dtype=jnp.float32, interpret=True), x, q)


def test_supports():
    for name in FORMATS:
        assert supports(name), name
    assert supports(int4_group(128))
    for name in ("mxfp8", "mxfp6_e2m3", "int8", "ternary", "bf16", "fp8_e4m3"):
        assert not supports(name), name


def test_errors():
    q = weight("mxfp4", 256, 32)
    pw = pack_weight(q)
    x = activations(2, 256)
    with pytest.raises(ValueError, match="handles formats mxfp4, nvfp4, int4"):
        pack_weight(weight("mxfp8", 256, 32))
    with pytest.raises(ValueError, match="axis 0"):
        pack_weight(qjax.quantize(jnp.ones((32, 256)), "mxfp4"))
    with pytest.raises(ValueError, match="PackedQArray"):
        pack_weight(jnp.ones((256, 32)))
    with pytest.raises(ValueError, match="contraction lengths"):
        packed_matmul(activations(2, 128), pw, interpret=True)
    with pytest.raises(ValueError, match="PackedWeight"):
        packed_matmul(x, q, interpret=True)
    with pytest.raises(ValueError, match="handles formats"):
        packed_matmul(x, dataclasses.replace(pw, fmt=F.get("mxfp8")), interpret=True)
    with pytest.raises(ValueError, match="block_k must be a power of two >= 64"):
        packed_matmul(x, pw, block_k=32, interpret=True)
    with pytest.raises(ValueError, match="block_n"):
        packed_matmul(x, pw, block_n=48, interpret=True)
    with pytest.raises(ValueError, match="split_k"):
        packed_matmul(x, pw, split_k=3, interpret=True)
    with pytest.raises(ValueError, match="method='dot'"):
        packed_matmul(x, pw, method="vector", interpret=True)
    with pytest.raises(ValueError, match="valid: dot, vector"):
        packed_matmul(x, pw, method="fma", interpret=True)
    with pytest.raises(ValueError, match="valid: auto, asm, asm_split, bits"):
        packed_matmul(x, pw, decode="lut", interpret=True)
    with pytest.raises(ValueError, match="interpreter"):
        packed_matmul(x, pw, decode="asm", interpret=True)
    with pytest.raises(ValueError, match="out_dtype"):
        packed_matmul(x, pw, out_dtype=jnp.int8, interpret=True)
    with pytest.raises(ValueError, match="valid: auto, weight, acc"):
        packed_matmul(x, pw, scale_mode="tensor", interpret=True)
    with pytest.raises(ValueError, match="int4 elements"):
        packed_matmul(x, pack_weight(weight("int4", 256, 32)), scale_mode="weight",
                      interpret=True)


@pytest.mark.parametrize("decode,method,split_k,scale_mode", [
    ("asm", "dot", 1, "auto"), ("asm_split", "dot", 2, "acc"), ("asm", "vector", 1, "auto"),
    ("bits", "dot", 1, "auto")])
def test_lowers_to_triton_ir(decode, method, split_k, scale_mode, monkeypatch):
    """Lowers the kernel (inline PTX included) to Triton IR for sm_90 without a GPU (the GPU
    description is faked), so CI catches primitives or shapes the Triton backend rejects.
    Compiling to PTX still needs the device."""
    registration = pytest.importorskip("jax._src.pallas.triton.pallas_call_registration")
    from jax import export

    fake_gpu = type("FakeGpuInfo", (), {"compute_capability": 90})()
    fake_lib = type("FakeGpuInfoLib", (), {"get_gpu_info": staticmethod(lambda: fake_gpu)})
    monkeypatch.setattr(registration, "gpu_info_lib", fake_lib)
    for fmt in FORMATS:
        pw = pack_weight(weight(fmt, 512, 200))
        x = activations(1 if method == "vector" else 40, 512)
        fn = jax.jit(lambda x, pw: packed_matmul(x, pw, method=method, decode=decode,
                                                 split_k=split_k, scale_mode=scale_mode))
        exported = export.export(fn, platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, pw)
        assert "xla.gpu.triton" in exported.mlir_module()


# --------------------------------------------------------------------------- GPU (Triton)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", [*FORMATS, int4_group(128)])
@pytest.mark.parametrize("m", [1, 100])
def test_gpu_decodes_and_methods(fmt, m):
    q = weight(fmt, 4096, 1000, seed=10)
    pw = pack_weight(q)
    x = activations(m, 4096, seed=11)
    e2m1 = pm._element_kind(pw.fmt) == "e2m1"
    variants = [dict(decode="asm"), dict(decode="asm_split", scale_mode="acc"),
                dict(decode="bits"), dict(split_k=4, block_n=128)]
    if e2m1:
        variants.append(dict(decode="asm_split", scale_mode="weight"))
    if m == 1:
        variants.append(dict(method="vector"))
    for kwargs in variants:
        assert_close(packed_matmul(x, pw, out_dtype=jnp.float32, **kwargs), x, q)
    assert_close(packed_matmul(x, pw), x, q)  # bf16 output


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(3, 2080, 33), (129, 96, 4000), (1, 8192, 8192)])
def test_gpu_odd_shapes(fmt, shape):
    m, k, n = shape
    q = weight(fmt, k, n, seed=12)
    x = activations(m, k, seed=13)
    assert_close(packed_matmul(x, pack_weight(q), out_dtype=jnp.float32), x, q)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [(32, 128, 2, 2), (64, 256, 4, 3), (128, 512, 8, 4),
                                    (256, 1024, 8, 3)])
def test_gpu_block_configs(config):
    bn, bk, warps, stages = config
    for fmt in FORMATS:
        q = weight(fmt, 2048, 768, seed=14)
        x = activations(16, 2048, seed=15)
        out = packed_matmul(x, pack_weight(q), out_dtype=jnp.float32, block_n=bn, block_k=bk,
                            num_warps=warps, num_stages=stages)
        assert_close(out, x, q)


@pytest.mark.parametrize("group", [16, 32, 128])
@pytest.mark.parametrize("block_n", [64, 128, 256])
def test_configurations_shrink_to_the_shared_memory_budget(group, block_n):
    """M=100 with 128-element int4 groups asked for 240 KB on an H100 (the launch failed): the K
    step could not shrink below a group. Now the depth and then block_m shrink too."""
    for block_m in (16, 32, 64, 128):
        for rows, stages in ((128, 3), (256, 4), (64, 2)):
            rows = max(rows, group)
            got_rows, got_stages, got_m = pm._fit_shared_memory(block_m, block_n, rows, group,
                                                                 stages)
            if pm._shared_memory_estimate(16, block_n, group, 2) <= pm._SHARED_BUDGET:
                assert pm._shared_memory_estimate(got_m, block_n, got_rows, got_stages) <= \
                    pm._SHARED_BUDGET
            assert group <= got_rows <= rows and 2 <= got_stages <= stages and 16 <= got_m
            if pm._shared_memory_estimate(block_m, block_n, rows, stages) <= pm._SHARED_BUDGET:
                assert (got_rows, got_stages, got_m) == (rows, stages, block_m)
    assert pm._fit_shared_memory(128, 128, 128, 128, 3) != (128, 3, 128)  # the failing launch
