"""Tests of the fused AdamW kernel with int8 or fp8 moments (qjax.pallas.adamw_8bit) and its dispatch.

On CPU the kernel runs in the Pallas interpreter on small shapes; the tests marked ``gpu`` compile
it with Triton and compare it with the reference run on the CPU (int8: bit for bit; fp8: to the
last bits of ``pow`` and ``log2``, see the tests).
"""

import dataclasses
import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import qjax.optim as qo
from qjax.optim import codes
from qjax.optim import state as S
from qjax.pallas import adamw_8bit as K

TABLES = {False: codes.dynamic_code(8, True), True: codes.dynamic_code(8, False)}  # by `unsigned`


_LR = 1e-3  # the learning rate of kernel_inputs' step


def kernel_inputs(shape, seed, param_dtype=jnp.bfloat16, fmt="int8"):
    ks = jax.random.split(jax.random.key(seed), 6)
    g = jax.random.normal(ks[0], shape) * 1e-3
    p = (jax.random.normal(ks[1], shape) * 0.02).astype(param_dtype)
    mu = qo.quantize_tensor(jax.random.normal(ks[2], shape) * 1e-3, fmt)
    nu = qo.quantize_tensor(jax.random.normal(ks[3], shape) ** 2 * 1e-6, fmt)
    h = K.hyperparameters(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, neg_lr=-_LR,
                          count_inc=jnp.int32(7), decay_dtype=param_dtype)
    words = jax.random.bits(ks[4], (4,), jnp.uint32)
    keys = K.stream_keys(words[:2], words[2:], seed)
    return g, p, mu, nu, h, keys


def _as_bytes(x):
    x = np.asarray(x)
    return x.view(np.uint8) if x.dtype in (jnp.bfloat16, jnp.float8_e4m3fn) else x


def _assert_identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(_as_bytes(x), _as_bytes(y))


# --------------------------------------------------------------------------- decoding, encoding


@pytest.mark.parametrize("unsigned", [False, True])
def test_arithmetic_decode_is_the_table_for_every_code(unsigned):
    got = np.asarray(jax.jit(K.decode_int8, static_argnums=1)(jnp.arange(256), unsigned))
    np.testing.assert_array_equal(got, TABLES[unsigned])


def test_decode_is_exact_whether_or_not_the_compiler_forms_an_fma():
    """value = N c_hi + N c_lo: N c_hi is exact, so fma(N, c_hi, N c_lo) is the same; the other
    contraction fma(N, c_lo, N c_hi) rounds once instead of twice: also the table entry."""
    def rn32(r):
        x = np.float32(float(r))
        cands = [np.nextafter(x, np.float32(-1)), x, np.nextafter(x, np.float32(2))]
        return min(cands, key=lambda c: abs(Fraction(float(c)) - r))

    for unsigned in (False, True):
        s = int(unsigned)
        table = TABLES[unsigned]
        magnitudes = table[table > 0][:-1]  # without 1.0
        for k, value in enumerate(magnitudes):
            j = k + 1 + s
            e = j.bit_length() - 1
            n = 18 * j + 9 - 16 * 2**e
            c_hi, c_lo = K._C_HI[e - s], K._C_LO[e - s]
            assert Fraction(n) * Fraction(float(c_hi)) == Fraction(float(np.float32(n) * c_hi))
            fused = rn32(Fraction(n) * Fraction(float(c_lo)) + Fraction(float(np.float32(n) * c_hi)))
            assert np.float32(float(fused) / 2**s) == value, (unsigned, k)


def _neighbours(v, unsigned, negative):
    """Exact lower/upper table neighbours (float64) of the normalized value v (a magnitude)."""
    t = TABLES[unsigned].astype(np.float64)
    signed_v = np.where(negative, -v, v)
    hi = np.searchsorted(t, signed_v, side="left").clip(1, 255)
    lo = np.where(t[hi] == signed_v, hi, hi - 1)
    return t[lo], t[hi]


