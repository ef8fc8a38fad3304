"""Adversarial input families for the bit-exact quantiser tests.

`families(rng)` returns a dict name -> float32 array of shape (R, 64) or (R, 128) with R <= 64.
Everything is deterministic given the generator. Blocks are 32 (MX) or 16 (NVFP4) wide along the
last axis, so every MX block below is also two NVFP4 blocks.

The families keep float32 *subnormal* inputs and scales of 2^-127 confined to the "subnormal"
family (JAX's CPU backend flushes subnormals to zero, so that family tests a platform property as
much as the quantiser; see the tests).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

F32 = np.float32

# name -> (ml_dtypes type or None for int8, max, emax); written out independently of reference.py.
_ELEMS = {
    "e4m3": (ml_dtypes.float8_e4m3fn, 448.0, 8),
    "e5m2": (ml_dtypes.float8_e5m2, 57344.0, 15),
    "e3m2": (ml_dtypes.float6_e3m2fn, 28.0, 4),
    "e2m3": (ml_dtypes.float6_e2m3fn, 7.5, 2),
    "e2m1": (ml_dtypes.float4_e2m1fn, 6.0, 2),
    "int8": (None, 127.0 / 64.0, 0),
}
# Half the distance from max to the next (non-existent) code above it: the rounding boundary
# just above max when saturation is ignored.
_HALF_STEP_ABOVE_MAX = {"e4m3": 16.0, "e5m2": 4096.0, "e3m2": 2.0, "e2m3": 0.25, "e2m1": 1.0,
                        "int8": 0.5 / 64}


def grid(elem: str) -> np.ndarray:
    """Non-negative finite values of an element encoding, ascending (float64)."""
    dtype, vmax, _ = _ELEMS[elem]
    if dtype is None:
        return np.arange(128, dtype=np.float64) / 64.0
    ncodes = {"e4m3": 256, "e5m2": 256, "e3m2": 64, "e2m3": 64, "e2m1": 16}[elem]
    vals = np.arange(ncodes, dtype=np.uint8).view(dtype).astype(np.float64)
    vals = vals[np.isfinite(vals) & (vals >= 0) & ~np.signbit(vals)]
    vals = np.unique(vals)
    assert vals[-1] == vmax, (elem, vals[-1])
    return vals


def midpoints(elem: str) -> np.ndarray:
    g = grid(elem)
    return (g[:-1] + g[1:]) / 2.0


def _f32(v) -> np.ndarray:
    out = np.asarray(v, dtype=np.float64).astype(F32)
    return out


def _next_up(v):
    return np.nextafter(_f32(v), F32(np.inf))


def _next_down(v):
    return np.nextafter(_f32(v), F32(-np.inf))


def _signs(rng, n):
    return np.where(rng.random(n) < 0.5, -1.0, 1.0)


def _ties(rng, elem: str) -> np.ndarray:
    """Blocks whose amax is max_elem * 2^s (so X = 2^s in both floor and rceil mode) and whose other
    31 elements are exact midpoints of the element grid times 2^s (even and odd neighbours), or
    their float32 neighbours (one ulp up / down)."""
    _, vmax, emax = _ELEMS[elem]
    mids = midpoints(elem)
    hi = 127 - emax - 1  # keep max * 2^s and everything else finite in float32
    exps = [0, 1, -1, 7, -9, 20, -40, 63, -77, -100, 100, hi, -3, 3, 30, -60]
    rows = []
    nblocks_row = 4
    start = 0
    for r, s in enumerate(exps + exps[:8]):
        variant = r % 3  # 0: exact ties, 1: one ulp up, 2: one ulp down
        row = []
        for _ in range(nblocks_row):
            idx = (start + np.arange(31)) % len(mids)
            start += 31
            vals = mids[idx] * _signs(rng, 31)
            amax = vmax * (1.0 if rng.random() < 0.5 else -1.0)
            blk = np.concatenate([[amax], vals]) * 2.0**s
            blk = _f32(blk)
            assert np.all(blk[1:].astype(np.float64) == vals * 2.0**s)  # exactly representable
            if variant == 1:
                blk[1:] = _next_up(blk[1:])
            elif variant == 2:
                blk[1:] = _next_down(blk[1:])
            perm = rng.permutation(32)
            row.append(blk[perm])
        rows.append(np.concatenate(row))
    return np.stack(rows).astype(F32)


def _saturate(rng) -> np.ndarray:
    """Blocks whose amax sits on / next to the floor and rceil boundaries of every format, plus
    values just above max after scaling."""
    blocks = []
    for elem, (_, vmax, emax) in _ELEMS.items():
        for s in (-60, 0, 37):
            p = 2.0**s
            cands = [
                vmax * p,  # rceil boundary: exactly max * 2^s
                _next_up(vmax * p),  # just above max after scaling (rceil jumps up)
                _next_down(vmax * p),
                (vmax + _HALF_STEP_ABOVE_MAX[elem]) * p,  # midpoint above max
                _next_down((vmax + _HALF_STEP_ABOVE_MAX[elem]) * p),
                _next_down(2.0 ** (emax + 1) * p),  # largest value with the same floor exponent
                2.0 ** (emax + 1) * p,  # floor boundary: power of two
                2.0 ** emax * p,
                _next_down(2.0**emax * p),
                _next_up(2.0**emax * p),
            ]
            for c in cands:
                amax = float(_f32(c))
                blk = np.empty(32)
                blk[0] = amax
                blk[1:8] = amax  # more copies of the boundary value
                blk[8:16] = amax * (1.0 - rng.random(8) * 2.0**-10)  # just below amax
                blk[16:32] = amax * rng.uniform(-1.0, 1.0, 16)
                blk = blk * _signs(rng, 32)
                blk = _f32(blk)
                blocks.append(blk[rng.permutation(32)])
    b = np.stack(blocks)
    pad = (-len(b)) % 4
    if pad:
        b = np.concatenate([b, _f32(rng.normal(size=(pad, 32)))])
    return b.reshape(-1, 128).astype(F32)


def _zeros(rng) -> np.ndarray:
    x = np.zeros((12, 128), F32)
    x[1] = -0.0  # all negative zeros
    x[2, 32:64] = rng.normal(size=32)  # zero blocks next to data
    x[3, :] = np.where(rng.random(128) < 0.5, 0.0, -0.0)  # +0 / -0 mixture
    x[4, 64:96] = 1e-20  # one tiny but normal block
    x[5, ::2] = -0.0
    x[5, 1::2] = rng.normal(size=64)
    x[6, 0] = 1.0  # a single non-zero element per block
    x[6, 40] = -3.0
    x[6, 127] = 2.0**-100
    x[7, 96:] = -0.0
    x[7, :96] = rng.normal(size=96) * 1e5
    # rows 8..11 stay +0
    return x


def _outliers(rng) -> np.ndarray:
    rows, width = 32, 128
    x = rng.normal(size=(rows, width)) * 1e-3
    x[8:16] = rng.normal(size=(8, width)) * 1e-20
    x[16:24] *= 2.0 ** rng.integers(-30, 0, size=(8, 1))
    huge = np.array([1e30, -3.4e38, 65504.0, 2.0**100, -1e10, 448.0 * 2**20, 6.0 * 2**90, 1e15])
    for r in range(rows):
        for b in range(width // 32):
            pos = b * 32 + rng.integers(0, 32)
            x[r, pos] = huge[(r + b) % len(huge)]
    return _f32(x)


def _octaves70(rng) -> np.ndarray:
    e = rng.uniform(-35.0, 35.0, size=(64, 128))
    x = _signs(rng, (64 * 128)).reshape(64, 128) * 2.0**e
    return _f32(x)


def _bf16_grid(rng) -> np.ndarray:
    # Random bf16 values, upcast: normals with per-block magnitudes spanning 80 octaves ...
    x = rng.normal(size=(48, 128)) * 2.0 ** rng.integers(-40, 40, size=(48, 4)).repeat(32, axis=1)
    a = x.astype(ml_dtypes.bfloat16).astype(F32)
    # ... and random bf16 bit patterns with biased exponent in [40, 215] (no subnormal, Inf, NaN).
    bits = rng.integers(0, 2**16, size=(16, 128), dtype=np.uint32)
    expo = rng.integers(40, 216, size=(16, 128), dtype=np.uint32)
    bits = (bits & 0x807F) | (expo << 7)
    b = bits.astype(np.uint16).view(ml_dtypes.bfloat16).astype(F32)
    return np.concatenate([a, b]).astype(F32)


def _tiny(rng) -> np.ndarray:
    # ~1e-30 magnitudes (normal float32 values; outputs stay in the normal float32 range).
    x = rng.normal(size=(16, 128)) * 1e-30
    x[8:] *= 2.0 ** rng.integers(-6, 6, size=(8, 128))
    return _f32(x)


def _subnormal(rng) -> np.ndarray:
    """float32 subnormal inputs, scales clamped at 2^-127, and dequantised values below 2^-126."""
    x = np.zeros((16, 128), np.float64)
    x[0:4] = rng.integers(-2**23 + 1, 2**23, size=(4, 128)) * 2.0**-149  # all subnormal
    x[4:6] = rng.integers(-64, 64, size=(2, 128)) * 2.0**-149  # deep subnormals
    x[6:8] = rng.normal(size=(2, 128)) * 1e-38  # around the normal/subnormal boundary
    x[8] = 2.0**-126 * rng.uniform(-4, 4, 128)
    x[9] = 2.0**-149
    x[10, ::32] = 2.0**-149  # single smallest subnormal in zero blocks
    x[11] = rng.normal(size=128) * 2.0**-120  # amax < 2^(emax-127) for most formats: X clamps
    x[12] = _f32(rng.normal(size=128) * 1e-30)
    x[12, ::3] *= 2.0**-40  # normal amax, subnormal other elements
    x[13] = rng.normal(size=128) * 2.0**-100
    x[14] = rng.normal(size=128) * 2.0**-110  # dequantised values underflow below 2^-126
    x[15] = -(2.0**-149) * rng.integers(0, 3, 128)
    return _f32(x)


def _neg_zero(rng) -> np.ndarray:
    x = rng.normal(size=(16, 128))
    x[:, ::5] = -0.0
    x[4:8] *= 1e3
    x[4:8, 1::7] = -1e-5  # negative values that round to zero: -0 for fp, +0 for int8
    x[8:12, :] = -0.0
    x[8:12, 0::32] = 1.0
    x[8:12, 5::32] = -1e-9
    x[12:16] = np.where(rng.random((4, 128)) < 0.5, -0.0, rng.normal(size=(4, 128)) * 1e-12)
    x[12:16, 7::32] = -5.0
    return _f32(x)


def _mixed_signs(rng) -> np.ndarray:
    x = rng.normal(size=(32, 64)) * 2.0 ** rng.integers(-20, 20, size=(32, 1))
    x[16:24] = np.abs(x[16:24]) * np.where(np.arange(64) % 2 == 0, 1.0, -1.0)
    m = rng.uniform(0.5, 2.0, size=(8, 1))
    x[24:32] = m * np.tile([1.0, -1.0, 0.75, -0.75, 0.25, -0.25, 3.0, -3.0], 8)
    return _f32(x)


def _huge(rng) -> np.ndarray:
    fmax = float(np.finfo(F32).max)
    x = rng.uniform(-1.0, 1.0, size=(8, 128)) * fmax
    x[0, ::2] = fmax
    x[1, 0::32] = -fmax
    x[2] = rng.uniform(0.9, 1.0, 128) * 2.0**127 * _signs(rng, 128)
    x[3, 0::32] = 1.9 * 2.0**127
    x[4, ::4] = 2.0**127
    x[5] = rng.normal(size=128) * 1e37
    x[6, 0::32] = fmax
    x[6, 1::32] = fmax * 0.999
    x[6, 2::32] = float(_next_down(fmax))
    x[7, 0::32] = 448.0 * 2.0**119
    return _f32(x)


def _nvfp4_ties(rng) -> np.ndarray:
    """Exact NVFP4 ties: s_t = 2^t exactly (amax_t = 2688 * 2^t), per block amax_b = 6 * s_b * 2^t
    with s_b an e4m3 value (or an e4m3 midpoint: a tie in the block-scale rounding), other elements
    on E2M1 midpoints / grid points times s_b * 2^t, or one ulp away."""
    t = -3
    e4 = grid("e4m3")[1:]
    e4mid = midpoints("e4m3")[1:]
    g = grid("e2m1")
    mids = midpoints("e2m1")
    rows = []
    for r in range(32):
        row = []
        for b in range(4):
            if r == 0 and b == 0:
                sb = 448.0
            elif (r + b) % 4 == 3:
                sb = e4mid[rng.integers(len(e4mid))]  # tie in the e4m3 rounding of s_b
            else:
                sb = e4[rng.integers(len(e4))]
            vals = np.concatenate([mids, g, mids, mids])[:15] * _signs(rng, 15)
            blk = _f32(np.concatenate([[6.0], vals]) * sb * 2.0**t)
            nz = np.flatnonzero(blk[1:]) + 1  # perturb non-zero elements only
            if r % 3 == 1:
                blk[nz] = _next_up(blk[nz])
            elif r % 3 == 2:
                blk[nz] = _next_down(blk[nz])
            row.append(blk[rng.permutation(16)])
        rows.append(np.concatenate(row))
    return np.stack(rows).astype(F32)


def families(rng: np.random.Generator) -> dict[str, np.ndarray]:
    fams: dict[str, np.ndarray] = {}
    for elem in _ELEMS:
        fams[f"ties_{elem}"] = _ties(rng, elem)
    fams["saturate"] = _saturate(rng)
    fams["zeros"] = _zeros(rng)
    fams["outliers"] = _outliers(rng)
    fams["octaves70"] = _octaves70(rng)
    fams["bf16_grid"] = _bf16_grid(rng)
    fams["tiny"] = _tiny(rng)
    fams["subnormal"] = _subnormal(rng)
    fams["neg_zero"] = _neg_zero(rng)
    fams["mixed_signs"] = _mixed_signs(rng)
    fams["huge"] = _huge(rng)
    fams["nvfp4_ties"] = _nvfp4_ties(rng)
    for name, arr in fams.items():
        assert arr.dtype == F32 and arr.ndim == 2 and arr.shape[1] in (64, 128), name
        assert arr.shape[0] <= 64, (name, arr.shape)
        assert np.all(np.isfinite(arr)), name
    return fams
