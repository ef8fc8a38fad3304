"""``dot_general`` under a per-GEMM training recipe: one ``custom_vjp`` over the three GEMMs.

Any ``dimension_numbers`` are canonicalised outside the custom VJP (plain transposes and reshapes,
which JAX differentiates) to ``x: (B, M, K)`` and ``w: (B, K, N)``; the custom VJP then runs

* forward ``y = Q(T x) · Q(T w)``, blocks along K;
* dgrad ``dx = Q(T dy) · Q(T w)ᵀ``, blocks along N, then the forward estimator's rule for x;
* wgrad ``dw = Q(T x)ᵀ · Q(T dy)``, blocks along M (tokens), then the forward estimator's rule
  for w;

each with its own :class:`~qjax.recipes.GemmSpec` (``T`` the GEMM's Hadamard transform, the same on
both operands along the contraction axis, ``Q`` the operand's quantizer). Operands are upcast to
the recipe's accumulation dtype before being transformed and quantized; every GEMM accumulates in
that dtype, which is what a low-precision GEMM with high-precision accumulation computes.

The GEMMs multiply in the narrowest dtype that holds their operands exactly, so they run on tensor
cores rather than as float32 GEMMs (``Format.bf16_gemm``): an operand the GEMM does not quantize
keeps its own dtype; quantized values that are bfloat16 numbers (MX formats) are multiplied in
bfloat16; for per-tensor, per-channel and two-level (NVFP4) formats the elements times their block
scales are multiplied in bfloat16 and the float scale that is constant along the contraction axis
(and the 1/prescale of a pre-scaled quantizer) multiplies the GEMM's output. The products are
exact either way, so only the order of the float32 additions (and, with an outer scale, one
rounding of each product's scale) differs from multiplying the dequantized float32 values. Other
quantized operands (float scales along the contraction axis) stay float32 (``Precision.HIGHEST``
unless ``precision`` is given).

The forward estimator's gradient rule is applied as the VJP of ``x -> Q(T x)`` (taken with
``jax.vjp`` in the forward pass) to the dgrad result rotated by ``T``; for the straight-through
estimator this is the identity and is skipped.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Key

from qjax import estimators as E
from qjax.config import kernels_enabled, single_gpu
from qjax import formats as F
from qjax.quantize import (_fused_kernel_applies, _split_outer_scale, fake_quant,
                           prescaled_fake_quant, round_to_element, stochastic_bits)
from qjax import recipes as R
from qjax import transforms as T

GEMMS = ("forward", "dgrad", "wgrad")
# Key layout: jax.random.split(key, 9) in this order (documented; tests rebuild references).
KEY_SLOTS = tuple(f"{g}.{slot}" for g in GEMMS for slot in ("lhs", "rhs", "signs"))


def gemm_keys(key: Key[Array, ""]) -> dict[str, Key[Array, ""]]:
    """The independent keys of the six operands and three transforms of one op call.

    ``jax.random.split(key, 9)`` in the order of :data:`KEY_SLOTS` (``"forward.lhs"``,
    ``"forward.rhs"``, ``"forward.signs"``, ``"dgrad.lhs"``, ..., ``"wgrad.signs"``).

    Example:
      >>> sorted(gemm_keys(jax.random.key(0)))[:2]
      ['dgrad.lhs', 'dgrad.rhs']
    """
    return dict(zip(KEY_SLOTS, jax.random.split(key, len(KEY_SLOTS))))


# --------------------------------------------------------------------------- one operand


def _prescaled_fake_quant(x, fmt: F.Format, axis, prescale, rounding, key, scale_mode):
    """Tseng et al.'s pre-scaled quantizer: scales from ``x``, elements ``round(prescale * x /
    scale)``, value ``elements * scale / prescale``. Returns ``(elements * scale, 1 / prescale)``
    (float32 array, numpy float32): the value is their product. E8M0 formats go through
    ``qjax.quantize.prescaled_fake_quant`` (the fused kernel on a GPU)."""
    if fmt.scaling is not None and fmt.scaling.scale.power_of_two:
        out_dtype = jnp.bfloat16 if fmt.bf16_gemm == "dequantized" else jnp.float32
        values = prescaled_fake_quant(x, fmt, prescale, axis=axis, rounding=rounding, key=key,
                                      scale_mode=scale_mode, out_dtype=out_dtype)
        return values, np.float32(1 / prescale)
    scale = E.element_scale(x, fmt, axis=axis, scale_mode=scale_mode)
    y = x * np.float32(prescale) / scale
    bits = None if rounding == "nearest" else stochastic_bits(key, x.shape)
    elements = round_to_element(y, fmt.element, rounding=rounding, random_bits=bits)
    return elements * scale, np.float32(1 / prescale)


def quantize_operand(x: Float[Array, "..."], spec: R.OperandSpec, *, axis: int,
                     key: Key[Array, ""] | None = None,
                     differentiable: bool = False) -> Float[Array, "..."]:
    """Quantizes one GEMM operand as ``spec`` says, blocks along ``axis`` (its contraction axis).

    Args:
      x: the operand (already upcast and transformed).
      spec: the operand's :class:`~qjax.recipes.OperandSpec`.
      axis: the contraction axis of ``x`` in this GEMM.
      key: the operand's key (SR, random estimators).
      differentiable: use the spec's estimator (forward GEMM) rather than the plain quantizer.

    Returns:
      The fake-quantized operand (same shape and dtype); ``x`` itself when ``spec.format`` is None.

    Example:
      >>> quantize_operand(jnp.array([[0.3, 1.0, 2.6, 5.0]]), R.OperandSpec("mxfp4"), axis=-1)
      Array([[0.5, 1. , 3. , 4. ]], dtype=float32)
    """
    if not spec.quantizes:
        return x
    fmt = spec.fmt
    key = key if spec.needs_key else None
    if spec.prescale != 1:
        scaled, reciprocal = _prescaled_fake_quant(x, fmt, axis, spec.prescale, spec.rounding, key,
                                                   spec.scale_mode)
        return scaled * reciprocal
    if differentiable and spec.estimator != "ste":
        options = dict(spec.estimator_options)
        if spec.rounding != "nearest":
            options["rounding"] = spec.rounding
        if spec.scale_mode != "floor":
            options["scale_mode"] = spec.scale_mode
        return E.get(spec.estimator)(x, fmt, axis=axis, key=key, **options)
    return fake_quant(x, fmt, axis=axis, rounding=spec.rounding, key=key,
                        scale_mode=spec.scale_mode)


def _gemm_operand(x, spec: R.OperandSpec, *, axis: int, key):
    """One quantized operand of a GEMM as ``(values, outer)``: ``values * outer`` is
    ``quantize_operand(x, spec)`` (up to one float32 rounding where the outer scale is split
    off); ``values`` is bfloat16 where that holds it exactly; ``outer`` is None, a numpy scalar,
    or float32 of x's rank with size 1 along ``axis``."""
    fmt = spec.fmt
    key = key if spec.needs_key else None
    if spec.prescale != 1:  # the prescaled values keep any tensor scale: narrowed as dequantized
        values, outer = _prescaled_fake_quant(x, fmt, axis, spec.prescale, spec.rounding, key,
                                              spec.scale_mode)
        return _narrow(values, spec), outer
    if fmt.bf16_gemm == "outer_scale":
        split = _split_by_kernel if _split_kernel_applies(x, fmt, axis) else _split_narrowed
        return split(x, fmt, axis % x.ndim, spec.rounding, key, spec.scale_mode)
    values = fake_quant(x, fmt, axis=axis, rounding=spec.rounding, key=key,
                        scale_mode=spec.scale_mode)
    return _narrow(values, spec), None


