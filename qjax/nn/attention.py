"""Attention with both batched matmuls (QKᵀ and PV) quantized by a recipe.

Flax's attention already takes injectable einsums (``qk_attn_weights_einsum`` /
``attn_weights_value_einsum``); these helpers fill them with :func:`qjax.ops.einsum`, so the
softmax, masking and dropout stay exactly Flax's.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
from jaxtyping import Array, Key

from qjax.nn import common as C
from qjax.nn.common import RecipeLike
from qjax.nn.layers import QuantEinsum


def dot_product_attention(query: Array, key: Array, value: Array, bias: Array | None = None,
                          mask: Array | None = None, *, recipe: RecipeLike,
                          quant_key: Key[Array, ""] | None = None, **flax_kwargs: Any) -> Array:
    """``flax.linen.dot_product_attention`` with QKᵀ and PV run through ``qjax.ops.einsum``.

    Args:
      query, key, value, bias, mask: as ``flax.linen.dot_product_attention``
        (``[batch..., length, heads, depth]``).
      recipe: a recipe name or ``Recipe``.
      quant_key: PRNG key for stochastic recipes (split between the two matmuls).
      **flax_kwargs: the other arguments of ``flax.linen.dot_product_attention`` (dropout,
        ``dtype``, ``force_fp32_for_softmax``, ``module`` ...; not ``precision``).

    Returns:
      ``[batch..., q_length, heads, v_depth]``.

    Example:
      >>> out = dot_product_attention(q, k, v, recipe="mxfp8")
    """
    recipe = C.resolve_recipe(recipe)
    if C.needs_key(recipe) and quant_key is None:
        raise C.missing_stream_error(recipe, "pass quant_key=")
    qk_key, pv_key = jax.random.split(quant_key) if quant_key is not None else (None, None)
    ops = C._ops()
    return nn.dot_product_attention(
        query, key, value, bias, mask,
        qk_attn_weights_einsum=functools.partial(ops.einsum, recipe=recipe, key=qk_key),
        attn_weights_value_einsum=functools.partial(ops.einsum, recipe=recipe, key=pv_key),
        **flax_kwargs)


def attention_einsums(recipe: RecipeLike, *, collect_stats: bool = False) -> dict[str, Any]:
    """Keyword arguments that make ``flax.linen.MultiHeadDotProductAttention`` quantize QKᵀ and
    PV with ``recipe`` (its projections are separate Dense layers: use ``quantize_model`` or
    ``qjax.nn.DenseGeneral`` for those). Random numbers come from the ``"quant"`` stream.

    Example:
      >>> attn = nn.MultiHeadDotProductAttention(4, **attention_einsums("mxfp8"))
    """
    factory = functools.partial(QuantEinsum, C.resolve_recipe(recipe), collect_stats)
    return {"qk_attn_weights_einsum_cls": functools.partial(factory, name="qk_einsum"),
            "attn_weights_value_einsum_cls": functools.partial(factory, name="pv_einsum")}
