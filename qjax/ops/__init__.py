"""Quantized ops: ``dot_general``, ``einsum``, ``conv_general_dilated`` under a training recipe.

Each op is one ``jax.custom_vjp`` that quantizes its forward GEMM and its two backward GEMMs
(dgrad, wgrad) independently, as the :class:`~qjax.recipes.Recipe` says.
"""

from qjax.ops.conv import conv_general_dilated
from qjax.ops.dot_general import KEY_SLOTS, dot_general, gemm_keys, matmul, quantize_operand
from qjax.ops.einsum import einsum

__all__ = [
    "KEY_SLOTS",
    "conv_general_dilated",
    "dot_general",
    "einsum",
    "gemm_keys",
    "matmul",
    "quantize_operand",
]
