"""Pallas kernels for qjax (GPU, through Triton; every kernel also runs in the Pallas interpreter).

``fake_quant_pallas``: ``qjax.fake_quant`` of block-scaled formats (MX, int4, NVFP4) in one fused
pass, bit-identical to it. ``scaled_matmul``: ``C = A·B`` from two block-scaled ``QArray``s with
the scales applied inside the kernel, against ``scaled_matmul_reference``.
"""

from qjax.pallas.fake_quant import fake_quant_pallas, supports
from qjax.pallas.scaled_matmul import (
    SUPPORTED_FORMATS,
    scaled_matmul,
    scaled_matmul_reference,
)
from qjax.pallas.scaled_matmul import supports as scaled_matmul_supports

__all__ = [
    "SUPPORTED_FORMATS",
    "fake_quant_pallas",
    "scaled_matmul",
    "scaled_matmul_reference",
    "scaled_matmul_supports",
    "supports",
]
