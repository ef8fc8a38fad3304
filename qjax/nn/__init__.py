"""Flax Linen layers with quantized matmuls, and whole-model quantization rules.

``qjax.nn.Dense`` / ``DenseGeneral`` / ``Einsum`` / ``Conv`` / ``Embed`` are their Flax
counterparts with a ``recipe`` attribute (same parameters); ``qjax.dense`` is the one-line
drop-in for ``nn.Dense``; ``quantize_model`` applies recipes to a whole model by path rules.
Collections: ``"quant"`` (RNG stream), ``"qjax_stats"`` (statistics), ``"qjax_scaling"`` (delayed
scaling amax histories). See docs/layers.md.
"""

from qjax.nn.attention import attention_einsums, dot_product_attention
from qjax.nn.common import (
    FIRST,
    LAST,
    QUANT_STREAM,
    SCALING_COLLECTION,
    STATS_COLLECTION,
    DelayedScaling,
    QuantizationReport,
    Rule,
)
from qjax.nn.layers import (
    Conv,
    Dense,
    DenseGeneral,
    Einsum,
    Embed,
    QuantConv,
    QuantDotGeneral,
    QuantEinsum,
    dense,
)
from qjax.nn.rules import (
    QuantizedModel,
    all_but_first_and_last,
    attention_in_bf16,
    layer_paths,
    mlp_only,
    quantize_model,
)

__all__ = [
    "FIRST", "LAST", "QUANT_STREAM", "SCALING_COLLECTION", "STATS_COLLECTION", "Conv", "Dense",
    "DenseGeneral", "DelayedScaling", "Einsum", "Embed", "QuantConv", "QuantDotGeneral",
    "QuantEinsum", "QuantizationReport", "QuantizedModel", "Rule", "all_but_first_and_last",
    "attention_einsums", "attention_in_bf16", "dense", "dot_product_attention", "layer_paths",
    "mlp_only", "quantize_model",
]
