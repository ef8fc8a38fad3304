"""qjax: low-precision training for JAX and Flax.

The public API is what this module re-exports.
"""

from qjax import config, formats, transforms
from qjax.config import use_kernels
from qjax.formats import Format, get as get_format
from qjax.quantize import (
    PackedQArray,
    QArray,
    dequantize,
    fake_quant,
    pack,
    quantize,
    stochastic_bits,
    unpack,
)
from qjax.transforms import hadamard, inverse_hadamard, random_signs
from qjax import estimators  # noqa: E402  (custom_vjp rules on quantize and transforms)
from qjax import recipes, ops  # noqa: E402  (recipes -> ops: the quantized GEMMs)
from qjax.recipes import Recipe
from qjax import nn, nnx, stats  # noqa: E402  (Flax layers build on ops)
from qjax.nn import dense, quantize_model

from qjax import optim  # noqa: E402  (builds on the quantizers above)

__version__ = "0.1.0"

__all__ = [
    "Format",
    "PackedQArray",
    "QArray",
    "Recipe",
    "config",
    "dense",
    "dequantize",
    "estimators",
    "fake_quant",
    "formats",
    "get_format",
    "hadamard",
    "inverse_hadamard",
    "nn",
    "nnx",
    "ops",
    "optim",
    "pack",
    "quantize",
    "quantize_model",
    "random_signs",
    "recipes",
    "stats",
    "stochastic_bits",
    "transforms",
    "unpack",
    "use_kernels",
]