def _split_kernel_applies(x, fmt: F.Format, axis) -> bool:
    """Whether a two-level operand (NVFP4) is quantized and split by the fused fake-quant kernel
    (``qjax.pallas.fake_quant``, bit-identical to XLA's on the GPU): where ``qjax.fake_quant``
    would run that kernel."""
    return (fmt.scaling.tensor_scale and kernels_enabled()
            and _fused_kernel_applies(x, fmt, axis, any_axis=True))


def _split_narrowed(x, fmt: F.Format, axis, rounding, key, scale_mode):
    """``_split_outer_scale`` with the values narrowed to bfloat16 (exact for ``outer_scale``
    formats)."""
    values, outer = _split_outer_scale(x, fmt, axis, rounding, key, scale_mode)
    return values.astype(jnp.bfloat16), outer


def _split_by_kernel(x, fmt: F.Format, axis, rounding, key, scale_mode):
    """:func:`_split_narrowed` by the fused kernel on CUDA, by XLA elsewhere."""
    from qjax.pallas import fake_quant as kernel  # lazy: qjax.pallas builds on the quantizers

    # Chosen when lowering for the platform the data is on (as in qjax.quantize).
    return lax.platform_dependent(
        x, key,
        cuda=lambda x, key: kernel.fake_quant_pallas(
            x, fmt, axis=axis, rounding=rounding, key=key, scale_mode=scale_mode,
            out_dtype=jnp.bfloat16, split_tensor_scale=True),
        default=lambda x, key: _split_narrowed(x, fmt, axis, rounding, key, scale_mode))


