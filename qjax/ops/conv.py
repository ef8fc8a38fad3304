"""``conv_general_dilated`` under a training recipe: the convolution's three GEMMs quantized.

A convolution is three GEMMs like a dense layer, with the window folded into them:

* forward ``y = conv(Q(x), Q(w))``: contraction over input features (x blocked along its feature
  axis, w along its input-feature axis);
* dgrad ``dx = conv_vjp_x(Q(dy), Q(w))``: contraction over output features (dy along its feature
  axis, w along its output-feature axis);
* wgrad ``dw = conv_vjp_w(Q(x), Q(dy))``: contraction over the tokens (batch × positions); x and dy
  are blocked along their batch axis.

dgrad and wgrad are the VJPs of ``lax.conv_general_dilated`` evaluated at the quantized operands, so
any strides, padding and dilation work. Each GEMM's Hadamard transform rotates both operands along
that GEMM's contraction axis (feature, output feature, batch), which leaves the result unchanged.
``feature_group_count`` and ``batch_group_count`` must be 1 for quantized recipes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Key

from qjax import recipes as R
from qjax.ops.dot_general import (_identity_gradient, _rotate, _signs, gemm_keys,
                                  quantize_operand)


def _conv(params, x, w):
    strides, padding, lhs_dil, rhs_dil, dn, precision, acc = params
    return lax.conv_general_dilated(x, w, strides, padding, lhs_dil, rhs_dil, dn,
                                    precision=precision, preferred_element_type=acc)


def _quantize_pair(gemm: R.GemmSpec, a, b, a_axis, b_axis, keys, name):
    signs = _signs(gemm, a.shape[a_axis], keys.get(f"{name}.signs"))
    a = quantize_operand(_rotate(a, gemm, a_axis, signs), gemm.lhs, axis=a_axis,
                         key=keys.get(f"{name}.lhs"))
    b = quantize_operand(_rotate(b, gemm, b_axis, signs), gemm.rhs, axis=b_axis,
                         key=keys.get(f"{name}.rhs"))
    return a, b


def _axes(dn: lax.ConvDimensionNumbers):
    lhs_spec, rhs_spec, out_spec = dn
    return {"x_batch": lhs_spec[0], "x_feature": lhs_spec[1], "w_out": rhs_spec[0],
            "w_in": rhs_spec[1], "y_batch": out_spec[0], "y_feature": out_spec[1]}


def _forward(recipe, params, out_dtype, x, w, key):
    acc = jnp.dtype(recipe.accumulation_dtype)
    ax = _axes(params[4])
    keys = {} if key is None else gemm_keys(key)
    gemm = recipe.forward
    signs = _signs(gemm, x.shape[ax["x_feature"]], keys.get("forward.signs"))

    def operand(side, axis):
        return lambda v: quantize_operand(_rotate(v, gemm, axis, signs), getattr(gemm, side),
                                          axis=axis, key=keys.get(f"forward.{side}"),
                                          differentiable=True)

    x32, w32 = x.astype(acc), w.astype(acc)
    xq, x_vjp = jax.vjp(operand("lhs", ax["x_feature"]), x32)
    wq, w_vjp = jax.vjp(operand("rhs", ax["w_in"]), w32)
    y = _conv(params, xq, wq).astype(out_dtype)
    if recipe.save_for_backward == "quantized":
        x32 = _rotate(xq, gemm, ax["x_feature"], signs, inverse=True)
        w32 = _rotate(wq, gemm, ax["w_in"], signs, inverse=True)
    x_vjp = None if _identity_gradient(gemm.lhs) else x_vjp
    w_vjp = None if _identity_gradient(gemm.rhs) else w_vjp
    return y, (x32, w32, x_vjp, w_vjp, signs, key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _conv_op(recipe, params, out_dtype, in_dtypes, x, w, key):
    return _forward(recipe, params, out_dtype, x, w, key)[0]


def _conv_fwd(recipe, params, out_dtype, in_dtypes, x, w, key):
    return _forward(recipe, params, out_dtype, x, w, key)


def _conv_bwd(recipe, params, out_dtype, in_dtypes, res, dy):
    x32, w32, x_vjp, w_vjp, signs, key = res
    ax = _axes(params[4])
    keys = {} if key is None else gemm_keys(key)
    dy = dy.astype(x32.dtype)
    dyq, wq = _quantize_pair(recipe.dgrad, dy, w32, ax["y_feature"], ax["w_out"], keys, "dgrad")
    dx = jax.vjp(lambda a: _conv(params, a, wq), x32)[1](dyq)[0]
    xq, dyq = _quantize_pair(recipe.wgrad, x32, dy, ax["x_batch"], ax["y_batch"], keys, "wgrad")
    dw = jax.vjp(lambda b: _conv(params, xq, b), w32)[1](dyq)[0]
    if x_vjp is not None:
        (dx,) = x_vjp(_rotate(dx, recipe.forward, ax["x_feature"], signs))
    if w_vjp is not None:
        (dw,) = w_vjp(_rotate(dw, recipe.forward, ax["w_in"], signs))
    return dx.astype(in_dtypes[0]), dw.astype(in_dtypes[1]), None


_conv_op.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs: Float[Array, "..."], rhs: Float[Array, "..."], window_strides,
                         padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, *,
                         recipe: R.Recipe | str,
                         key: Key[Array, ""] | None = None) -> Float[Array, "..."]:
    """``jax.lax.conv_general_dilated`` with its three GEMMs quantized as ``recipe`` says.

    Same arguments as ``lax.conv_general_dilated`` plus ``recipe`` and ``key`` (so it can be
    injected as Flax's ``conv_general_dilated``). ``lhs`` plays X, ``rhs`` (the kernel) W.

    Args:
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type: as for
        ``lax.conv_general_dilated`` (group counts must be 1 when the recipe quantizes).
      recipe: a :class:`~qjax.recipes.Recipe` or a recipe name.
      key: PRNG key, required when ``recipe.needs_key``.

    Returns:
      The convolution.

    Example:
      >>> x, k = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 16))
      >>> conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      ...                      recipe="mxfp8").shape
      (2, 8, 8, 16)
    """
    recipe = R.get(recipe)
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    if not recipe.quantizes:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        batch_group_count, precision, preferred_element_type)
    if feature_group_count != 1 or batch_group_count != 1:
        raise ValueError("quantized conv_general_dilated supports feature_group_count=1 and "
                         f"batch_group_count=1 only; got {feature_group_count} and "
                         f"{batch_group_count}. Use recipe='bf16' for grouped convolutions.")
    if recipe.needs_key and key is None:
        raise ValueError(f"recipe {recipe.name!r} draws random numbers (stochastic rounding or a "
                         "random Hadamard transform): pass key=jax.random.key(seed), a fresh one "
                         "per step.")
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    n_spatial = lhs.ndim - 2
    if isinstance(padding, str):  # resolved here as lax does: on the dilated kernel's extent
        if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
            raise ValueError("pass explicit padding with lhs_dilation (as lax requires).")
        dilation = rhs_dilation or (1,) * n_spatial
        extent = [(rhs.shape[d] - 1) * r + 1 for d, r in zip(dn.rhs_spec[2:], dilation)]
        padding = tuple(lax.padtype_to_pads([lhs.shape[d] for d in dn.lhs_spec[2:]], extent,
                                            window_strides, padding))
    as_tuple = lambda v: None if v is None else tuple(v)  # noqa: E731
    params = (tuple(window_strides), tuple(tuple(p) for p in padding),
              as_tuple(lhs_dilation) or (1,) * n_spatial,
              as_tuple(rhs_dilation) or (1,) * n_spatial, dn,
              lax.Precision.HIGHEST if precision is None else precision,
              jnp.dtype(recipe.accumulation_dtype))
    out_dtype = jnp.dtype(preferred_element_type if preferred_element_type is not None
                          else jnp.result_type(lhs.dtype, rhs.dtype))
    key = key if recipe.needs_key else None
    return _conv_op(recipe, params, out_dtype, (lhs.dtype, rhs.dtype), lhs, rhs, key)
