"""qjax: low-precision training for JAX and Flax.

The public API is what this module re-exports.
"""

from qjax import formats
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

__version__ = "0.1.0"

__all__ = [
    "Format",
    "PackedQArray",
    "QArray",
    "dequantize",
    "fake_quant",
    "formats",
    "get_format",
    "pack",
    "quantize",
    "unpack",
]