def _narrow(values, spec: R.OperandSpec):
    """Dequantized ``values`` of ``spec``'s format in bfloat16 when that holds them exactly."""
    return values.astype(jnp.bfloat16) if spec.fmt.bf16_gemm == "dequantized" else values


# --------------------------------------------------------------------------- one GEMM


def _signs(gemm: R.GemmSpec, length: int, key):
    if gemm.transform != "random_hadamard":
        return None
    return T.random_signs(key, gemm.hadamard_block_size or length)


def _rotate(x, gemm: R.GemmSpec, axis, signs, inverse=False, out_dtype=None):
    """The GEMM's transform of ``x`` (``x`` itself without one) in ``out_dtype`` (default
    ``x``'s). A bfloat16/float16 ``x`` with float32 ``out_dtype`` is one GEMM in ``x``'s dtype
    accumulating in float32 (``qjax.hadamard``'s ``out_dtype``): exact products, on the tensor
    cores; any other ``x`` is cast to ``out_dtype`` and rotated in it."""
    narrow = x.dtype in (jnp.bfloat16, jnp.float16) and out_dtype == jnp.float32
    if out_dtype is not None and (gemm.transform is None or not narrow):
        x = x.astype(out_dtype)
    if gemm.transform is None:
        return x
    fn = T.inverse_hadamard if inverse else T.hadamard
    return fn(x, axis=axis, block_size=gemm.hadamard_block_size, signs=signs, out_dtype=out_dtype)


def _output_scale(outer, axis, free_axis):
    """An operand's outer scale (size 1 along its contraction ``axis``) laid out along the
    output's ``free_axis``."""
    return outer if np.ndim(outer) == 0 else jnp.expand_dims(jnp.squeeze(outer, axis), free_axis)


def _contract(a, b, a_axis, b_axis, precision, dtype, a_outer=None, b_outer=None):
    """Batched contraction of ``a`` (B, ., .) and ``b`` (B, ., .) over ``a_axis``/``b_axis``,
    accumulated in ``dtype``, times the operands' outer scales (see :func:`_gemm_operand`)."""
    if a.dtype != b.dtype:
        common = jnp.promote_types(a.dtype, b.dtype)
        a, b = a.astype(common), b.astype(common)
    out = lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((0,), (0,))),
                          precision=precision, preferred_element_type=dtype)
    if a_outer is not None:  # out is (B, a's free axis, b's free axis)
        out = out * _output_scale(a_outer, a_axis, 2)
    if b_outer is not None:
        out = out * _output_scale(b_outer, b_axis, 1)
    return out


