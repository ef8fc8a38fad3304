"""Independent NumPy reference for the MX (OCP MX v1.0) and NVFP4 rules of docs/numerics.md.

This module is deliberately written without looking at qjax: it uses float64 arithmetic, np.frexp for
exponents and ml_dtypes casts for the element rounding, so that a shared bug between qjax and the
reference is unlikely. It implements the rules of docs/numerics.md literally, with IEEE semantics
(subnormals included); the tests compare qjax with it bit for bit.

Why float64 is exact enough here
--------------------------------
* MX element step: X is a power of two in [2^-127, 2^127] and x is a float32, so x / X is exact in
  float64 (float64 has 53 mantissa bits and an exponent range far beyond float32 +- 254 octaves).
  Therefore "rne_sat(x_i / X)" on the exact real quotient is a single ml_dtypes rounding of an exact
  float64 value. The dequantised value P * X has at most 8 significant bits and is exact in float64;
  casting it to float32 is then the correctly rounded float32 product (only overflow to +-Inf or deep
  float32 underflow can round, and both round exactly like an IEEE float32 multiply would).
* floor(log2(amax)): amax is a positive float32, exactly representable in float64, and np.frexp gives
  amax = m * 2^e with m in [0.5, 1) exactly, so floor(log2(amax)) = e - 1 with no rounding at all.
* ceil(log2(amax / max_elem)) (rceil): the real quotient q = amax / M is not exact in float64, but
  M = odd * 2^r with odd in {7, 15, 3, 127} and amax = a * 2^p with a < 2^24. q is a power of two
  iff a = odd * 2^j for an integer j; otherwise q is at a relative distance of at least about
  1/(odd * 2^25) > 2^-32 from every power of two, far more than the 2^-53 relative error of the
  float64 division. Hence frexp(float64(q)) gives the right ceiling. We do not rely on this argument
  alone: `_ceil_log2_ratio` re-checks M * 2^(k-1) < amax <= M * 2^k with exact float64 products.

Element rounding: ml_dtypes casts to float8/6/4 round to nearest, ties to even, but e4m3fn maps
overflow to NaN and fp4/fp6 map NaN to -0, so we clip to +-max first and handle NaN ourselves
("satfinite": +-Inf -> +-max, NaN -> NaN where the encoding has NaN, else +0). Caveat found while
writing this: ml_dtypes 0.6 casts *float64* to these types through float32 (double rounding:
nextafter(0.75, 0) in float64 -> 0.75f -> tie -> 1.0 in e2m1). Every value we round is exactly a
float32 (MX: float32 x times a power of two within range; NVFP4: a float32 by the doc's op order),
except quotients so tiny (< 2^-60) that they round to zero anyway, so `rne_sat` asserts exactly that
and the casts are single roundings. tests/test_reference_bitexact.py checks `rne_sat` against a
brute-force nearest-even search over the grid of each encoding.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

__all__ = [
    "ELEMENTS",
    "rne_sat",
    "mx_scales_ref",
    "mx_fake_quant_ref",
    "nvfp4_scales_ref",
    "nvfp4_fake_quant_ref",
    "MX_BLOCK",
    "NVFP4_BLOCK",
]

MX_BLOCK = 32
NVFP4_BLOCK = 16

# name -> (ml_dtypes type or None for int8, max, emax, has_nan)
ELEMENTS = {
    "e4m3": (ml_dtypes.float8_e4m3fn, 448.0, 8, True),
    "e5m2": (ml_dtypes.float8_e5m2, 57344.0, 15, True),
    "e3m2": (ml_dtypes.float6_e3m2fn, 28.0, 4, False),
    "e2m3": (ml_dtypes.float6_e2m3fn, 7.5, 2, False),
    "e2m1": (ml_dtypes.float4_e2m1fn, 6.0, 2, False),
    # MXINT8: int8 two's complement k with implicit scale 2^-6, |k| <= 127.
    "int8": (None, 127.0 / 64.0, 0, False),
}


def _to_f32(x) -> np.ndarray:
    """Accept float32 or bfloat16 (or anything float) input; return a float32 array (exact upcast)."""
    x = np.asarray(x)
    if x.dtype == np.float32:
        return x
    if x.dtype in (ml_dtypes.bfloat16, np.float16):
        return x.astype(np.float32)
    raise TypeError(f"reference expects float32 or bfloat16 input, got {x.dtype}")


def rne_sat(v, elem: str) -> np.ndarray:
    """Round real values `v` (float64, exact) to element encoding `elem`, ties to even, saturating.

    Returns float64 values of the encoding. +-Inf -> +-max; NaN -> NaN (e4m3, e5m2) or +0 (others).
    Signs of zero follow IEEE rounding (a negative value rounding to zero gives -0) for the float
    encodings; int8 has no -0, so it gives +0.
    """
    dtype, vmax, _, has_nan = ELEMENTS[elem]
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(over="ignore"):
        f32_exact = v.astype(np.float32).astype(np.float64) == v
    assert np.all(f32_exact | ~np.isfinite(v) | (np.abs(v) < 2.0**-60)), "rne_sat needs float32 values"
    nan = np.isnan(v)
    clipped = np.clip(np.where(nan, 0.0, v), -vmax, vmax)
    if dtype is None:
        k = np.rint(clipped * 64.0)  # exact scaling; np.rint is round-half-to-even
        out = k / 64.0 + 0.0  # "+ 0.0" turns -0 into +0 (two's complement has no -0)
    else:
        out = clipped.astype(dtype).astype(np.float64)
    return np.where(nan, np.nan if has_nan else 0.0, out)


def _blocks(x32: np.ndarray, block: int) -> np.ndarray:
    if x32.ndim == 0 or x32.shape[-1] % block:
        raise ValueError(f"last axis ({x32.shape}) must be a multiple of {block}")
    return x32.reshape(*x32.shape[:-1], x32.shape[-1] // block, block)


def _floor_log2(a: np.ndarray) -> np.ndarray:
    """floor(log2(a)) for positive finite float64 a, exactly (frexp: a = m 2^e, m in [0.5, 1))."""
    _, e = np.frexp(a)
    return e.astype(np.int64) - 1


def _ceil_log2_ratio(a: np.ndarray, m_elem: float) -> np.ndarray:
    """ceil(log2(a / m_elem)) of the exact real quotient, for positive finite a (see module doc)."""
    q = a / m_elem
    m, e = np.frexp(q)
    k = np.where(m == 0.5, e - 1, e).astype(np.int64)
    # Exact verification: m_elem * 2^j is exact in float64 for all j we can meet.
    hi = np.ldexp(m_elem, k)
    lo = np.ldexp(m_elem, k - 1)
    assert np.all((lo < a) & (a <= hi)), "rceil exponent check failed"
    return k


def mx_scales_ref(x, elem: str, scale_mode: str = "floor") -> np.ndarray:
    """Per-block MX scale X (float64, a power of two, or NaN for a block with NaN/Inf).

    Blocks of 32 along the last axis; result shape x.shape[:-1] + (K // 32,).
    """
    if scale_mode not in ("floor", "rceil"):
        raise ValueError(scale_mode)
    _, vmax, emax, _ = ELEMENTS[elem]
    xb = _blocks(_to_f32(x), MX_BLOCK).astype(np.float64)
    finite = np.all(np.isfinite(xb), axis=-1)
    amax = np.max(np.where(np.isfinite(xb), np.abs(xb), 0.0), axis=-1)
    zero = amax == 0
    safe = np.where(finite & ~zero, amax, 1.0)
    if scale_mode == "floor":
        e = _floor_log2(safe) - emax
    else:
        e = _ceil_log2_ratio(safe, vmax)
    e = np.clip(e, -127, 127)
    scale = np.ldexp(1.0, e)
    scale = np.where(zero, 2.0**-127, scale)
    return np.where(finite, scale, np.nan)


def mx_fake_quant_ref(x, elem: str, scale_mode: str = "floor") -> np.ndarray:
    """MX quantise -> dequantise. Returns float32 (round it to bf16 yourself for bf16 inputs)."""
    x32 = _to_f32(x)
    xb = _blocks(x32, MX_BLOCK).astype(np.float64)
    scale = mx_scales_ref(x32, elem, scale_mode)[..., None]
    with np.errstate(invalid="ignore"):
        p = rne_sat(xb / scale, elem)  # exact quotient (power-of-two scale)
        zero_block = np.all(xb == 0, axis=-1, keepdims=True)
        signed_zero = np.copysign(0.0, xb) if ELEMENTS[elem][0] is not None else 0.0  # int: no -0
        p = np.where(zero_block, signed_zero, p)  # all-zero block: ±0, sign kept
        out = p * scale  # exact in float64; NaN for NaN blocks
    with np.errstate(over="ignore"):  # rceil can give P * X >= 2^128: float32 +-Inf, as in IEEE f32
        return out.astype(np.float32).reshape(x32.shape)


def nvfp4_scales_ref(x):
    """NVFP4 scales: (block scales as float32 values of float8_e4m3fn, shape (..., K//16), tensor
    scale s_t as np.float32)."""
    x32 = _to_f32(x)
    xb = _blocks(x32, NVFP4_BLOCK)
    with np.errstate(all="ignore"):
        amax_t = np.max(np.abs(x32))  # NaN propagates through np.max
        if not np.isfinite(amax_t):
            s_t = np.float32(np.nan)
        elif amax_t == 0:
            s_t = np.float32(1.0)
        else:
            s_t = np.float32(amax_t * (np.float32(1) / np.float32(2688.0)))  # f32(amax_t * f32(1/2688))
            s_t = max(s_t, np.float32(2.0**-126))  # never subnormal (nor 0 by underflow)
        amax_b = np.max(np.abs(xb), axis=-1)
        a = (amax_b * (np.float32(1) / np.float32(6.0))).astype(np.float32)  # f32(amax_b * f32(1/6))
        b = (a * (np.float32(1) / s_t)).astype(np.float32)  # f32(... * f32(1 / s_t))
        s_b = rne_sat(b.astype(np.float64), "e4m3").astype(np.float32)
    return s_b, s_t


def nvfp4_fake_quant_ref(x) -> np.ndarray:
    """NVFP4 quantise -> dequantise (float32 result; round it to bf16 yourself for bf16 inputs)."""
    x32 = _to_f32(x)
    xb = _blocks(x32, NVFP4_BLOCK)
    s_b, s_t = nvfp4_scales_ref(x32)
    s_b = s_b[..., None]
    with np.errstate(all="ignore"):
        d = (s_b * s_t).astype(np.float32)  # f32(s_b * s_t)
        r = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, np.float32(1), d))
        v = (xb * r.astype(np.float32)).astype(np.float32)  # f32(x_i * f32(1 / d)); ±0 where d == 0
        p = rne_sat(v.astype(np.float64), "e2m1").astype(np.float32)  # NaN -> +0
        out = (p * d).astype(np.float32)  # f32(P_i * d)
    return out.reshape(x32.shape)
