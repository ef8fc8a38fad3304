"""Per-GEMM training recipes: what each of the three GEMMs of a linear layer quantizes, and how.

A layer ``Y = X·W`` runs three GEMMs in training, each with its own contraction axis:

* ``forward``: ``Y = X·W``, contraction over the input features K (lhs = X, rhs = W);
* ``dgrad``:   ``dX = dY·Wᵀ``, contraction over the output features N (lhs = dY, rhs = W);
* ``wgrad``:   ``dW = Xᵀ·dY``, contraction over the tokens M (lhs = X, rhs = dY).

A :class:`Recipe` says, for each GEMM (:class:`GemmSpec`) and each of its two operands
(:class:`OperandSpec`), the format, rounding, scale mode, gradient estimator and any pre-scale,
plus the transform applied to both operands along the contraction axis, the accumulation dtype and
what the forward pass saves for the backward pass. Blocks of a block-scaled format always run along
the GEMM's contraction axis, so X is blocked along K in ``forward`` and along the tokens in
``wgrad``. Recipes are data (frozen, hashable dataclasses); :mod:`qjax.ops` does the work.

Named recipes (``names()``), each documented with its paper in :data:`DESCRIPTIONS` and in
``docs/recipes.md``: bf16, fp8, fp8_blockwise, mxfp8, mxfp4, nvfp4, fp4_all_the_way, quest, quartet,
bitnet158, switchback, int8. Build your own with :func:`dataclasses.replace`.

Example:
  >>> import dataclasses
  >>> r = get("nvfp4")
  >>> r.dgrad.lhs.rounding
  'stochastic'
  >>> no_rht = dataclasses.replace(r, name="nvfp4_no_rht",
  ...                              wgrad=dataclasses.replace(r.wgrad, transform=None))
  >>> no_rht.wgrad.transform is None
  True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from qjax import estimators as E
from qjax import formats as F

Transform = Literal["hadamard", "random_hadamard"]
SaveForBackward = Literal["high_precision", "quantized"]

_ROUNDINGS = ("nearest", "stochastic")
_SCALE_MODES = ("floor", "rceil")
_TRANSFORMS = (None, "hadamard", "random_hadamard")
_SAVES = ("high_precision", "quantized")
# Estimators whose gradient is the identity (the op can skip applying their VJP).
IDENTITY_GRADIENT_ESTIMATORS = ("ste",)
# Estimators that draw random numbers in their forward value.
RANDOM_ESTIMATORS = ("stochastic", "gaussian")


@dataclasses.dataclass(frozen=True)
class OperandSpec:
    """How one operand of one GEMM is quantized.

    Attributes:
      format: a format name or :class:`~qjax.formats.Format`; ``None`` leaves the operand in high
        precision (upcast to the accumulation dtype, not rounded).
      rounding: ``"nearest"`` (RTN, ties to even) or ``"stochastic"`` (SR; the op then needs a key).
      scale_mode: ``"floor"`` (OCP) or ``"rceil"`` (NVIDIA) for E8M0 scales; ``"floor"`` otherwise.
      estimator: the gradient estimator's name (``qjax.estimators``), used only in the ``forward``
        GEMM (the backward GEMMs are not differentiated): ``"ste"`` is :func:`qjax.fake_quant`.
      estimator_options: keyword options of the estimator, as a tuple of ``(name, value)`` pairs
        (a dict is accepted and stored sorted, so the spec stays hashable).
      prescale: multiply the operand by this after its scales are computed and before rounding,
        and divide the dequantized value by it (Tseng et al.'s 3/4 against clipping: with OCP
        "floor" scales a block maximum can land in [4, 8) > 6, and SR is unbiased only without
        clipping). 1 disables it.

    Example:
      >>> OperandSpec("mxfp4", rounding="stochastic", prescale=0.75).needs_key
      True
    """

    format: F.Format | str | None = None
    rounding: str = "nearest"
    scale_mode: str = "floor"
    estimator: str = "ste"
    estimator_options: Any = ()
    prescale: float = 1.0

    def __post_init__(self):
        if self.format is not None:
            F.get(self.format)  # raises on an unknown name, listing the valid ones
        if self.rounding not in _ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; valid: {', '.join(_ROUNDINGS)}.")
        if self.scale_mode not in _SCALE_MODES:
            raise ValueError(
                f"unknown scale_mode {self.scale_mode!r}; valid: {', '.join(_SCALE_MODES)}.")
        if self.estimator not in E.names():
            raise ValueError(
                f"unknown estimator {self.estimator!r}; valid: {', '.join(E.names())}.")
        options = self.estimator_options
        if isinstance(options, dict):
            options = tuple(sorted(options.items()))
        object.__setattr__(self, "estimator_options", tuple(tuple(o) for o in options))
        if not (isinstance(self.prescale, (int, float)) and 0 < self.prescale <= 1):
            raise ValueError(f"prescale must be a number in (0, 1], got {self.prescale!r}.")
        if self.prescale != 1 and self.estimator != "ste":
            raise ValueError("prescale applies to plain (ste) quantizers only, not to estimator "
                             f"{self.estimator!r}.")

    @property
    def fmt(self) -> F.Format | None:
        """The resolved :class:`~qjax.formats.Format` (None for high precision)."""
        return None if self.format is None else F.get(self.format)

    @property
    def quantizes(self) -> bool:
        return self.format is not None

    @property
    def needs_key(self) -> bool:
        return self.quantizes and (self.rounding == "stochastic"
                                   or self.estimator in RANDOM_ESTIMATORS)


HIGH_PRECISION = OperandSpec()


@dataclasses.dataclass(frozen=True)
class GemmSpec:
    """One GEMM: its two operands and the transform applied to both along the contraction axis.

    The transform belongs to the GEMM, not to an operand: only the same orthogonal rotation on both
    sides leaves the product unchanged (``(X R)(Rᵀ W) = X W``).

    Attributes:
      lhs: the left operand (X in forward, dY in dgrad, X in wgrad).
      rhs: the right operand (W in forward, W in dgrad, dY in wgrad).
      transform: ``None``, ``"hadamard"`` (blockwise Walsh–Hadamard) or ``"random_hadamard"``
        (random ±1 signs first, drawn from this GEMM's key; the op then needs a key).
      hadamard_block_size: the block of the transform, a power of two dividing the contraction
        length; ``None`` rotates the whole contraction axis as one block.

    Example:
      >>> GemmSpec(OperandSpec("mxfp4"), OperandSpec("mxfp4"), "hadamard", 32).quantizes
      True
    """

    lhs: OperandSpec = HIGH_PRECISION
    rhs: OperandSpec = HIGH_PRECISION
    transform: str | None = None
    hadamard_block_size: int | None = 32

    def __post_init__(self):
        if self.transform not in _TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; valid: None, 'hadamard', "
                             "'random_hadamard'.")
        b = self.hadamard_block_size
        if b is not None and (not isinstance(b, int) or b < 2 or b & (b - 1)):
            raise ValueError(f"hadamard_block_size must be a power of two >= 2 or None, got {b!r}.")

    @property
    def quantizes(self) -> bool:
        return self.lhs.quantizes or self.rhs.quantizes

    @property
    def needs_key(self) -> bool:
        return self.lhs.needs_key or self.rhs.needs_key or self.transform == "random_hadamard"


UNQUANTIZED = GemmSpec()


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training recipe: one :class:`GemmSpec` per GEMM, the accumulation dtype, what is saved.

    Attributes:
      name: a name for messages and the registry.
      forward: ``Y = X·W`` (lhs X blocked along K, rhs W blocked along K).
      dgrad: ``dX = dY·Wᵀ`` (lhs dY blocked along N, rhs W blocked along N).
      wgrad: ``dW = Xᵀ·dY`` (lhs X blocked along tokens M, rhs dY blocked along M).
      accumulation_dtype: dtype name the quantized GEMMs multiply and accumulate in
        (``"float32"``); the op's output dtype is ``preferred_element_type`` or the inputs' dtype.
      save_for_backward: ``"high_precision"``: the forward saves X and W as given and the backward
        GEMMs quantize them afresh along their own contraction axes (memory as unquantized
        training). ``"quantized"``: the forward saves its quantized X and W (mapped back through
        the inverse transform when the forward rotates them) and the backward GEMMs quantize those
        copies again (double quantization, as Transformer Engine's FP8 and Quartet do; saves memory
        on hardware, identical for per-tensor formats up to an ulp of the scale).

    Example:
      >>> get("bf16").quantizes
      False
    """

    name: str
    forward: GemmSpec = UNQUANTIZED
    dgrad: GemmSpec = UNQUANTIZED
    wgrad: GemmSpec = UNQUANTIZED
    accumulation_dtype: str = "float32"
    save_for_backward: str = "high_precision"

    def __post_init__(self):
        if self.save_for_backward not in _SAVES:
            raise ValueError(f"unknown save_for_backward {self.save_for_backward!r}; valid: "
                             f"{', '.join(_SAVES)}.")
        if not jnp.issubdtype(np.dtype(self.accumulation_dtype), jnp.floating):
            raise ValueError(f"accumulation_dtype must be a float dtype name, "
                             f"got {self.accumulation_dtype!r}.")
        for gemm_name in ("dgrad", "wgrad"):
            gemm = getattr(self, gemm_name)
            for side in ("lhs", "rhs"):
                if getattr(gemm, side).estimator != "ste":
                    raise ValueError(
                        f"recipe {self.name!r}: {gemm_name}.{side} names estimator "
                        f"{getattr(gemm, side).estimator!r}, but backward GEMMs are not "
                        "differentiated; estimators apply to the forward GEMM only (use "
                        "rounding='stochastic' for SR in a backward GEMM).")

    @property
    def gemms(self) -> dict[str, GemmSpec]:
        return {"forward": self.forward, "dgrad": self.dgrad, "wgrad": self.wgrad}

    @property
    def quantizes(self) -> bool:
        """Whether any GEMM quantizes or transforms anything (False: plain ``lax.dot_general``)."""
        return any(g.quantizes or g.transform is not None for g in self.gemms.values())

    @property
    def needs_key(self) -> bool:
        """Whether the recipe draws random numbers (SR, random Hadamard, random estimators)."""
        return any(g.needs_key for g in self.gemms.values())


# --------------------------------------------------------------------------- formats used below

FP8_E4M3_1x128 = F.Format("fp8_e4m3_1x128", F.E4M3_ELEM, F.Scaling(F.Block(128), F.FP32))
FP8_E4M3_128x128 = F.Format("fp8_e4m3_128x128", F.E4M3_ELEM, F.Scaling(F.Tile(128, 128), F.FP32))
NVFP4_16x16 = F.Format("nvfp4_16x16", F.E2M1_ELEM,
                       F.Scaling(F.Tile(16, 16), F.E4M3, tensor_scale=True))
INT8_PER_TENSOR = F.Format("int8_per_tensor", F.IntEncoding(8), F.Scaling(F.PerTensor(), F.FP32))
INT4_PER_CHANNEL = F.Format("int4_per_channel", F.IntEncoding(4),
                            F.Scaling(F.PerChannel(), F.FP32))


def _op(fmt=None, rounding="nearest", **kw) -> OperandSpec:
    return OperandSpec(fmt, rounding, **kw)


def _same(spec: OperandSpec, **gemm) -> GemmSpec:
    return GemmSpec(spec, spec, **gemm)


_RTN_E4M3 = _op("fp8_e4m3")
_MXFP4_SR = _op("mxfp4", "stochastic", prescale=0.75)

_RECIPES: dict[str, Recipe] = {}
DESCRIPTIONS: dict[str, str] = {}


def _register(recipe: Recipe, description: str) -> Recipe:
    _RECIPES[recipe.name] = recipe
    DESCRIPTIONS[recipe.name] = description
    return recipe


BF16 = _register(Recipe("bf16"), """No quantization: every GEMM is ``jax.lax.dot_general`` on the
inputs as given (any dtype), values and gradients identical to it. The baseline of mixed-precision
training (Micikevicius et al., "Mixed Precision Training", 2018).""")

FP8 = _register(Recipe(
    "fp8",
    forward=GemmSpec(_RTN_E4M3, _RTN_E4M3),
    dgrad=GemmSpec(_op("fp8_e5m2"), _RTN_E4M3),
    wgrad=GemmSpec(_RTN_E4M3, _op("fp8_e5m2")),
    save_for_backward="quantized",
), """FP8 "hybrid" recipe of Micikevicius et al., "FP8 Formats for Deep Learning" (2022), as in
NVIDIA Transformer Engine with per-tensor current scaling: X and W in E4M3 (forward, and as the
saved FP8 copies reused by dgrad/wgrad), dY in E5M2 in dgrad and wgrad; one FP32 scale per tensor
(amax / max); round to nearest; STE.""")

FP8_BLOCKWISE = _register(Recipe(
    "fp8_blockwise",
    forward=GemmSpec(_op(FP8_E4M3_1x128), _op(FP8_E4M3_128x128)),
    dgrad=GemmSpec(_op(FP8_E4M3_1x128), _op(FP8_E4M3_128x128)),
    wgrad=GemmSpec(_op(FP8_E4M3_1x128), _op(FP8_E4M3_1x128)),
), """DeepSeek-AI, "DeepSeek-V3 Technical Report" (2024), fine-grained FP8: E4M3 for every tensor;
activations and gradients in 1x128 tiles along the contraction axis (per token per 128 channels in
forward/dgrad, 128 tokens per channel in wgrad), weights in 128x128 blocks (the same blocks for W
and Wᵀ); FP32 scales (amax / 448); round to nearest; FP32 accumulation; STE.""")

MXFP8 = _register(Recipe(
    "mxfp8",
    forward=_same(_op("mxfp8", scale_mode="rceil")),
    dgrad=_same(_op("mxfp8", scale_mode="rceil")),
    wgrad=_same(_op("mxfp8", scale_mode="rceil")),
), """Mishra, Stosic, Layton, "Recipes for Pre-training LLMs with MXFP8" (NVIDIA, 2025): MXFP8
E4M3 for all operands of all three GEMMs (gradients included), 1x32 E8M0 blocks along each GEMM's
contraction axis (so the backward GEMMs re-quantize X, W, dY from high precision along their own
axes), scales rounded up (``rceil``); round to nearest; STE.""")

MXFP4 = _register(Recipe(
    "mxfp4",
    dgrad=GemmSpec(_MXFP4_SR, _MXFP4_SR, "random_hadamard", 64),
    wgrad=GemmSpec(_MXFP4_SR, _MXFP4_SR, "random_hadamard", 64),
), """Tseng, Yu, Park, "Training LLMs with MXFP4" (AISTATS 2025): forward in high precision (BF16
in their Megatron recipe); dgrad and wgrad with both operands in MXFP4 (OCP ``floor`` E8M0 scales)
after a random Hadamard transform along the contraction axis (block 64, fresh signs per GEMM,
shared by both operands), stochastic rounding with the 3/4 pre-scale (scale from the block, then
x·3/4 is SR-rounded and the result multiplied by 4/3, so no value clips and SR stays unbiased).
Needs a key.""")

NVFP4 = _register(Recipe(
    "nvfp4",
    forward=GemmSpec(_op("nvfp4"), _op(NVFP4_16x16)),
    dgrad=GemmSpec(_op("nvfp4", "stochastic"), _op(NVFP4_16x16)),
    wgrad=GemmSpec(_op("nvfp4"), _op("nvfp4", "stochastic"), "random_hadamard", 16),
), """NVIDIA, "Pretraining Large Language Models with NVFP4" (2025): all three GEMMs in NVFP4
(E2M1, E4M3 block scales, FP32 tensor scale). Weights use 16x16 2-D block scaling so W (forward)
and Wᵀ (dgrad) quantize to the same values; activations and gradients 1x16 along the contraction
axis. Random Hadamard transform (16x16) on both wgrad operands; stochastic rounding on the
gradient dY (dgrad and wgrad); round to nearest elsewhere (forward, X and W). The paper also keeps
a few layers in BF16, a model-level choice outside this op. Needs a key.""")

FP4_ALL_THE_WAY = _register(Recipe(
    "fp4_all_the_way",
    forward=_same(_op("nvfp4")),
    dgrad=GemmSpec(_op("nvfp4", "stochastic"), _op("nvfp4")),
    wgrad=GemmSpec(_op("nvfp4"), _op("nvfp4", "stochastic")),
), """Chmiel et al., "FP4 All the Way: Fully Quantized Training of LLMs" (2025): every operand of
every GEMM in NVFP4 (E2M1, 1x16 E4M3 block scales along the contraction axis); round to nearest in
the forward pass, stochastic rounding for the neural gradients dY in the backward GEMMs; STE.
Needs a key.""")

QUEST = _register(Recipe(
    "quest",
    forward=GemmSpec(_op(INT4_PER_CHANNEL, estimator="quest"),
                     _op(INT4_PER_CHANNEL, estimator="quest"), "hadamard", None),
    save_for_backward="quantized",
), """Panferov et al., "QuEST: Stable Training of LLMs with 1-Bit Weights and Activations"
(2025), W4A4: in the forward GEMM X and W are Hadamard-rotated along K (the whole axis) and
quantized to INT4 with the MSE-optimal Gaussian clipping scale per row, and the gradient flows
through the trust estimator (masked where the quantization error leaves the trust region);
dgrad and wgrad unquantized GEMMs on the saved quantized operands (the autodiff of the
fake-quantized forward, as in QuEST's training code).""")

QUARTET = _register(Recipe(
    "quartet",
    forward=GemmSpec(_op("mxfp4", estimator="quest"), _op("mxfp4", estimator="quest"),
                     "hadamard", 32),
    dgrad=GemmSpec(_MXFP4_SR, _MXFP4_SR, "random_hadamard", 32),
    wgrad=GemmSpec(_MXFP4_SR, _MXFP4_SR, "random_hadamard", 32),
    save_for_backward="quantized",
), """Castro, Panferov et al., "Quartet: Native FP4 Training Can Be Optimal for Large Language
Models" (2025): forward QuEST-style in MXFP4 (Hadamard along K in blocks of 32, Gaussian clipping
scale, trust-estimator mask on the gradient); dgrad and wgrad in MXFP4 with a random Hadamard
transform (block 32, fresh signs per step) and stochastic rounding of both operands (pre-scaled
against clipping; the released kernels fold the correction into the GEMM's alpha); the backward
GEMMs re-quantize the saved forward-quantized X and W. Needs a key.""")

BITNET158 = _register(Recipe(
    "bitnet158",
    forward=GemmSpec(_op("int8"), _op("ternary")),
    save_for_backward="quantized",
), """Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits" (BitNet
b1.58, 2024): W ternary {-1, 0, 1} with a per-tensor absmean scale, X int8 with a per-token absmax
scale (along K), STE for both; dgrad and wgrad unquantized GEMMs on the saved quantized W and X
(exactly the gradient of the fake-quantized forward, as BitNet's STE implementation computes).""")

SWITCHBACK = _register(Recipe(
    "switchback",
    forward=GemmSpec(_op("int8"), _op(INT8_PER_TENSOR)),
    dgrad=GemmSpec(_op("int8"), _op(INT8_PER_TENSOR)),
), """Wortsman et al., "Stable and low-precision training for large-scale vision-language models"
(SwitchBack, NeurIPS 2023): forward and dgrad in int8 with row-wise absmax scales for the
activations/gradients (X per token, dY per token) and a tensor-wise scale for W; wgrad unquantized
(16-bit in the paper) because its contraction runs over the many tokens; round to nearest; STE.""")

INT8 = _register(Recipe(
    "int8",
    forward=_same(_op("int8")),
    dgrad=_same(_op("int8")),
    wgrad=_same(_op("int8")),
), """Plain INT8 in all three GEMMs (no single paper; the common W8A8G8 baseline): every operand
int8 with one absmax scale per row/column along the GEMM's contraction axis, round to nearest,
STE. Deterministic (no key).""")


def names() -> tuple[str, ...]:
    """The named recipes."""
    return tuple(_RECIPES)


def get(recipe: Recipe | str) -> Recipe:
    """Returns the named :class:`Recipe` (a :class:`Recipe` is returned unchanged).

    Args:
      recipe: a name from :func:`names` or a :class:`Recipe`.

    Returns:
      The recipe.

    Raises:
      ValueError: unknown name; the message lists the valid names.

    Example:
      >>> get("fp8").dgrad.lhs.format
      'fp8_e5m2'
    """
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str) and recipe in _RECIPES:
        return _RECIPES[recipe]
    raise ValueError(f"unknown recipe {recipe!r}; valid names: {', '.join(_RECIPES)}.")


