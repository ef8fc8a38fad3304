"""qjax MX / NVFP4 quantisers vs the independent NumPy reference (tests/reference.py), bit for bit.

Inputs are the adversarial families of tests/adversarial.py. Every family is padded with zeros to a
canonical (64, 128) float32 array (zero blocks do not change any other block, nor NVFP4's tensor
amax), so each quantiser is compiled once per (format, scale_mode), float32 and bfloat16 together:
* MX: all families are stacked into one (F, 64, 128) array (blocks are independent), which also
  checks a 3-D input and the scale shape x.shape[:-1] + (K // 32,).
* NVFP4: the tensor scale is per array, so each family is its own call, same shape.

XLA:CPU behaviours these tests are sensitive to (all observed with jax 0.12 on CPU):
* `jnp.max` over >= 4096 float32 elements can drop NaN (openxla/xla#21461-like): NaN detection
  must not rely on amax being NaN.
* `a / b` with `b` a broadcast (scalar, constant, or per-block) is compiled as `a * (1 / b)`, which
  is not the correctly rounded quotient the doc's f32(a / b) asks for.
* subnormal inputs/results are flushed to zero (DAZ/FTZ) in float arithmetic.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import qjax  # noqa: E402
from adversarial import families, grid, midpoints  # noqa: E402
from reference import (  # noqa: E402
    ELEMENTS,
    mx_fake_quant_ref,
    mx_scales_ref,
    nvfp4_fake_quant_ref,
    nvfp4_scales_ref,
    rne_sat,
)

MX_FORMATS = {
    "mxfp8": "e4m3",
    "mxfp8_e5m2": "e5m2",
    "mxfp6_e3m2": "e3m2",
    "mxfp6_e2m3": "e2m3",
    "mxfp4": "e2m1",
    "mxint8": "int8",
}
MODES = ("floor", "rceil")
ROWS, WIDTH = 64, 128
SEED = 20251122
BF16 = ml_dtypes.bfloat16


# --------------------------------------------------------------------------------------------------
# helpers


def _canon(x: np.ndarray) -> np.ndarray:
    """Zero-pad a (R, 64) / (R, 128) family to (ROWS, WIDTH), keeping every block of 16/32 intact."""
    flat = np.asarray(x, np.float32).reshape(-1)
    assert flat.size <= ROWS * WIDTH
    out = np.zeros(ROWS * WIDTH, np.float32)
    out[: flat.size] = flat
    return out.reshape(ROWS, WIDTH)


def _hex(v) -> str:
    v = np.asarray(v)
    if v.dtype == np.float32:
        return f"{float(v)!r}(0x{int(v.view(np.uint32)):08x})"
    if v.dtype == BF16:
        return f"{float(v)!r}(bf16 0x{int(v.view(np.uint16)):04x})"
    return repr(float(v))


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({4: np.uint32, 2: np.uint16}[a.dtype.itemsize])


def _diff(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Boolean mask of elements whose bit patterns differ; any NaN equals any NaN."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    an = np.isnan(actual.astype(np.float32))
    en = np.isnan(expected.astype(np.float32))
    return (_bits(actual) != _bits(expected)) & ~(an & en)


def _report(name, x, actual, expected, block, limit=3) -> str | None:
    """None if bit-equal, else a message with the first few failing blocks (their inputs in full)."""
    bad = _diff(actual, expected)
    if not bad.any():
        return None
    idx = np.argwhere(bad)
    msg = [f"{name}: {len(idx)} element(s) differ"]
    seen = set()
    for i in idx:
        key = tuple(i[:-1]) + (i[-1] // block,)
        if key in seen:
            continue
        seen.add(key)
        if len(seen) > limit:
            break
        j = i[-1]
        lo = (j // block) * block
        msg.append(
            f"  at {tuple(int(t) for t in i)}: x={_hex(x[tuple(i)])} expected={_hex(expected[tuple(i)])}"
            f" qjax={_hex(actual[tuple(i)])}\n    block x[{lo}:{lo + block}] = "
            + np.array2string(np.asarray(x[tuple(i[:-1])][lo : lo + block], np.float32),
                              precision=9, max_line_width=200)
        )
    return "\n".join(msg)


def _check(failures):
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)


# --------------------------------------------------------------------------------------------------
# inputs


def _nonfinite_pair():
    """A (64, 128) array with NaN / -NaN / +Inf / -Inf in some blocks, and the same array clean."""
    rng = np.random.default_rng(SEED + 1)
    x = (rng.normal(size=(ROWS, WIDTH)) * 2.0 ** rng.integers(-10, 10, size=(ROWS, 1))).astype(np.float32)
    clean = x.copy()
    bad_blocks = []
    specials = np.array([np.nan, np.inf, -np.inf, -np.nan], np.float32)
    for r in range(0, ROWS, 3):
        b = r % 4
        pos = b * 32 + (r * 7) % 32
        x[r, pos] = specials[r % 4]
        if r % 9 == 0:  # two different specials in one block
            x[r, b * 32 + (pos + 5) % 32] = specials[(r + 1) % 4]
        bad_blocks.append((r, b))
    x[1, 32:64] = np.inf  # a block of Infs only
    bad_blocks.append((1, 1))
    return x, clean, bad_blocks


def _hand_mx_rows():
    """The hand-checked MX blocks of test_reference_hand_examples, one per 32-wide block."""
    rows = np.zeros((8, WIDTH), np.float32)
    for i, (blk, *_rest) in enumerate(_HAND_MX):
        rows[i // 4, (i % 4) * 32 : (i % 4) * 32 + len(blk)] = blk
    return rows


@functools.cache
def _inputs() -> dict[str, np.ndarray]:
    """Adversarial families + the hand-checked tensors, each zero-padded to (64, 128)."""
    fams = {k: _canon(v) for k, v in families(np.random.default_rng(SEED)).items()}
    fams["hand_mx"] = _canon(_hand_mx_rows())
    fams["hand_nvfp4"] = _canon(_HAND_NVFP4_X)
    return fams


@functools.cache
def _mx_stack():
    fams = dict(_inputs())
    x, clean, _ = _nonfinite_pair()
    fams["nonfinite"] = x
    fams["nonfinite_clean"] = clean
    names = list(fams)
    return names, np.stack([fams[n] for n in names])


# --------------------------------------------------------------------------------------------------
# compiled qjax calls: one jit per (format, scale_mode) covering float32 and bfloat16 inputs


@functools.cache
def _mx_results(fmt: str, mode: str):
    names, stack = _mx_stack()
    stack_bf16 = stack.astype(BF16)

    def fn(x, xb):
        q = qjax.quantize(x, fmt, axis=-1, scale_mode=mode)
        return (
            qjax.fake_quant(x, fmt, axis=-1, scale_mode=mode),
            q.scales.astype(jnp.float32),
            q.dequantize(dtype=jnp.float32),
            qjax.fake_quant(xb, fmt, axis=-1, scale_mode=mode),
        )

    fq, scales, deq, fq_bf16 = jax.jit(fn)(jnp.asarray(stack), jnp.asarray(stack_bf16))
    return {
        "names": names,
        "x": stack,
        "fq": np.asarray(fq),
        "scales": np.asarray(scales),
        "deq": np.asarray(deq),
        "x_bf16": stack_bf16,
        "fq_bf16": np.asarray(fq_bf16),
    }


@functools.cache
def _nvfp4_jit():
    def fn(x, xb):
        q = qjax.quantize(x, "nvfp4", axis=-1)
        return (
            qjax.fake_quant(x, "nvfp4", axis=-1),
            q.scales,
            q.tensor_scale,
            q.dequantize(dtype=jnp.float32),
            qjax.fake_quant(xb, "nvfp4", axis=-1),
        )

    return jax.jit(fn)


def _nvfp4_run(x: np.ndarray):
    """(fake_quant f32, block scales as f32, tensor scale, dequantize f32, bf16 input, fake_quant bf16)"""
    xb = x.astype(BF16)
    fq, sb, st, deq, fq_bf16 = _nvfp4_jit()(jnp.asarray(x), jnp.asarray(xb))
    assert sb.dtype == jnp.float8_e4m3fn, sb.dtype
    assert st.dtype == jnp.float32, st.dtype
    assert fq.dtype == jnp.float32 and fq_bf16.dtype == jnp.bfloat16, (fq.dtype, fq_bf16.dtype)
    return (np.asarray(fq), np.asarray(sb).astype(np.float32), np.asarray(st), np.asarray(deq), xb,
            np.asarray(fq_bf16))


# --------------------------------------------------------------------------------------------------
# MX


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fmt", list(MX_FORMATS))
def test_mx_bitexact(fmt, mode):
    """For every family: fake_quant (float32 and bfloat16 inputs), quantize().scales and
    quantize().dequantize() equal the reference bit for bit; NaN/Inf blocks are all-NaN with a NaN
    scale and leave the other blocks untouched.

    bfloat16: the reference's float32 results are P * X with at most 8 significant bits, hence exact
    in bf16 (same exponent range as float32) except below bf16's subnormal resolution 2^-133 or on
    overflow, where the expected value is the round-to-nearest-even bf16 of the exact product. In all
    cases that is `ref_f32.astype(bf16)`.
    """
    elem = MX_FORMATS[fmt]
    r = _mx_results(fmt, mode)
    x_all = r["x"]
    assert r["fq"].dtype == np.float32 and r["fq"].shape == x_all.shape
    assert r["fq_bf16"].dtype == BF16 and r["fq_bf16"].shape == x_all.shape
    assert r["scales"].shape == x_all.shape[:-1] + (x_all.shape[-1] // 32,), r["scales"].shape
    failures = []
    for i, name in enumerate(r["names"]):
        x = x_all[i]
        tag = f"{fmt}/{mode}/{name}"
        expected = mx_fake_quant_ref(x, elem, mode)
        failures.append(_report(tag, x, r["fq"][i], expected, 32))
        failures.append(_report(f"{tag} dequantize()", x, r["deq"][i], expected, 32))
        exp_scale = mx_scales_ref(x, elem, mode).astype(np.float32)
        bad = _diff(r["scales"][i], exp_scale)
        if bad.any():
            k = tuple(int(t) for t in np.argwhere(bad)[0])
            blk = x[k[0], k[1] * 32 : (k[1] + 1) * 32]
            failures.append(
                f"{tag}: {bad.sum()} scale(s) differ, first at {k}: expected {_hex(exp_scale[k])} "
                f"qjax {_hex(r['scales'][i][k])}; block amax {_hex(np.max(np.abs(blk)))}"
            )
        xb = r["x_bf16"][i]
        exp_bf16 = mx_fake_quant_ref(xb, elem, mode).astype(BF16)
        failures.append(_report(f"{tag} (bf16)", xb, r["fq_bf16"][i], exp_bf16, 32))

    # NaN / Inf blocks, checked directly (not only through the reference).
    names = r["names"]
    _, _, bad_blocks = _nonfinite_pair()
    out = r["fq"][names.index("nonfinite")]
    out_clean = r["fq"][names.index("nonfinite_clean")]
    scales = r["scales"][names.index("nonfinite")]
    mask = np.zeros((ROWS, WIDTH // 32), bool)
    for rr, b in bad_blocks:
        mask[rr, b] = True
    emask = np.repeat(mask, 32, axis=1)
    if not np.isnan(out[emask]).all():
        blocks = sorted({(int(a), int(b) // 32) for a, b in np.argwhere(emask & ~np.isnan(out))})
        failures.append(f"{fmt}/{mode}: NaN/Inf blocks not all-NaN: (row, block) {blocks}")
    if not np.isnan(scales[mask]).all():
        failures.append(f"{fmt}/{mode}: NaN/Inf blocks without NaN scale: "
                        f"{[tuple(map(int, t)) for t in np.argwhere(mask & ~np.isnan(scales))]}")
    if np.isnan(out[~emask]).any() or _diff(out[~emask], out_clean[~emask]).any():
        failures.append(f"{fmt}/{mode}: finite blocks changed by NaN/Inf in other blocks")
    _check(failures)


# --------------------------------------------------------------------------------------------------
# NVFP4


def test_nvfp4_bitexact():
    """Per family (the tensor scale is per array): fake_quant (float32 and bf16 inputs),
    quantize().scales (float8_e4m3fn, (..., K//16)), .tensor_scale (float32, shape (1,)*ndim) and
    .dequantize(). bf16 expectation: the float32 NVFP4 result of the upcast input, rounded to bf16
    (NVFP4 results are general float32 values, so this rounding is real)."""
    failures = []
    for name, x in _inputs().items():
        fq, sb, st, deq, xb, fq_bf16 = _nvfp4_run(x)
        exp_sb, exp_st = nvfp4_scales_ref(x)
        expected = nvfp4_fake_quant_ref(x)
        failures.append(_report(f"nvfp4/{name}", x, fq, expected, 16))
        failures.append(_report(f"nvfp4/{name} dequantize()", x, deq, expected, 16))
        failures.append(_report(f"nvfp4/{name} (bf16)", xb, fq_bf16,
                                nvfp4_fake_quant_ref(xb).astype(BF16), 16))
        assert sb.shape == x.shape[:-1] + (x.shape[-1] // 16,), sb.shape
        assert st.shape == (1,) * x.ndim, st.shape
        if _diff(st.reshape(()), np.float32(exp_st)).any():
            failures.append(f"nvfp4/{name}: tensor scale expected {_hex(np.float32(exp_st))} "
                            f"qjax {_hex(st.reshape(()))} (amax_t {_hex(np.max(np.abs(x)))})")
        bad = _diff(sb, exp_sb)
        if bad.any():
            k = tuple(int(t) for t in np.argwhere(bad)[0])
            blk = x[k[0], k[1] * 16 : (k[1] + 1) * 16]
            failures.append(
                f"nvfp4/{name}: {bad.sum()} block scale(s) differ, first at {k}: expected "
                f"{_hex(exp_sb[k])} qjax {_hex(sb[k])} (amax_b {_hex(np.max(np.abs(blk)))}, "
                f"s_t {_hex(np.float32(exp_st))})"
            )
    _check(failures)


@pytest.mark.parametrize("special", ["nan", "-nan", "inf", "-inf"])
def test_nvfp4_nonfinite(special):
    """Any NaN/Inf makes the tensor scale NaN, hence every block scale and every output NaN."""
    x = _inputs()["mixed_signs"].copy()
    x[5, 17] = np.float32({"nan": np.nan, "-nan": -np.nan, "inf": np.inf, "-inf": -np.inf}[special])
    exp_sb, exp_st = nvfp4_scales_ref(x)
    assert np.isnan(exp_st) and np.isnan(exp_sb).all() and np.isnan(nvfp4_fake_quant_ref(x)).all()
    fq, sb, st, _, _, _ = _nvfp4_run(x)
    assert np.isnan(st).all(), f"tensor scale {st.ravel()} is not NaN"
    assert np.isnan(sb).all(), f"{(~np.isnan(sb)).sum()} block scales are not NaN"
    assert np.isnan(fq).all(), f"{(~np.isnan(fq)).sum()} outputs are not NaN"


def test_nvfp4_3d_shapes():
    x = _inputs()["octaves70"].reshape(4, 16, 128)

    def fn(x):
        q = qjax.quantize(x, "nvfp4", axis=-1)
        return q.scales, q.tensor_scale, qjax.fake_quant(x, "nvfp4", axis=-1)

    sb, st, out = jax.jit(fn)(jnp.asarray(x))
    assert sb.shape == (4, 16, 8) and st.shape == (1, 1, 1)
    exp_sb, exp_st = nvfp4_scales_ref(x)
    _check([
        _report("nvfp4/3d", x, np.asarray(out), nvfp4_fake_quant_ref(x), 16),
        None if not _diff(np.asarray(sb).astype(np.float32), exp_sb).any() else "nvfp4/3d: block scales differ",
        None if not _diff(np.asarray(st).reshape(()), np.float32(exp_st)).any() else "nvfp4/3d: tensor scale differs",
    ])


# --------------------------------------------------------------------------------------------------
# the reference itself, against hand-computed values and a brute-force rounding


def _rne_brute(v: np.ndarray, elem: str) -> np.ndarray:
    """Nearest value of the grid, ties to the code with an even last bit, saturating (no ml_dtypes
    casts). For the float encodings the code index in the ascending positive grid has the same parity
    as the mantissa's last bit; for int8 the index is k itself."""
    g = grid(elem)
    out = np.empty_like(v)
    for i, val in enumerate(v):
        if np.isnan(val):
            out[i] = np.nan if elem in ("e4m3", "e5m2") else 0.0
            continue
        a = min(abs(val), g[-1])
        j = np.searchsorted(g, a, side="right") - 1  # g[j] <= a
        if g[j] == a or j == len(g) - 1:
            r = g[j]
        else:
            lo, hi = g[j], g[j + 1]
            if a - lo < hi - a:
                r = lo
            elif a - lo > hi - a:
                r = hi
            else:
                r = lo if j % 2 == 0 else hi
        out[i] = -r if (np.signbit(val) and not (elem == "int8" and r == 0)) else r
    return out


@pytest.mark.parametrize("elem", list(ELEMENTS))
def test_reference_rounding_matches_brute_force(elem):
    rng = np.random.default_rng(7)
    g, m = grid(elem), midpoints(elem)
    m32 = m.astype(np.float32)
    vals = np.concatenate([g, m, np.nextafter(m32, np.float32(0)), np.nextafter(m32, np.float32(np.inf)),
                           g * 1.001, rng.uniform(0, g[-1] * 1.2, 2000),
                           [g[-1] * 1.05, g[-1] * 3, 1e30, np.inf, 2.0**-70, 2.0**-149]])
    vals = np.concatenate([vals, -vals, [np.nan, -0.0]]).astype(np.float32).astype(np.float64)
    got = rne_sat(vals, elem)
    exp = _rne_brute(vals, elem)
    same = (got.view(np.uint64) == exp.view(np.uint64)) | (np.isnan(got) & np.isnan(exp))
    assert same.all(), (elem, vals[~same][:10], got[~same][:10], exp[~same][:10])


K = 2.0**-20
# (block values, elem, floor-mode scale, floor-mode output, rceil-mode scale, rceil-mode output)
_HAND_MX = [
    # MXFP4, amax 5*2^-20: floor(log2 5) = 2 = emax -> X = 2^-20; rceil ceil(log2(5/6)) = 0 -> 2^-20.
    # 0.3125 -> 0.5; -2.5 tie 2|3 -> 2 (even mantissa); 0.75 tie 0.5|1 -> 1; 5 tie 4|6 -> 4; 0.25 tie -> 0.
    ([1.0 * K, 0.3125 * K, -2.5 * K, 0.75 * K, 5.0 * K, 0.25 * K], "e2m1",
     K, [1 * K, 0.5 * K, -2 * K, 1 * K, 4 * K, 0], K, [1 * K, 0.5 * K, -2 * K, 1 * K, 4 * K, 0]),
    # MXFP4, amax 7: floor X = 1 (7 saturates to 6, 3.5 tie 3|4 -> 4, 1.25 tie 1|1.5 -> 1);
    # rceil X = 2^ceil(log2(7/6)) = 2: 3.5 tie -> 4 -> 8; 1.75 tie 1.5|2 -> 2 -> 4; 0.625 -> 0.5 -> 1.
    ([7.0, 3.5, -1.25], "e2m1", 1.0, [6.0, 4.0, -1.0], 2.0, [8.0, 4.0, -1.0]),
    # MXFP4 with amax exactly 6 * 2^-20: both modes X = 2^-20, 6 stays 6.
    ([6.0 * K, -3.0 * K, 1.5 * K], "e2m1", K, [6.0 * K, -3.0 * K, 1.5 * K], K,
     [6.0 * K, -3.0 * K, 1.5 * K]),
    # MXFP8 e4m3, amax 500: floor X = 2^(8-8) = 1: 500 -> 448; 250 -> 256 (240|256, midpoint 248);
    # 2^-10 tie 0|2^-9 -> +0; -3*2^-10 tie 2^-9|2^-8 -> -2^-8.
    # rceil X = 2^ceil(log2(500/448)) = 2: 250 -> 256 -> 512; 125 -> 128 -> 256; 2^-11 -> 0;
    # -3*2^-11 = -0.75*2^-9 -> -2^-9 -> -2^-8.
    ([500.0, 250.0, 2.0**-10, -3 * 2.0**-10], "e4m3", 1.0, [448.0, 256.0, 0.0, -(2.0**-8)], 2.0,
     [512.0, 256.0, 0.0, -(2.0**-8)]),
    # MXINT8, amax 255/128: floor X = 1: 127.5 -> 128 (tie to even) -> saturates to 127;
    # 32.5 -> 32 (tie to even); -33.5 -> -34; -2^-10*64 = -0.0625 -> -0 -> +0 (int8 has no -0).
    # rceil X = 2^ceil(log2(255/128*64/127)) = 2: 63.75 -> 64 -> 2.0; 16.25 -> 16; -16.75 -> -17.
    ([255 / 128, 0.5078125, -0.5234375, -(2.0**-10)], "int8", 1.0, [127 / 64, 0.5, -34 / 64, 0.0], 2.0,
     [2.0, 0.5, -17 / 32, 0.0]),
    # All -0 block: X = 2^-127 in both modes, outputs keep the sign of zero.
    ([-0.0, -0.0], "e4m3", 2.0**-127, [-0.0, -0.0], 2.0**-127, [-0.0, -0.0]),
    # amax 2^127, MXFP4: floor X = 2^(127-2) = 2^125 -> 4 -> 2^127;
    # rceil X = 2^ceil(log2(2^127/6)) = 2^125 -> 4 -> 2^127.
    ([2.0**127, 2.0**126], "e2m1", 2.0**125, [2.0**127, 2.0**126], 2.0**125, [2.0**127, 2.0**126]),
    # float32 max, MXFP4: floor X = 2^125, x/X = 7.99.. saturates to 6 -> 1.5*2^127;
    # rceil X = 2^ceil(log2(fmax/6)) = 2^126, x/X = 3.99999976 -> 4 -> 4 * 2^126 = 2^128, which
    # overflows float32: the doc's literal rule gives +Inf.
    ([float(np.finfo(np.float32).max)], "e2m1", 2.0**125, [1.5 * 2.0**127], 2.0**126, [np.inf]),
    # MXINT8 at the top: amax = 1.999.. * 2^127: floor X = 2^127, saturates to 127/64 * 2^127;
    # rceil: ceil(log2(fmax * 64/127)) = 128 is clamped to 127 -> X = 2^127 -> same saturation.
    ([float(np.finfo(np.float32).max)], "int8", 2.0**127, [127 / 64 * 2.0**127], 2.0**127,
     [127 / 64 * 2.0**127]),
    # smallest subnormal alone (e2m1): floor(log2) - 2 = -151 and ceil(log2(2^-149/6)) = -151 are
    # clamped to -127; 2^-149 / 2^-127 = 2^-22 rounds to 0.
    ([2.0**-149], "e2m1", 2.0**-127, [0.0], 2.0**-127, [0.0]),
]


def test_reference_hand_examples():
    for blk, elem, fs, fout, rs, rout in _HAND_MX:
        x = np.zeros(32, np.float32)
        x[: len(blk)] = blk
        assert np.array_equal(x[: len(blk)].astype(np.float64), np.asarray(blk)), blk  # exact inputs
        for mode, scale, out in (("floor", fs, fout), ("rceil", rs, rout)):
            exp = np.zeros(32, np.float32)
            with np.errstate(over="ignore"):
                exp[: len(out)] = np.asarray(out, np.float64).astype(np.float32)
            assert mx_scales_ref(x, elem, mode)[0] == scale, (blk, elem, mode)
            got = mx_fake_quant_ref(x, elem, mode)
            assert np.array_equal(got.view(np.uint32), exp.view(np.uint32)), (blk, elem, mode, got)
    # NaN block -> NaN scale, all-NaN output.
    x = np.ones(64, np.float32)
    x[3] = np.nan
    x[40] = -np.inf
    for mode in MODES:
        assert np.isnan(mx_scales_ref(x, "e4m3", mode)).all()
        assert np.isnan(mx_fake_quant_ref(x, "e4m3", mode)).all()

    # NVFP4 (the tensor _HAND_NVFP4_X below, worked out in its comments).
    sb, st = nvfp4_scales_ref(_HAND_NVFP4_X)
    assert st == np.float32(1 / 16)
    assert np.array_equal(sb, np.array([[448, 8, 26, 0]], np.float32))
    got = nvfp4_fake_quant_ref(_HAND_NVFP4_X)
    assert np.array_equal(got.view(np.uint32), _HAND_NVFP4_OUT.view(np.uint32)), got


# NVFP4, one (1, 64) tensor = 4 blocks of 16. amax_t = 168 -> s_t = 168/2688 = 1/16 exactly.
_HAND_NVFP4_X = np.zeros((1, 64), np.float32)
_HAND_NVFP4_OUT = np.zeros((1, 64), np.float32)
# block 0: amax 168 -> s_b = (168/6)/(1/16) = 448, s_b*s_t = 28: 168/28 = 6; 42/28 = 1.5;
#   70/28 = 2.5 tie -> 2 -> 56; -14/28 = -0.5; 7/28 = 0.25 tie -> 0; 8/28 = 0.2857 -> 0.5 -> 14.
_HAND_NVFP4_X[0, 0:6] = [168, 42, 70, -14, 7, 8]
_HAND_NVFP4_OUT[0, 0:6] = [168, 42, 56, -14, 0, 14]
# block 1: amax 3 -> s_b = 0.5*16 = 8, s_b*s_t = 0.5: 3 -> 6 -> 3; 1.3 -> 2.6 -> 3 -> 1.5;
#   0.55 -> 1.1 -> 1 -> 0.5; -0.2 -> -0.4 -> -0.5 -> -0.25.
_HAND_NVFP4_X[0, 16:20] = [3, 1.3, 0.55, -0.2]
_HAND_NVFP4_OUT[0, 16:20] = [3, 1.5, 0.5, -0.25]
# block 2: amax 10 -> f32(10/6)*16 = 26.67 -> e4m3 26 (grid 24, 26, 28), s_b*s_t = 1.625:
#   10/1.625 = 6.15 -> 6 -> 9.75 (saturation at the block level: 9.75 < 10);
#   -4 -> -2.46 -> -2 -> -3.25; 2.4375 -> 1.5 exact; 0.8125 -> 0.5; 0.40625 -> 0.25 tie -> 0.
_HAND_NVFP4_X[0, 32:37] = [10, -4, 2.4375, 0.8125, 0.40625]
_HAND_NVFP4_OUT[0, 32:37] = [9.75, -3.25, 2.4375, 0.8125, 0]
# block 3: -0 only -> s_b = 0 -> r = 0 -> P = -0 (the sign of zero is kept).
_HAND_NVFP4_X[0, 48:64] = -0.0
_HAND_NVFP4_OUT[0, 48:64] = -0.0