def _operand(gemm: R.GemmSpec, side: str, v, axis, signs, key, dtype):
    """``v`` transformed and quantized for one GEMM as ``(values, outer)``; an operand the GEMM
    neither transforms nor quantizes is returned as it is, in its own dtype."""
    spec = getattr(gemm, side)
    if not spec.quantizes and gemm.transform is None:
        return v, None
    narrow = v.dtype in (jnp.bfloat16, jnp.float16) and dtype == jnp.float32
    if gemm.transform is None:
        if narrow and spec.fmt.bf16_gemm in ("dequantized", "outer_scale"):
            # The quantizers compute in float32 and these values are bfloat16 numbers anyway:
            # the upcast would only be written to memory and read back.
            return _gemm_operand(v, spec, axis=axis, key=key)
        v = v.astype(dtype)
    elif narrow and _rotate_quantize_kernel_applies(v, gemm, spec, axis):
        return _rotated_quantized(v, gemm, spec, axis, signs, key)
    else:
        v = _rotate(v, gemm, axis, signs, out_dtype=dtype)
    return _gemm_operand(v, spec, axis=axis, key=key) if spec.quantizes else (v, None)


def _rotate_quantize_kernel_applies(v, gemm: R.GemmSpec, spec: R.OperandSpec, axis) -> bool:
    """Whether the rotation and quantization of a bfloat16 operand run as one Pallas kernel
    (``qjax.pallas.hadamard_quant``): on a single GPU, for float formats whose values the GEMM
    multiplies in bfloat16 (MX formats; two-level formats such as NVFP4, whose tensor scale
    multiplies the output), RTN or SR, a Hadamard block the kernel handles. Sharded operands
    would need a ``shard_map`` around it."""
    if not (spec.quantizes and kernels_enabled() and single_gpu()):
        return False
    from qjax.pallas import hadamard_quant  # lazy: qjax.pallas builds on the quantizers

    fmt = spec.fmt
    h = gemm.hadamard_block_size or v.shape[axis]
    in_bf16 = fmt.bf16_gemm == "dequantized" or (
        fmt.bf16_gemm == "outer_scale" and fmt.scaling.tensor_scale and spec.prescale == 1)
    return (in_bf16 and spec.rounding in ("nearest", "stochastic")
            and hadamard_quant.supports(fmt, h) and v.size > 0 and v.shape[axis] % h == 0)


def _rotated_quantized(v, gemm: R.GemmSpec, spec: R.OperandSpec, axis, signs, key):
    """``_gemm_operand(hadamard(v), spec)`` by the fused kernel on CUDA, by XLA elsewhere."""
    from qjax.pallas import hadamard_quant

    split = spec.fmt.bf16_gemm == "outer_scale"
    options = dict(fmt=spec.fmt, hadamard_block_size=gemm.hadamard_block_size or v.shape[axis],
                   axis=axis, rounding=spec.rounding, scale_mode=spec.scale_mode,
                   prescale=spec.prescale, split_tensor_scale=split)
    key = key if spec.needs_key else None
    # Chosen when lowering for the platform the data is on (as in qjax.quantize).
    out = lax.platform_dependent(
        v, signs, key,
        cuda=lambda v, signs, key: hadamard_quant.hadamard_fake_quant_pallas(
            v, signs=signs, key=key, **options),
        default=lambda v, signs, key: hadamard_quant.hadamard_fake_quant_reference(
            v, signs=signs, key=key, **options))
    if split:
        return out
    return out, (None if spec.prescale == 1 else np.float32(1 / spec.prescale))


