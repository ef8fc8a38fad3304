"""qjax: low-precision training for JAX and Flax.

The public API is what this module re-exports.
"""

from qjax import formats, transforms
from qjax.formats import Format, get as get_format
from qjax.quantize import (
    PackedQArray,
    QArray,
    dequantize,
    fake_quant,
    pack,
    quantize,
    unpack,
)
from qjax.transforms import hadamard, inverse_hadamard, random_signs

from qjax import optim  # noqa: E402  (builds on the quantizers above)

__version__ = "0.1.0"

__all__ = [
    "Format",
    "PackedQArray",
    "QArray",
    "dequantize",
    "fake_quant",
    "formats",
    "get_format",
    "hadamard",
    "inverse_hadamard",
    "optim",
    "pack",
    "quantize",
    "random_signs",
    "transforms",
    "unpack",
]
