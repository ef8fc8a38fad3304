"""Pallas kernels for qjax (GPU, through Triton; every kernel also runs in the Pallas interpreter).

``fake_quant_pallas``: ``qjax.fake_quant`` of block-scaled formats (MX, int4, NVFP4) in one fused
pass, bit-identical to it.
"""

from qjax.pallas.fake_quant import fake_quant_pallas, supports

__all__ = ["fake_quant_pallas", "supports"]