def _backward_gemm(gemm: R.GemmSpec, a, b, a_axis, b_axis, keys, name, precision, dtype):
    """A backward GEMM: transform and quantize both operands along the contraction, multiply."""
    signs = _signs(gemm, a.shape[a_axis], keys.get(f"{name}.signs"))
    a, a_outer = _operand(gemm, "lhs", a, a_axis, signs, keys.get(f"{name}.lhs"), dtype)
    b, b_outer = _operand(gemm, "rhs", b, b_axis, signs, keys.get(f"{name}.rhs"), dtype)
    return _contract(a, b, a_axis, b_axis, precision, dtype, a_outer, b_outer)


# --------------------------------------------------------------------------- the custom VJP


def _keys(key):
    return {} if key is None else gemm_keys(key)


def _identity_gradient(spec: R.OperandSpec) -> bool:
    return not spec.quantizes or spec.estimator in R.IDENTITY_GRADIENT_ESTIMATORS


def _forward_operand(gemm: R.GemmSpec, side: str, v, axis: int, signs, key, dtype):
    """The forward GEMM's operand as ``(values, outer, vjp)``; ``vjp`` is the estimator's rule
    (None for an identity gradient), taken on the rotated float32 operand (the rotation's own
    transpose, its inverse, is applied in :func:`_backward`)."""
    spec = getattr(gemm, side)
    if _identity_gradient(spec):
        return (*_operand(gemm, side, v, axis, signs, key, dtype), None)
    fn = lambda u: quantize_operand(u, spec, axis=axis, key=key, differentiable=True)
    values, vjp = jax.vjp(fn, _rotate(v, gemm, axis, signs, out_dtype=dtype))
    return _narrow(values, spec), None, vjp


def _saved_quantized(values, outer, gemm: R.GemmSpec, axis, signs, dtype):
    """A forward-quantized operand as the backward GEMMs re-read it (dequantized, un-rotated)."""
    if gemm.transform is None and outer is None:
        return values
    dequantized = values if outer is None else values.astype(dtype) * outer
    return _rotate(dequantized, gemm, axis, signs, inverse=True, out_dtype=dtype)


def _forward(recipe, precision, out_dtype, x, w, key):
    acc = jnp.dtype(recipe.accumulation_dtype)
    keys = _keys(key)
    gemm = recipe.forward
    signs = _signs(gemm, x.shape[-1], keys.get("forward.signs"))
    xq, x_outer, x_vjp = _forward_operand(gemm, "lhs", x, -1, signs, keys.get("forward.lhs"), acc)
    wq, w_outer, w_vjp = _forward_operand(gemm, "rhs", w, -2, signs, keys.get("forward.rhs"), acc)
    y = _contract(xq, wq, 2, 1, precision, acc, x_outer, w_outer).astype(out_dtype)
    if recipe.save_for_backward == "quantized":
        x_saved = _saved_quantized(xq, x_outer, gemm, -1, signs, acc)
        w_saved = _saved_quantized(wq, w_outer, gemm, -2, signs, acc)
    else:
        x_saved, w_saved = x, w
    return y, (x_saved, w_saved, x_vjp, w_vjp, signs, key)


