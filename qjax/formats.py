"""Number formats: element encodings, scale encodings, scaling granularity and the named registry.

A :class:`Format` is data: an element encoding (what one stored value can be), and optionally a
:class:`Scaling` (how values are grouped and which scale each group shares). Behaviour lives in
:mod:`qjax.quantize`. Every format is a frozen, hashable dataclass, so it can be a static argument
of ``jax.jit``. Anywhere a format is accepted, its registry name is accepted too.

Run ``python -m qjax.formats`` for the table of named formats.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, TypeAlias

import jax.numpy as jnp

Specials = Literal["ieee", "fn", "none"]
Statistic = Literal["absmax", "absmean"]


# --------------------------------------------------------------------------- element encodings


@dataclasses.dataclass(frozen=True)
class FloatEncoding:
    """A sign + ``exponent_bits`` + ``mantissa_bits`` floating-point encoding (``ExMy``).

    ``specials`` says what the top exponent field holds:

    * ``"ieee"``: Inf and NaN, as in IEEE 754 (fp8 e5m2, fp16, bf16);
    * ``"fn"``: finite, with a single NaN at the all-ones code and no Inf (fp8 e4m3fn);
    * ``"none"``: finite, every code a number (OCP fp6 e3m2/e2m3, fp4 e2m1).

    Example:
      >>> FloatEncoding(2, 1, "none").max
      6.0
    """

    exponent_bits: int
    mantissa_bits: int
    specials: Specials = "none"
    signed: bool = True

    def __post_init__(self):
        if not 1 <= self.exponent_bits <= 8:
            raise ValueError(f"exponent_bits must be in [1, 8], got {self.exponent_bits}.")
        if not 0 <= self.mantissa_bits <= 22:
            raise ValueError(f"mantissa_bits must be in [0, 22], got {self.mantissa_bits}.")
        if self.specials not in ("ieee", "fn", "none"):
            raise ValueError(f"specials must be one of 'ieee', 'fn', 'none'; got {self.specials!r}.")
        if self.specials == "fn" and self.exponent_bits + self.mantissa_bits < 2:
            raise ValueError("an 'fn' encoding needs at least 2 exponent+mantissa bits.")

    @property
    def name(self) -> str:
        base = f"e{self.exponent_bits}m{self.mantissa_bits}"
        prefix = "" if self.signed else "u"
        return prefix + base + ("fn" if self.specials == "fn" else "")

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest normal number."""
        top_field = 2**self.exponent_bits - 1 - (1 if self.specials == "ieee" else 0)
        return top_field - self.bias

    @property
    def max(self) -> float:
        top_mantissa = 2**self.mantissa_bits - 1
        if self.specials == "fn":  # the all-ones code is NaN
            top_mantissa -= 1
        return (1 + top_mantissa / 2**self.mantissa_bits) * 2.0**self.emax

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mantissa_bits)

    @property
    def epsilon(self) -> float:
        """Distance from 1 to the next larger value."""
        return 2.0**-self.mantissa_bits

    @property
    def has_nan(self) -> bool:
        return self.specials != "none"

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"