@pytest.mark.parametrize("unsigned", [False, True])
def test_encode_rounds_to_a_neighbour_without_bias(unsigned):
    rng = np.random.default_rng(3 + unsigned)
    mags = np.concatenate([10.0 ** rng.uniform(-7.5, 0, 300), rng.uniform(0, 1, 100),
                           TABLES[True][1:8], TABLES[unsigned][TABLES[unsigned] > 0][-5:], [1.0, 0.0]])
    mags = np.sort(mags.astype(np.float32))
    negative = np.zeros(mags.shape, bool) if unsigned else rng.uniform(size=mags.shape) < 0.5
    absmax = np.float32(3.5)
    x = np.where(negative, -mags, mags).astype(np.float32) * absmax
    x[-1] = absmax  # the block maximum itself
    n = 4000
    u = jax.random.uniform(jax.random.key(5), (n, x.size))
    table = jnp.asarray(K._code_table())
    encode = jax.jit(lambda x, u: K._encode(x, jnp.float32(absmax), jnp.asarray(unsigned), u,
                                            K._Ops(False), lambda i: table[i]))
    c = np.asarray(encode(jnp.broadcast_to(jnp.asarray(x), (n, x.size)), u))
    values = TABLES[unsigned][c].astype(np.float64)
    v = np.abs(x.astype(np.float64)) / absmax
    lo, hi = _neighbours(v, unsigned, negative)
    signed_lo, signed_hi = np.minimum(lo, hi), np.maximum(lo, hi)
    ok = (values >= signed_lo - 1e-12) & (values <= signed_hi + 1e-12)
    assert np.all(ok), x[~np.all(ok, 0)]
    target = np.where(negative, -v, v)
    if unsigned:  # the guard: positive values never take code 0
        assert np.all(values[:, x > 0] > 0)
        target = np.where((x > 0) & (lo == 0), np.maximum(target, TABLES[True][1]), target)
    mean = values.mean(0)
    # the documented float32 error of the rounding probability: ~2e-5 of a code gap at most
    se = values.std(0) / np.sqrt(n) + 2e-5 * (signed_hi - signed_lo) + 1e-15
    z = (mean - target) / se
    assert np.all(np.abs(z) < 5.5), (z.max(), x[np.argmax(np.abs(z))])


def test_fp8_decode_is_exact_for_every_e4m3_code():
    c = np.arange(256, dtype=np.uint8)
    want = c.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    got = np.asarray(jax.jit(K.decode_fp8)(jnp.asarray(c)))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))


