"""Flax NNX layers with quantized matmuls (same parameters as ``flax.nnx``'s). See
docs/layers.md; ``qjax.quantize_model`` handles NNX models too."""

from qjax.nnx.layers import (
    Conv,
    DelayedScalingDotGeneral,
    Einsum,
    Linear,
    LinearGeneral,
    QuantConvOp,
    QuantDotGeneral,
    QuantEinsumOp,
    QuantScaling,
    QuantStats,
)
from qjax.nnx.rules import layer_paths

__all__ = ["Conv", "DelayedScalingDotGeneral", "Einsum", "Linear", "LinearGeneral", "QuantConvOp",
           "QuantDotGeneral", "QuantEinsumOp", "QuantScaling", "QuantStats", "layer_paths"]