@dataclasses.dataclass(frozen=True)
class IntEncoding:
    """Symmetric two's-complement integers ``k * 2**-fraction_bits`` with ``|k| <= 2**(bits-1) - 1``.

    ``IntEncoding(8)`` is int8 in [-127, 127]; ``IntEncoding(2)`` is ternary {-1, 0, 1};
    ``IntEncoding(8, fraction_bits=6)`` is the MXINT8 element (values k/64).

    Example:
      >>> IntEncoding(4).max
      7.0
    """

    bits: int
    fraction_bits: int = 0

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"integer bits must be in [2, 8], got {self.bits}.")

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f"f{self.fraction_bits}" if self.fraction_bits else "")

    @property
    def max_code(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def max(self) -> float:
        return self.max_code * 2.0**-self.fraction_bits

    @property
    def emax(self) -> int:
        """Exponent of the largest power of two not above ``max`` (used by MX scaling)."""
        return math.floor(math.log2(self.max))

    @property
    def min_normal(self) -> float:
        return 2.0**-self.fraction_bits

    @property
    def min_subnormal(self) -> float:
        return 2.0**-self.fraction_bits

    @property
    def epsilon(self) -> float:
        return 2.0**-self.fraction_bits


@dataclasses.dataclass(frozen=True)
class BinaryEncoding:
    """One bit per value: {-1, +1} (zero maps to +1)."""

    @property
    def name(self) -> str:
        return "binary"

    @property
    def bits(self) -> int:
        return 1

    @property
    def max(self) -> float:
        return 1.0

    @property
    def emax(self) -> int:
        return 0

    @property
    def min_normal(self) -> float:
        return 1.0

    @property
    def min_subnormal(self) -> float:
        return 1.0

    @property
    def epsilon(self) -> float:
        return 2.0


ElementEncoding: TypeAlias = FloatEncoding | IntEncoding | BinaryEncoding


# --------------------------------------------------------------------------- scale encodings


@dataclasses.dataclass(frozen=True)
class ScaleEncoding:
    """How a shared scale is stored.

    * ``"e8m0"``: unsigned power of two 2^(code-127), code 255 = NaN (OCP MX). Its exponent comes
      from the block amax by ``scale_mode`` (``"floor"`` or ``"rceil"``).
    * ``"e4m3"``: fp8 e4m3fn, rounded to nearest from ``amax / element.max`` (NVFP4).
    * ``"ue5m3"``: unsigned 5-bit exponent, 3-bit mantissa, all-ones code NaN.
    * ``"fp32"`` / ``"bf16"``: the scale ``amax / element.max`` in that dtype.
    """

    name: Literal["e8m0", "e4m3", "ue5m3", "fp32", "bf16"]

    def __post_init__(self):
        if self.name not in _SCALE_BITS:
            raise ValueError(f"unknown scale encoding {self.name!r}; valid: {sorted(_SCALE_BITS)}.")

    @property
    def bits(self) -> int:
        return _SCALE_BITS[self.name]

    @property
    def power_of_two(self) -> bool:
        return self.name == "e8m0"

    @property
    def float_encoding(self) -> FloatEncoding | None:
        """The rounding grid of a non-power-of-two 8-bit scale (None for e8m0, fp32, bf16)."""
        if self.name == "e4m3":
            return FloatEncoding(4, 3, "fn")
        if self.name == "ue5m3":
            return FloatEncoding(5, 3, "fn", signed=False)
        return None


_SCALE_BITS = {"e8m0": 8, "e4m3": 8, "ue5m3": 8, "fp32": 32, "bf16": 16}
E8M0 = ScaleEncoding("e8m0")
E4M3 = ScaleEncoding("e4m3")
UE5M3 = ScaleEncoding("ue5m3")
FP32 = ScaleEncoding("fp32")
BF16 = ScaleEncoding("bf16")


# --------------------------------------------------------------------------- granularity


@dataclasses.dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""

    def block_shape(self, shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
        return tuple(shape)

    def describe(self) -> str:
        return "tensor"


@dataclasses.dataclass(frozen=True)
class PerChannel:
    """One scale per index of every axis but ``axis`` (the whole quantized axis is one group)."""

    def block_shape(self, shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
        return tuple(n if d == axis else 1 for d, n in enumerate(shape))

    def describe(self) -> str:
        return "channel"


@dataclasses.dataclass(frozen=True)
class Block:
    """1-D blocks of ``size`` consecutive elements along the quantized axis."""

    size: int

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"block size must be positive, got {self.size}.")

    def block_shape(self, shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
        return tuple(self.size if d == axis else 1 for d in range(len(shape)))

    def describe(self) -> str:
        return f"1x{self.size}"


@dataclasses.dataclass(frozen=True)
class Tile:
    """2-D tiles over the last two axes of an array: ``rows`` along the quantized axis (which must
    be one of the last two) and ``cols`` along the other one. Leading axes are batch axes."""

    rows: int
    cols: int

    def __post_init__(self):
        if self.rows < 1 or self.cols < 1:
            raise ValueError(f"tile sides must be positive, got {self.rows}x{self.cols}.")

    def block_shape(self, shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
        ndim = len(shape)
        if ndim < 2:
            raise ValueError(
                f"a {self.rows}x{self.cols} tile format needs an array of rank >= 2, got shape {shape}."
            )
        if axis not in (ndim - 1, ndim - 2):
            raise ValueError(
                f"a tile format tiles the last two axes; the quantized axis must be one of them "
                f"(-1 or -2), got axis {axis} of an array of rank {ndim}."
            )
        other = ndim - 1 if axis == ndim - 2 else ndim - 2
        return tuple(
            self.rows if d == axis else self.cols if d == other else 1 for d in range(ndim)
        )

    def describe(self) -> str:
        return f"{self.rows}x{self.cols}"


Granularity: TypeAlias = PerTensor | PerChannel | Block | Tile


@dataclasses.dataclass(frozen=True)
class Scaling:
    """How elements share scales.

    Attributes:
      granularity: which elements share one scale.
      scale: how each shared scale is stored.
      statistic: ``"absmax"`` (scale maps the group's max magnitude to the element max) or
        ``"absmean"`` (BitNet: scale = mean |x|).
      tensor_scale: add a second, per-tensor FP32 scale above the block scales (NVFP4): block scales
        are then stored relative to ``amax_tensor / (element.max * scale.max)``.
    """

    granularity: Granularity
    scale: ScaleEncoding = FP32
    statistic: Statistic = "absmax"
    tensor_scale: bool = False

    def __post_init__(self):
        if self.statistic not in ("absmax", "absmean"):
            raise ValueError(f"statistic must be 'absmax' or 'absmean', got {self.statistic!r}.")
        if self.tensor_scale and self.scale.float_encoding is None:
            raise ValueError("a two-level tensor scale needs an 8-bit float block scale (e4m3 or ue5m3).")


# --------------------------------------------------------------------------- formats


@dataclasses.dataclass(frozen=True)
class Format:
    """A number format: an element encoding and, unless it is a plain cast, a scaling.

    Attributes:
      name: registry name (or a descriptive name for user-built formats).
      element: the element encoding.
      scaling: how scales are shared; ``None`` for unscaled formats (plain casts like bf16).

    Example:
      >>> fmt = get("mxfp4")
      >>> fmt.element.max, fmt.scaling.granularity.size
      (6.0, 32)
      >>> import dataclasses
      >>> mxfp4_b16 = dataclasses.replace(fmt, name="mxfp4_b16", scaling=dataclasses.replace(
      ...     fmt.scaling, granularity=Block(16)))
    """

    name: str
    element: ElementEncoding
    scaling: Scaling | None = None

    def __post_init__(self):
        if self.scaling is None and not isinstance(self.element, FloatEncoding):
            raise ValueError(f"format {self.name!r}: integer and binary elements need a scaling.")

    @property
    def block_size(self) -> int | None:
        """Elements per scale along the quantized axis for 1-D block formats, else None."""
        if self.scaling is not None and isinstance(self.scaling.granularity, Block):
            return self.scaling.granularity.size
        return None

    @property
    def native_dtype(self):
        """The JAX dtype whose cast is exactly this (unscaled) format, or None."""
        if self.scaling is not None or not isinstance(self.element, FloatEncoding):
            return None
        return _NATIVE_CAST.get(self.element)

    @property
    def bf16_gemm(self) -> Literal["dequantized", "outer_scale"] | None:
        """How a GEMM can take this format's values in bfloat16 without rounding them.

        * ``"dequantized"``: every dequantized value is a bfloat16 number (plain casts that fit,
          and power-of-two block scales with elements of at most 8 significant bits: MXFP8/6/4,
          MXINT8). Exception: E4M3/E5M2 subnormals in blocks whose scale is below 2^-124/2^-117
          (block maxima below ~1e-30) lie under bfloat16's smallest subnormal, 2^-133, and round.
        * ``"outer_scale"``: the elements times their block scales are bfloat16 numbers, and the
          rest of the scale (a per-tensor or per-channel float scale, or the FP32 tensor scale of
          a two-level format like NVFP4) is constant along the contraction axis, so a GEMM
          multiplies its output by it instead.
        * ``None``: neither (float block scales along the contraction axis, e.g. 1x128 FP32
          blocks, or int4 with bfloat16 group scales).

        Example:
          >>> get("mxfp4").bf16_gemm, get("nvfp4").bf16_gemm, get("int4").bf16_gemm
          ('dequantized', 'outer_scale', None)
        """
        element = self.element
        if isinstance(element, FloatEncoding):
            element_bits = element.mantissa_bits + 1
        else:
            element_bits = 1 if isinstance(element, BinaryEncoding) else element.bits - 1
        if self.scaling is None:
            return "dequantized" if element.exponent_bits <= 8 and element_bits <= 8 else None
        scale = self.scaling.scale
        if scale.power_of_two:
            return "dequantized" if element_bits <= 8 else None
        if self.scaling.tensor_scale:  # the block scale (8-bit float) stays in the values
            fits = element_bits + scale.float_encoding.mantissa_bits + 1 <= 8
            return "outer_scale" if fits else None
        if isinstance(self.scaling.granularity, (PerTensor, PerChannel)):
            return "outer_scale" if element_bits <= 8 else None
        return None

    def bits_per_value(self, elements_per_tensor: int | None = None) -> float:
        """Storage bits per element, scales included (per-tensor and per-channel scales are
        amortised over ``elements_per_tensor`` / the channel length, ignored when not given)."""
        bits = float(self.element.bits)
        if self.scaling is None:
            return bits
        gran = self.scaling.granularity
        if isinstance(gran, Block):
            bits += self.scaling.scale.bits / gran.size
        elif isinstance(gran, Tile):
            bits += self.scaling.scale.bits / (gran.rows * gran.cols)
        elif elements_per_tensor:
            bits += self.scaling.scale.bits / elements_per_tensor
        if self.scaling.tensor_scale and elements_per_tensor:
            bits += 32 / elements_per_tensor
        return bits


_NATIVE_CAST = {
    FloatEncoding(8, 7, "ieee"): jnp.bfloat16,
    FloatEncoding(5, 10, "ieee"): jnp.float16,
}

E4M3_ELEM = FloatEncoding(4, 3, "fn")
E5M2_ELEM = FloatEncoding(5, 2, "ieee")
E3M2_ELEM = FloatEncoding(3, 2, "none")
E2M3_ELEM = FloatEncoding(2, 3, "none")
E2M1_ELEM = FloatEncoding(2, 1, "none")


def _mx(name: str, element: ElementEncoding) -> Format:
    return Format(name, element, Scaling(Block(32), E8M0))


def _per_tensor(name: str, element: ElementEncoding) -> Format:
    return Format(name, element, Scaling(PerTensor(), FP32))


_REGISTRY: dict[str, Format] = {
    f.name: f
    for f in (
        _per_tensor("fp8_e4m3", E4M3_ELEM),
        _per_tensor("fp8_e5m2", E5M2_ELEM),
        _mx("mxfp8", E4M3_ELEM),
        _mx("mxfp8_e5m2", E5M2_ELEM),
        _mx("mxfp6_e3m2", E3M2_ELEM),
        _mx("mxfp6_e2m3", E2M3_ELEM),
        _mx("mxfp4", E2M1_ELEM),
        _mx("mxint8", IntEncoding(8, fraction_bits=6)),
        Format("nvfp4", E2M1_ELEM, Scaling(Block(16), E4M3, tensor_scale=True)),
        Format("int8", IntEncoding(8), Scaling(PerChannel(), FP32)),
        Format("int4", IntEncoding(4), Scaling(Block(32), BF16)),
        Format("ternary", IntEncoding(2), Scaling(PerTensor(), FP32, statistic="absmean")),
        Format("binary", BinaryEncoding(), Scaling(PerTensor(), FP32, statistic="absmean")),
        Format("bf16", FloatEncoding(8, 7, "ieee")),
        Format("fp16", FloatEncoding(5, 10, "ieee")),
    )
}

FormatLike: TypeAlias = Format | str


def names() -> tuple[str, ...]:
    """The registered format names."""
    return tuple(_REGISTRY)


def get(fmt: FormatLike) -> Format:
    """Returns the :class:`Format` named ``fmt`` (a :class:`Format` is returned unchanged).

    Args:
      fmt: a registry name such as ``"mxfp4"`` or a :class:`Format`.

    Returns:
      The format.

    Raises:
      ValueError: unknown name; the message lists the valid names.

    Example:
      >>> get("nvfp4").scaling.scale.name
      'e4m3'
    """
    if isinstance(fmt, Format):
        return fmt
    if isinstance(fmt, str) and fmt in _REGISTRY:
        return _REGISTRY[fmt]
    raise ValueError(f"unknown format {fmt!r}; valid names: {', '.join(_REGISTRY)}.")


def register(fmt: Format) -> Format:
    """Adds a user-built format to the registry under ``fmt.name`` (a name may be used once)."""
    if fmt.name in _REGISTRY and _REGISTRY[fmt.name] != fmt:
        raise ValueError(f"format name {fmt.name!r} is already registered to a different format.")
    _REGISTRY[fmt.name] = fmt
    return fmt


def float_format(exponent_bits: int, mantissa_bits: int, *, block_size: int = 32,
                 scale: ScaleEncoding = E8M0, specials: Specials = "none") -> Format:
    """A block-scaled ``ExMy`` format for design-space sweeps (e.g. e3m4, e1m2).

    Example:
      >>> float_format(3, 4).name
      'mx_e3m4_b32'
    """
    element = FloatEncoding(exponent_bits, mantissa_bits, specials)
    return Format(f"mx_{element.name}_b{block_size}", element, Scaling(Block(block_size), scale))


def table() -> str:
    """The table of named formats as Markdown."""
    rows = ["| name | element | scaling | bits/value | max | min normal | epsilon |",
            "|---|---|---|---|---|---|---|"]
    for fmt in _REGISTRY.values():
        e = fmt.element
        if fmt.scaling is None:
            scaling = "none (cast)"
        else:
            s = fmt.scaling
            scaling = f"{s.granularity.describe()} {s.scale.name}"
            scaling += " + fp32 tensor" if s.tensor_scale else ""
            scaling += " absmean" if s.statistic == "absmean" else ""
        rows.append(
            f"| {fmt.name} | {e.name} | {scaling} | {fmt.bits_per_value():g} | {e.max:g} | "
            f"{e.min_normal:g} | {e.epsilon:g} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
    print("\nbits/value counts block/tile scales; per-tensor and per-channel scales amortise to ~0.")