def _backward(recipe, precision, in_dtypes, res, dy):
    x_saved, w_saved, x_vjp, w_vjp, signs, key = res
    x_dtype, w_dtype = in_dtypes
    acc = jnp.dtype(recipe.accumulation_dtype)
    keys = _keys(key)
    dx = _backward_gemm(recipe.dgrad, dy, w_saved, 2, 2, keys, "dgrad", precision, acc)
    dw = _backward_gemm(recipe.wgrad, x_saved, dy, 1, 1, keys, "wgrad", precision, acc)
    if x_vjp is not None:  # the estimator's rule lives in the rotated domain of the forward GEMM
        (dx,) = x_vjp(_rotate(dx, recipe.forward, -1, signs))
        dx = _rotate(dx, recipe.forward, -1, signs, inverse=True)
    if w_vjp is not None:
        (dw,) = w_vjp(_rotate(dw, recipe.forward, -2, signs))
        dw = _rotate(dw, recipe.forward, -2, signs, inverse=True)
    return dx.astype(x_dtype), dw.astype(w_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _gemm(recipe, precision, out_dtype, in_dtypes, x, w, key):
    return _forward(recipe, precision, out_dtype, x, w, key)[0]


def _gemm_fwd(recipe, precision, out_dtype, in_dtypes, x, w, key):
    return _forward(recipe, precision, out_dtype, x, w, key)


def _gemm_bwd(recipe, precision, out_dtype, in_dtypes, res, dy):
    dx, dw = _backward(recipe, precision, in_dtypes, res, dy)
    return dx, dw, None


_gemm.defvjp(_gemm_fwd, _gemm_bwd)


# --------------------------------------------------------------------------- canonicalisation


def _canonical(lhs, rhs, dimension_numbers):
    """Transposes/reshapes to x (B, M, K), w (B, K, N) and returns the output shape."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs_contract, rhs_contract = tuple(lhs_contract), tuple(rhs_contract)
    lhs_batch, rhs_batch = tuple(lhs_batch), tuple(rhs_batch)
    if len(lhs_contract) != len(rhs_contract) or len(lhs_batch) != len(rhs_batch):
        raise ValueError(f"dimension_numbers {dimension_numbers}: lhs and rhs need as many "
                         "contracting and as many batch dimensions.")
    for name, operand, dims in (("lhs", lhs, lhs_contract + lhs_batch),
                                ("rhs", rhs, rhs_contract + rhs_batch)):
        if len(set(dims)) != len(dims) or any(not 0 <= d < operand.ndim for d in dims):
            raise ValueError(f"dimension_numbers {dimension_numbers}: {name} dimensions must be "
                             f"distinct and in [0, {operand.ndim}).")
    for a, b in zip(lhs_contract + lhs_batch, rhs_contract + rhs_batch):
        if lhs.shape[a] != rhs.shape[b]:
            raise ValueError(f"dimension_numbers {dimension_numbers}: lhs axis {a} (size "
                             f"{lhs.shape[a]}) and rhs axis {b} (size {rhs.shape[b]}) differ.")
    lhs_free = tuple(d for d in range(lhs.ndim) if d not in lhs_contract + lhs_batch)
    rhs_free = tuple(d for d in range(rhs.ndim) if d not in rhs_contract + rhs_batch)
    size = lambda a, dims: math.prod(a.shape[d] for d in dims)  # noqa: E731
    batch, m, k, n = (size(lhs, lhs_batch), size(lhs, lhs_free), size(lhs, lhs_contract),
                      size(rhs, rhs_free))
    x = jnp.transpose(lhs, lhs_batch + lhs_free + lhs_contract).reshape(batch, m, k)
    w = jnp.transpose(rhs, rhs_batch + rhs_contract + rhs_free).reshape(batch, k, n)
    out_shape = (tuple(lhs.shape[d] for d in lhs_batch) + tuple(lhs.shape[d] for d in lhs_free)
                 + tuple(rhs.shape[d] for d in rhs_free))
    return x, w, out_shape


def _check_transform_blocks(recipe: R.Recipe, *, m: int, k: int, n: int):
    """Each Hadamard block must tile its GEMM's contraction length; say so before tracing."""
    for name, length, axis_name in (("forward", k, "K (contracting)"), ("dgrad", n, "N (output)"),
                                    ("wgrad", m, "M (tokens: batch-free lhs)")):
        gemm = recipe.gemms[name]
        if gemm.transform is None:
            continue
        block = gemm.hadamard_block_size
        ok = (length >= 2 and length & (length - 1) == 0) if block is None else length % block == 0
        if not ok:
            need = "a power of two" if block is None else f"a multiple of {block}"
            raise ValueError(
                f"recipe {recipe.name!r}: the {name} GEMM applies a {gemm.transform} transform "
                f"along its contraction axis {axis_name}, whose length {length} must be {need} "
                f"(hadamard_block_size={block}). Pad that dimension or replace the recipe's "
                f"{name}.hadamard_block_size.")


def dot_general(lhs: Float[Array, "..."], rhs: Float[Array, "..."], dimension_numbers,
                precision=None, preferred_element_type=None, *,
                recipe: R.Recipe | str, key: Key[Array, ""] | None = None,
                out_sharding=None) -> Float[Array, "..."]:
    """``jax.lax.dot_general`` with its three training GEMMs quantized as ``recipe`` says.

    Same arguments as ``jax.lax.dot_general`` plus ``recipe`` and ``key``, so it can be injected as
    Flax's ``dot_general`` (``functools.partial(qjax.ops.dot_general, recipe="mxfp8")``). The lhs
    plays X (activations) and the rhs W (weights) of the recipe; batch dimensions and several
    contracting dimensions are allowed (contracting dimensions are flattened into one K, in order).

    Args:
      lhs: the activations X.
      rhs: the weights W.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
      precision: as for ``lax.dot_general``; quantized GEMMs default to ``Precision.HIGHEST`` so
        the dequantized values are multiplied exactly (no TF32 on GPUs).
      preferred_element_type: output dtype; default: the promoted dtype of ``lhs`` and ``rhs``.
      recipe: a :class:`~qjax.recipes.Recipe` or a name from ``qjax.recipes.names()``.
      key: a PRNG key, required when ``recipe.needs_key`` (stochastic rounding, random Hadamard);
        split per GEMM and operand by :func:`gemm_keys`. Pass a fresh key every step.
      out_sharding: passed through to ``lax.dot_general`` by the unquantized ``bf16`` recipe only.

    Returns:
      The product, laid out as ``lax.dot_general``'s (batch, lhs free, rhs free).

    Raises:
      ValueError: unknown recipe, a missing key, inconsistent ``dimension_numbers``.

    Example:
      >>> x, w = jnp.ones((4, 64)), jnp.ones((64, 8))
      >>> dot_general(x, w, (((1,), (0,)), ((), ())), recipe="mxfp8")[0, 0]
      Array(64., dtype=float32)
    """
    recipe = R.get(recipe)
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    if not recipe.quantizes:
        sharding = {} if out_sharding is None else {"out_sharding": out_sharding}
        return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                               **sharding)
    if out_sharding is not None:
        raise ValueError(f"out_sharding is only supported by unquantized recipes; recipe "
                         f"{recipe.name!r} quantizes. Shard the inputs instead.")
    if recipe.needs_key and key is None:
        raise ValueError(f"recipe {recipe.name!r} draws random numbers (stochastic rounding or a "
                         "random Hadamard transform): pass key=jax.random.key(seed), a fresh one "
                         "per step.")
    for name, a in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"quantized dot_general needs floating-point operands; {name} has "
                            f"dtype {a.dtype}.")
    out_dtype = jnp.dtype(preferred_element_type if preferred_element_type is not None
                          else jnp.result_type(lhs.dtype, rhs.dtype))
    precision = lax.Precision.HIGHEST if precision is None else precision
    x, w, out_shape = _canonical(lhs, rhs, dimension_numbers)
    _check_transform_blocks(recipe, m=x.shape[1], k=x.shape[2], n=w.shape[2])
    key = key if recipe.needs_key else None
    in_dtypes = (x.dtype, w.dtype)
    return _gemm(recipe, precision, out_dtype, in_dtypes, x, w, key).reshape(out_shape)


def matmul(x: Float[Array, "... k"], w: Float[Array, "k n"], *, recipe: R.Recipe | str,
           key: Key[Array, ""] | None = None) -> Float[Array, "... n"]:
    """``x @ w`` for activations ``x (..., K)`` and a weight ``w (K, N)`` under ``recipe``.

    Example:
      >>> matmul(jnp.ones((2, 3, 32)), jnp.ones((32, 4)), recipe="fp8").shape
      (2, 3, 4)
    """
    x = jnp.asarray(x)
    return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), recipe=recipe, key=key)
