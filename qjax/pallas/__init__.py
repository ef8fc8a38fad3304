"""Pallas kernels for qjax (GPU, through Triton; every kernel also runs in the Pallas interpreter).

``fake_quant_pallas``: ``qjax.fake_quant`` of block-scaled formats (MX, int4, NVFP4) in one fused
pass, bit-identical to it; ``quantize_pallas``: ``qjax.quantize`` of the block formats with
float or integer elements, one pass, bit-identical. ``hadamard_fake_quant_pallas``: the
(random) Hadamard rotation of a bf16 GEMM operand and its MX or NVFP4 fake quantization in one
pass (two for NVFP4's tensor scale; the backward operands of the mxfp4 and quartet recipes, nvfp4's
wgrad operands), against ``hadamard_fake_quant_reference``.
``scaled_matmul``: ``C = A·B`` from two block-scaled ``QArray``s
with the scales applied inside the kernel, against ``scaled_matmul_reference``.
``packed_matmul``: ``x @ W`` for small M with W in packed 4-bit storage (``pack_weight``), against
``packed_matmul_reference``. ``adamw_8bit_pallas``: one AdamW step of a tensor with int8 moments
and bf16 weights in one pass (``qjax.optim.adamw(..., fused=None)``, experimental), against
``adamw_8bit_reference``. ``docs/kernels.md`` says which ops dispatch to them and how they
measure.
"""

from qjax.pallas.adamw_8bit import adamw_8bit_pallas, adamw_8bit_reference
from qjax.pallas.fake_quant import fake_quant_pallas, supports
from qjax.pallas.hadamard_quant import hadamard_fake_quant_pallas, hadamard_fake_quant_reference
from qjax.pallas.packed_matmul import (
    PackedWeight,
    pack_weight,
    packed_matmul,
    packed_matmul_reference,
)
from qjax.pallas.quantize import quantize_pallas
from qjax.pallas.quantize import supports as quantize_supports
from qjax.pallas.scaled_matmul import (
    SUPPORTED_FORMATS,
    scaled_matmul,
    scaled_matmul_reference,
)
from qjax.pallas.scaled_matmul import supports as scaled_matmul_supports

__all__ = [
    "SUPPORTED_FORMATS",
    "adamw_8bit_pallas",
    "adamw_8bit_reference",
    "fake_quant_pallas",
    "hadamard_fake_quant_pallas",
    "hadamard_fake_quant_reference",
    "PackedWeight",
    "pack_weight",
    "packed_matmul",
    "packed_matmul_reference",
    "quantize_pallas",
    "quantize_supports",
    "scaled_matmul",
    "scaled_matmul_reference",
    "scaled_matmul_supports",
    "supports",
]
