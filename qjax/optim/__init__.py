"""Optax transformations for low-precision optimizer state and low-precision weights.

* :func:`quantize_state` -- store any optax state's large param-shaped leaves blockwise in 8-bit
  (dynamic code), FP8 (E4M3, COAT range expansion) or 4 bits.
* :func:`bf16_params` -- bf16 weights updated with stochastic rounding or Kahan summation.
* :func:`adamw` -- both in one call: ``adamw(lr, state_fmt="int8", params="bf16_sr")``.
* :func:`state_bytes`, :func:`bytes_per_param` -- what the state really occupies.

See ``docs/optimizers.md`` for the formats, the choices and measured results.
"""

from qjax.optim.adamw import adamw
from qjax.optim.bytes import bytes_per_param, param_count, state_bytes
from qjax.optim.codes import dynamic_code, square_code
from qjax.optim.params import Bf16ParamsState, bf16_params, upcast_inner
from qjax.optim.state import (
    QuantizedOptState,
    QuantizedTensor,
    dequantize_tensor,
    quantize_state,
    quantize_tensor,
)

__all__ = [
    "Bf16ParamsState",
    "QuantizedOptState",
    "QuantizedTensor",
    "adamw",
    "bf16_params",
    "bytes_per_param",
    "dequantize_tensor",
    "dynamic_code",
    "square_code",
    "param_count",
    "quantize_state",
    "quantize_tensor",
    "state_bytes",
    "upcast_inner",
]