def describe(recipe: Recipe | str) -> str:
    """A Markdown table row per GEMM operand: format / rounding / transform / estimator."""
    recipe = get(recipe)
    roles = {"forward": ("X", "W"), "dgrad": ("dY", "W"), "wgrad": ("X", "dY")}
    rows = []
    for gemm_name, gemm in recipe.gemms.items():
        for side, role in zip(("lhs", "rhs"), roles[gemm_name]):
            spec = getattr(gemm, side)
            fmt = spec.fmt
            transform = gemm.transform or "-"
            if gemm.transform:
                transform += f" ({gemm.hadamard_block_size or 'axis'})"
            rounding = spec.rounding if spec.quantizes else "-"
            if spec.prescale != 1:
                rounding += f" x{spec.prescale:g}"
            estimator = spec.estimator if (spec.quantizes and gemm_name == "forward") else "-"
            fmt_name = fmt.name if fmt else "high precision"
            if spec.quantizes and spec.scale_mode != "floor":
                fmt_name += f" ({spec.scale_mode})"
            rows.append(f"| {recipe.name} | {gemm_name} | {role} | {fmt_name} | {rounding} | "
                        f"{transform} | {estimator} |")
    return "\n".join(rows)


def table() -> str:
    """The recipe × GEMM × operand table of every named recipe, as Markdown."""
    head = ["| recipe | GEMM | operand | format | rounding | transform | estimator |",
            "|---|---|---|---|---|---|---|"]
    return "\n".join(head + [describe(n) for n in names()])


__all__ = [
    "DESCRIPTIONS",
    "GemmSpec",
    "OperandSpec",
    "Recipe",
    "describe",
    "get",
    "names",
    "table",
]
