"""``dot_general`` under a per-GEMM training recipe: one ``custom_vjp`` over the three GEMMs.

Any ``dimension_numbers`` are canonicalised outside the custom VJP (plain transposes and reshapes,
which JAX differentiates) to ``x: (B, M, K)`` and ``w: (B, K, N)``; the custom VJP then runs

* forward ``y = Q(T x) · Q(T w)``, blocks along K;
* dgrad ``dx = Q(T dy) · Q(T w)ᵀ``, blocks along N, then the forward estimator's rule for x;
* wgrad ``dw = Q(T x)ᵀ · Q(T dy)``, blocks along M (tokens), then the forward estimator's rule
  for w;

each with its own :class:`~qjax.recipes.GemmSpec` (``T`` the GEMM's Hadamard transform, the same on
both operands along the contraction axis, ``Q`` the operand's quantizer). Operands are upcast to
the recipe's accumulation dtype before being transformed and quantized, and every quantized GEMM
multiplies the dequantized values in that dtype (``Precision.HIGHEST`` unless ``precision`` is
given), which is what a low-precision GEMM with high-precision accumulation computes.

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
from qjax import formats as F
from qjax.quantize import fake_quant, round_to_element
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
    scale)``, value ``elements * scale / prescale`` (float32)."""
    scale = E.element_scale(x, fmt, axis=axis, scale_mode=scale_mode)
    y = x * np.float32(prescale) / scale
    bits = None if rounding == "nearest" else jax.random.bits(key, x.shape, jnp.uint32)
    elements = round_to_element(y, fmt.element, rounding=rounding, random_bits=bits)
    return elements * scale * np.float32(1 / prescale)


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
        return _prescaled_fake_quant(x, fmt, axis, spec.prescale, spec.rounding, key,
                                     spec.scale_mode)
    if differentiable and spec.estimator != "ste":
        options = dict(spec.estimator_options)
        if spec.rounding != "nearest":
            options["rounding"] = spec.rounding
        if spec.scale_mode != "floor":
            options["scale_mode"] = spec.scale_mode
        return E.get(spec.estimator)(x, fmt, axis=axis, key=key, **options)
    return fake_quant(x, fmt, axis=axis, rounding=spec.rounding, key=key,
                        scale_mode=spec.scale_mode)


# --------------------------------------------------------------------------- one GEMM


def _signs(gemm: R.GemmSpec, length: int, key):
    if gemm.transform != "random_hadamard":
        return None
    return T.random_signs(key, gemm.hadamard_block_size or length)


def _rotate(x, gemm: R.GemmSpec, axis, signs, inverse=False):
    if gemm.transform is None:
        return x
    fn = T.inverse_hadamard if inverse else T.hadamard
    return fn(x, axis=axis, block_size=gemm.hadamard_block_size, signs=signs)


def _contract(a, b, a_axis, b_axis, precision, dtype):
    """Batched contraction of ``a`` (B, ., .) and ``b`` (B, ., .) over ``a_axis``/``b_axis``."""
    return lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((0,), (0,))),
                           precision=precision, preferred_element_type=dtype)


def _backward_gemm(gemm: R.GemmSpec, a, b, a_axis, b_axis, keys, name, precision, dtype):
    """A backward GEMM: transform and quantize both operands along the contraction, multiply."""
    signs = _signs(gemm, a.shape[a_axis], keys.get(f"{name}.signs"))
    a = quantize_operand(_rotate(a, gemm, a_axis, signs), gemm.lhs, axis=a_axis,
                         key=keys.get(f"{name}.lhs"))
    b = quantize_operand(_rotate(b, gemm, b_axis, signs), gemm.rhs, axis=b_axis,
                         key=keys.get(f"{name}.rhs"))
    return _contract(a, b, a_axis, b_axis, precision, dtype)


# --------------------------------------------------------------------------- the custom VJP


def _keys(key):
    return {} if key is None else gemm_keys(key)


def _forward_operand_fn(recipe: R.Recipe, side: str, axis: int, signs, key):
    gemm = recipe.forward
    spec = getattr(gemm, side)
    return lambda v: quantize_operand(_rotate(v, gemm, axis, signs), spec, axis=axis, key=key,
                                      differentiable=True)


def _identity_gradient(spec: R.OperandSpec) -> bool:
    return not spec.quantizes or spec.estimator in R.IDENTITY_GRADIENT_ESTIMATORS


def _forward(recipe, precision, out_dtype, x, w, key):
    acc = jnp.dtype(recipe.accumulation_dtype)
    keys = _keys(key)
    x32, w32 = x.astype(acc), w.astype(acc)
    signs = _signs(recipe.forward, x.shape[-1], keys.get("forward.signs"))
    x_fn = _forward_operand_fn(recipe, "lhs", -1, signs, keys.get("forward.lhs"))
    w_fn = _forward_operand_fn(recipe, "rhs", -2, signs, keys.get("forward.rhs"))
    xq, x_vjp = jax.vjp(x_fn, x32)
    wq, w_vjp = jax.vjp(w_fn, w32)
    y = _contract(xq, wq, 2, 1, precision, acc).astype(out_dtype)
    if recipe.save_for_backward == "quantized":
        x_saved = _rotate(xq, recipe.forward, -1, signs, inverse=True)
        w_saved = _rotate(wq, recipe.forward, -2, signs, inverse=True)
    else:
        x_saved, w_saved = x32, w32
    x_vjp = None if _identity_gradient(recipe.forward.lhs) else x_vjp
    w_vjp = None if _identity_gradient(recipe.forward.rhs) else w_vjp
    return y, (x_saved, w_saved, x_vjp, w_vjp, signs, key)


def _backward(recipe, precision, in_dtypes, res, dy):
    x_saved, w_saved, x_vjp, w_vjp, signs, key = res
    x_dtype, w_dtype = in_dtypes
    acc = jnp.dtype(recipe.accumulation_dtype)
    keys = _keys(key)
    dy = dy.astype(acc)
    dx = _backward_gemm(recipe.dgrad, dy, w_saved, 2, 2, keys, "dgrad", precision, acc)
    dw = _backward_gemm(recipe.wgrad, x_saved, dy, 1, 1, keys, "wgrad", precision, acc)
    if x_vjp is not None:  # the estimator's rule lives in the rotated domain of the forward GEMM
        (dx,) = x_vjp(_rotate(dx, recipe.forward, -1, signs))
    if w_vjp is not None:
        (dw,) = w_vjp(_rotate(dw, recipe.forward, -2, signs))
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