def _fp8_blocks(seed):
    """Moment-like blocks of 256: signed ones, non-negative ones (COAT's range expansion), and the
    edge cases: all zero, one zero, one distinct magnitude, a single nonzero, a subnormal spread."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((24, 256)).astype(np.float32) * 1e-3
    x[:12] = x[:12] ** 2
    x[12] = 0
    x[13, 7] = 0
    x[14] = 2.5e-4
    x[15, 1:] = 0
    x[16] = np.abs(x[16]) * 10.0 ** rng.uniform(-12, 0, 256)  # a range beyond E4M3's
    return jnp.asarray(x)


def test_fp8_encoding_is_the_composable_paths():
    """Given the same random bits, the kernel's fp8 encoding picks the same codes, block scales
    and COAT exponents as ``qjax.optim.quantize_tensor`` (on the CPU, bit for bit), and its
    decoding agrees with ``dequantize_tensor`` to float32 rounding (XLA turns the chain's
    divisions by 448 into products with a rounded reciprocal; the kernel divides)."""
    x = _fp8_blocks(0)
    bits = jax.random.bits(jax.random.key(3), x.shape, jnp.uint32)
    absmax, nonnegative = jnp.max(jnp.abs(x), -1), jnp.all(x >= 0, -1)
    want_q, want_info = jax.jit(S._encode_fp8)(x, absmax, nonnegative, bits)
    codes_, scales, info = jax.jit(lambda x, b: K._encode_moment(
        x, None, b, True, "fp8", None, K._Ops(False)))(x, bits)
    np.testing.assert_array_equal(np.asarray(scales), np.asarray(absmax))
    np.testing.assert_array_equal(np.asarray(info), np.asarray(want_info))
    assert set(np.asarray(info)[:12].tolist()) - {8}  # the range expansion is exercised
    np.testing.assert_array_equal(np.asarray(codes_),
                                  np.asarray(want_q.astype(jnp.float8_e4m3fn)).view(np.uint8))
    q = S.QuantizedTensor(codes_.view(jnp.float8_e4m3fn)[:, None, :].reshape(x.shape),
                          scales[:, None], info[:, None], "fp8", x.shape, np.dtype(np.float32), 256)
    want = np.asarray(S.dequantize_tensor(q))
    got = np.asarray(jax.jit(lambda c, s, i: K._decode_fp8_moment(
        c, s[:, None], i[:, None].astype(jnp.float32), K._Ops(False)))(codes_, scales, info))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=0)
    assert np.all(got[np.asarray(x) > 0] > 0)  # the guard: positive moments stay positive


def test_weight_rounding_is_unbiased_over_keys():
    shape = (1, 256)
    g, p, mu, nu, h, _ = kernel_inputs(shape, 0)
    run = jax.jit(jax.vmap(lambda k: K.adamw_8bit_reference(
        g, p, mu, nu, h, K.stream_keys(k, jnp.zeros(2, jnp.uint32), 0))[0].astype(jnp.float32)))
    keys = jax.random.bits(jax.random.key(1), (3000, 2), jnp.uint32)
    samples = np.asarray(run(keys), np.float64)
    # the exact float32 target w + u, from the fp32 mode (which returns u)
    u = K.adamw_8bit_reference(g, p.astype(jnp.float32), mu, nu, h, keys[0], param_mode="fp32",
                               decay_bf16=True)[0]
    t32 = (np.asarray(p, np.float32) + np.asarray(u, np.float32)).reshape(-1)  # w + u, float32
    down = (t32.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
    up = ((t32.view(np.uint32) & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    gap = np.abs(up.astype(np.float64) - down)
    frac = np.clip(np.abs(t32 - down) / gap, 1e-3, 1 - 1e-3)
    se = gap * np.sqrt(frac * (1 - frac) / samples.shape[0])
    z = (samples.mean(0).reshape(-1) - t32.astype(np.float64)) / se
    assert np.abs(z).max() < 5.5 and abs(z.mean()) < 5 / np.sqrt(z.size)
    assert np.mean(samples.std(0) > 0) > 0.9  # really random


def test_reference_step_is_ieee_float32_as_in_numpy():
    # XLA's simplifier rewrites divisions and contracts products unless every result is behind a
    # barrier; the kernel's inline PTX is IEEE, so the reference must be too.
    rng = np.random.default_rng(0)
    g, w, m, v = (rng.standard_normal((16, 256)).astype(np.float32) * s
                  for s in (1e-3, 0.02, 1e-3, 1e-3))
    v = v * v
    h = np.asarray(K.hyperparameters(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1,
                                     neg_lr=-1e-3, count_inc=jnp.int32(7)))
    step = functools.partial(K._step, ops=K._Ops(False), param_mode="fp32", decay=True,
                             decay_bf16=False)
    u, mu, nu = jax.jit(lambda *a: step(*a[:4], [a[4][i] for i in range(16)]))(g, w, m, v, h)
    c = {name: h[i] for name, i in K._H.items()}
    want_mu = c["one_minus_b1"] * g + c["b1"] * m
    want_nu = c["one_minus_b2"] * (g * g) + c["b2"] * v
    adam = (want_mu / c["bc1"]) / (np.sqrt(want_nu / c["bc2"]) + c["eps"])
    want_u = c["neg_lr"] * (adam + c["weight_decay"] * w)
    assert want_u.dtype == np.float32
    for got, want in ((mu, want_mu), (nu, want_nu), (u, want_u)):
        np.testing.assert_array_equal(np.asarray(got), want)


# --------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("shape,blocks,mode,decode,fmt", [
    ((8, 1024), 4, "bf16_sr", "arith", "int8"),   # whole tiles
    ((5, 300), 4, "bf16_sr", "gather", "int8"),   # a ragged last block; 10 blocks: a partial last tile
    ((3, 100), 8, "fp32", "arith", "int8"),       # a tensor row smaller than one block (block = 100)
    ((2, 1024), 4, "bf16_sr", "gather", "fp8"),
    ((5, 300), 2, "fp32", "gather", "fp8"),
])
def test_kernel_matches_reference_bit_for_bit(shape, blocks, mode, decode, fmt):
    dtype = jnp.bfloat16 if mode == "bf16_sr" else jnp.float32
    g, p, mu, nu, h, keys = kernel_inputs(shape, sum(shape), dtype, fmt)
    config = K.AdamwKernelConfig(blocks_per_program=blocks, decode=decode)
    decay_bf16 = mode == "bf16_sr"
    got = K.adamw_8bit_pallas(g, p, mu, nu, h, keys, param_mode=mode, decay_bf16=decay_bf16, config=config,
                       interpret=True)
    want = K.adamw_8bit_reference(g, p, mu, nu, h, keys, param_mode=mode, decay_bf16=decay_bf16)
    _assert_identical(got, want)
    assert got[1].scales.shape == mu.scales.shape and got[1].codes.shape == shape
    # the moments are those of Adam (to the int8 rounding)
    m = qo.dequantize_tensor(got[1])
    exact = 0.1 * g + 0.9 * qo.dequantize_tensor(mu)
    tolerance = 0.03 if fmt == "int8" else 0.07  # the block max times half E4M3's top gap
    assert float(jnp.max(jnp.abs(m - exact))) < tolerance * float(jnp.max(jnp.abs(exact)))
    info = np.asarray(got[2].block_info)
    if fmt == "int8":
        assert np.all(info == 1)  # second moments: unsigned blocks
    else:
        assert set(info.ravel()) - {8} and got[2].codes.dtype == jnp.float8_e4m3fn  # COAT's k


def test_in_place_update_of_donated_buffers_gives_the_same_step():
    # The kernel writes the moments (and, with param_in_place, the weights) into its inputs'
    # buffers; donated or not, the results are those of the reference.
    g, p, mu, nu, h, keys = kernel_inputs((6, 512), 11)
    want = K.adamw_8bit_reference(g, p, mu, nu, h, keys, decay_bf16=True)
    step = jax.jit(lambda p, mu, nu: K.adamw_8bit_pallas(
        g, p, mu, nu, h, keys, decay_bf16=True, param_in_place=True, interpret=True),
        donate_argnums=(0, 1, 2))
    _assert_identical(step(p, mu, nu), want)
    # not donated: the inputs stay intact for later use
    g, p, mu, nu, h, keys = kernel_inputs((6, 512), 11)
    p_before, mu_before = np.asarray(p.astype(jnp.float32)), np.asarray(mu.codes)
    got = jax.jit(lambda p, mu, nu: K.adamw_8bit_pallas(
        g, p, mu, nu, h, keys, decay_bf16=True, param_in_place=True, interpret=True))(p, mu, nu)
    _assert_identical(got, want)
    np.testing.assert_array_equal(np.asarray(p.astype(jnp.float32)), p_before)
    np.testing.assert_array_equal(np.asarray(mu.codes), mu_before)


def test_bad_arguments_name_the_choices():
    g, p, mu, nu, h, keys = kernel_inputs((2, 256), 0)
    with pytest.raises(ValueError, match="'bf16_sr', 'fp32'"):
        K.adamw_8bit_pallas(g, p, mu, nu, h, keys, param_mode="fp16")
    with pytest.raises(ValueError, match="bfloat16 params"):
        K.adamw_8bit_pallas(g, p.astype(jnp.float32), mu, nu, h, keys)
    with pytest.raises(ValueError, match="int8 or fp8 QuantizedTensor"):
        K.adamw_8bit_pallas(g, p, qo.quantize_tensor(jnp.zeros((2, 256)), "int4"), nu, h, keys)
    with pytest.raises(ValueError, match="int8 or fp8 QuantizedTensor"):
        K.adamw_8bit_pallas(g, p, dataclasses.replace(mu, fmt="fp8"), nu, h, keys)  # uint8 codes
    with pytest.raises(ValueError, match="same format"):
        K.adamw_8bit_pallas(g, p, mu, qo.quantize_tensor(jnp.zeros((2, 256)), "fp8"), h, keys)
    with pytest.raises(ValueError, match="power of two"):
        K.AdamwKernelConfig(blocks_per_program=3)
    with pytest.raises(ValueError, match="'arith', 'gather'"):
        K.AdamwKernelConfig(decode="table")


# --------------------------------------------------------------------------- dispatch from adamw


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {"w": jax.random.normal(k[0], (32, 256)).astype(jnp.bfloat16),  # fused
            "v": jax.random.normal(k[1], (20, 300)).astype(jnp.bfloat16),  # fused, ragged
            "b": jnp.zeros(256, jnp.bfloat16)}                              # too small: the chain


def test_default_adamw_runs_the_chain_off_the_gpu():
    params = {"w": _params()["w"]}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    default = qo.adamw(0.1, state_fmt="int8", params="bf16_sr")
    chain = qo.adamw(0.1, state_fmt="int8", params="bf16_sr", fused=False)
    state = chain.init(params)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        got = jax.jit(default.update)(grads, state, params)
        want = jax.jit(chain.update)(grads, state, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_fused_adamw_keeps_the_state_pytree_and_interoperates(fmt):
    params = _params()
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    mask = {"w": True, "v": True, "b": False}
    fused = qo.adamw(0.1, state_fmt=fmt, params="bf16_sr", mask=mask, fused=True)
    plain = qo.adamw(0.1, state_fmt=fmt, params="bf16_sr", mask=mask, fused=False)
    s0 = jax.jit(plain.init)(params)
    fused_step, plain_step = jax.jit(fused.update), jax.jit(plain.update)
    u, s1 = fused_step(grads, s0, params)
    assert jax.tree.structure(s1) == jax.tree.structure(s0)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0)):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert s1[0].inner_state.mu["w"].fmt == fmt
    assert int(s1[0].inner_state.count) == 1
    assert not np.array_equal(np.asarray(s1[0].key), np.asarray(s0[0].key))
    assert not np.array_equal(np.asarray(s1[3].key), np.asarray(s0[3].key))
    new = optax.apply_updates(params, u)
    assert all(v.dtype == jnp.bfloat16 for v in new.values())
    # the updates land on bf16 values: the kernel's rounded weights
    np.testing.assert_array_equal(np.asarray((params["w"].astype(jnp.float32) + u["w"])),
                                  np.asarray(new["w"].astype(jnp.float32)))
    # the first step moves every weight by about lr (Adam's first step is sign(g) * lr)
    step = np.abs(np.asarray(new["w"], np.float32) - np.asarray(params["w"], np.float32))
    assert 0.05 < np.median(step) < 0.2
    # the chain continues from the fused state, and vice versa
    _, s2 = plain_step(grads, s1, new)
    _, s3 = fused_step(grads, s2, new)
    assert int(s3[0].inner_state.count) == 3
    # the small leaf went through the chain in both: its first moment is float32 and the same
    np.testing.assert_allclose(np.asarray(s1[0].inner_state.mu["b"]),
                               np.asarray(plain_step(grads, s0, params)[1][0].inner_state.mu["b"]),
                               rtol=1e-6)


def _task():
    """The teacher-student regression of tests/test_optim.py, smaller."""
    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (256, 32))
    y = jnp.tanh(x @ (jax.random.normal(k[1], (32, 64)) / np.sqrt(32))) @ (
        jax.random.normal(k[2], (64, 16)) / 8.0)
    params = {"l1": jax.random.normal(k[3], (32, 128)) / np.sqrt(32),
              "l2": jax.random.normal(k[4], (128, 128)) / np.sqrt(128),
              "l3": jax.random.normal(k[5], (128, 16)) / np.sqrt(128)}

    def loss(p):
        p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        return jnp.mean((jax.nn.gelu(jax.nn.gelu(x @ p["l1"]) @ p["l2"]) @ p["l3"] - y) ** 2)

    return params, loss


@functools.cache
def _train_runs(fmt="int8", steps=40):
    params, loss = _task()
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    out = {"initial": float(loss(bf16))}
    for name, fused in (("fused", True), ("chain", False)):
        opt = qo.adamw(3e-3, state_fmt=fmt, params="bf16_sr", fused=fused)

        def step(carry, _, opt=opt):
            p, s = carry
            u, s = opt.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        @jax.jit
        def run(p, opt=opt, step=step):
            (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
            return loss(p)

        out[name] = float(run(bf16))
    return out


def test_fused_path_trains_like_the_chain():
    r = _train_runs()
    assert r["chain"] < 0.3 * r["initial"], r  # the task is learned
    assert abs(r["fused"] / r["chain"] - 1) < 0.03, r


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape,mode,decode", [
    ((64, 4096), "bf16_sr", "arith"), ((64, 4096), "bf16_sr", "gather"), ((33, 1000), "bf16_sr", "arith"),
    ((7, 100), "bf16_sr", "arith"), ((16, 2048), "fp32", "arith")])
def test_gpu_kernel_is_bit_identical_to_the_reference_on_cpu(shape, mode, decode):
    dtype = jnp.bfloat16 if mode == "bf16_sr" else jnp.float32
    args = kernel_inputs(shape, 11, dtype)
    kw = dict(param_mode=mode, decay_bf16=mode == "bf16_sr")
    got = K.adamw_8bit_pallas(*args, config=K.AdamwKernelConfig(decode=decode), **kw)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        want = jax.jit(functools.partial(K.adamw_8bit_reference, **kw))(
            *jax.device_put(args, cpu))
    _assert_identical(jax.device_get(got), jax.device_get(want))


@pytest.mark.gpu
def test_gpu_adamw_dispatches_to_the_kernel_and_trains():
    params, grads = _params(), None
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    opt = qo.adamw(0.1, state_fmt="int8", params="bf16_sr")  # the default, fused=None
    text = jax.jit(opt.update).lower(grads, jax.jit(opt.init)(params), params).as_text()
    assert "triton" in text.lower()  # the Pallas kernel's custom call
    r = _train_runs()
    assert abs(r["fused"] / r["chain"] - 1) < 0.03, r


def _mismatch_fraction(a, b):
    return float(np.mean(_as_bytes(a) != _as_bytes(b)))


@pytest.mark.gpu
@pytest.mark.parametrize("shape,mode", [((64, 4096), "bf16_sr"), ((33, 1000), "bf16_sr"),
                                        ((16, 2048), "fp32")])
def test_gpu_fp8_kernel_agrees_with_the_reference_on_cpu(shape, mode):
    """fp8 decodes with ``pow`` and picks COAT's k with ``log2``: CUDA's libdevice and XLA:CPU
    round those differently in the last bits, so a code, a weight's stochastic rounding or a
    block's k may come out the other way where the value sits on a boundary (rare); everything
    else is IEEE arithmetic, as in the int8 kernel."""
    dtype = jnp.bfloat16 if mode == "bf16_sr" else jnp.float32
    args = kernel_inputs(shape, 11, dtype, "fp8")
    kw = dict(param_mode=mode, decay_bf16=mode == "bf16_sr")
    got = jax.device_get(K.adamw_8bit_pallas(*args, **kw))
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        want = jax.device_get(jax.jit(functools.partial(K.adamw_8bit_reference, **kw))(
            *jax.device_put(args, cpu)))
    w_got, w_want = np.asarray(got[0], np.float32), np.asarray(want[0], np.float32)
    if mode == "bf16_sr":  # a last-bit difference in a moment rarely flips a bf16 rounding
        assert _mismatch_fraction(got[0], want[0]) < 1e-3
        np.testing.assert_allclose(w_got, w_want, rtol=2**-7, atol=1e-30)
    else:
        # float32 weights carry every last-bit difference of the decoded moments (2.4% of bytes),
        # relative to Adam's step (lr times an O(1) ratio), not to the weight, which may be near
        # 0. (On the CPU, libm's pow in place of exp2(p log2 x) moves them by <= 7.5e-6 lr.)
        slack = 1e-4 * _LR + 2 * np.spacing(np.abs(w_want))
        assert np.all(np.abs(w_got - w_want) <= slack), np.max(np.abs(w_got - w_want) / slack)
    for g, w in zip(got[1:], want[1:]):
        assert _mismatch_fraction(g.codes, w.codes) < 1e-3
        assert np.mean(np.asarray(g.block_info) == np.asarray(w.block_info)) > 0.99
        np.testing.assert_allclose(np.asarray(g.scales), np.asarray(w.scales), rtol=1e-5)
        close = np.isclose(np.asarray(qo.dequantize_tensor(g)), np.asarray(qo.dequantize_tensor(w)),
                           rtol=1e-5, atol=0)
        assert np.mean(~close) < 1e-3


@pytest.mark.gpu
def test_gpu_fp8_fused_adamw_trains_like_the_chain():
    params = _params()
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)
    opt = qo.adamw(0.1, state_fmt="fp8", params="bf16_sr")  # the default, fused=None
    text = jax.jit(opt.update).lower(grads, jax.jit(opt.init)(params), params).as_text()
    assert "triton" in text.lower()
    r = _train_runs("fp8")
    assert r["chain"] < 0.3 * r["initial"], r
    assert abs(r["fused"] / r["chain"] - 1) < 0.03, r
