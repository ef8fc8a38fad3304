"""``qjax.optim.adamw``: optax's AdamW with quantized moments and/or bf16 weights in one call."""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax.numpy as jnp
import optax

from qjax.optim.params import bf16_params, upcast_inner
from qjax.optim.state import STATE_FORMATS, quantize_state

ParamsOption = Literal["bf16", "bf16_sr", "bf16_kahan"]
PARAMS_OPTIONS: tuple[str, ...] = ("bf16", "bf16_sr", "bf16_kahan")
_MODE = {"bf16": "nearest", "bf16_sr": "sr", "bf16_kahan": "kahan"}


def adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 1e-4, *,
          mask: Any | Callable[[optax.Params], Any] | None = None,
          state_fmt: Literal["int8", "fp8", "int4"] | None = None,
          params: ParamsOption | None = None,
          block_size: int | None = None, min_size: int = 4096,
          state_rounding: Literal["stochastic", "nearest"] = "stochastic", seed: int = 0,
          prng_impl: str | None = None) -> optax.GradientTransformationExtraArgs:
    """AdamW (``optax.adamw``'s algorithm) with low-precision moments and/or weights.

    The chain is ``scale_by_adam -> add_decayed_weights -> scale_by_learning_rate``, exactly as in
    ``optax.adamw``; ``state_fmt`` wraps the Adam moments in :func:`~qjax.optim.quantize_state`,
    and ``params`` appends :func:`~qjax.optim.bf16_params`. With ``state_fmt=None, params=None``
    it computes the same updates as ``optax.adamw``.

    Args:
      learning_rate: a float or an optax schedule.
      b1, b2, eps, weight_decay: as in ``optax.adamw``.
      mask: weight-decay mask, as in ``optax.adamw``.
      state_fmt: ``None`` (float32 moments), ``"int8"`` (2.04 bytes/param for both moments),
        ``"fp8"`` (2.04) or ``"int4"`` (1.08).
      params: ``None`` (weights in whatever dtype they are; optax semantics), ``"bf16_sr"``
        (bf16 weights, stochastic rounding, no master copy), ``"bf16_kahan"`` (bf16 weights with a
        bf16 Kahan buffer), ``"bf16"`` (bf16 weights, round-to-nearest: the baseline that stalls).
        With any bf16 option the Adam math and moments run in float32 from the bf16 weights.
      block_size: quantization block along the last axis (``None``: 256, or 128 for int4).
      min_size: state leaves with fewer elements stay float32.
      state_rounding: rounding of the quantized moments, ``"stochastic"`` (default) or
        ``"nearest"``; see :func:`~qjax.optim.quantize_state`.
      seed: seed of the stochastic-rounding keys (weights; the state's key uses ``seed + 1``).
      prng_impl: PRNG implementation for stochastic rounding (``"unsafe_rbg"`` is fastest on GPU).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: unknown ``state_fmt`` or ``params``.

    With ``optax.inject_hyperparams``: give ``static_args=("block_size", "min_size", "seed")`` if
    you pass them, and ``hyperparam_dtype=jnp.float32`` with bf16 weights (else ``b2 = 0.999`` is
    rounded to bf16, 0.996).

    Example:
      >>> import jax, optax
      >>> opt = adamw(1e-3, state_fmt="int8", params="bf16_sr")
      >>> params = {"w": jnp.ones((64, 256), jnp.bfloat16)}
      >>> state = opt.init(params)
      >>> updates, state = opt.update({"w": jnp.ones((64, 256))}, state, params)
      >>> optax.apply_updates(params, updates)["w"].dtype
      dtype(bfloat16)
    """
    if state_fmt is not None and state_fmt not in STATE_FORMATS:
        raise ValueError(f"unknown state_fmt {state_fmt!r}; valid: None, "
                         f"{', '.join(map(repr, STATE_FORMATS))}.")
    if params is not None and params not in PARAMS_OPTIONS:
        raise ValueError(f"unknown params option {params!r}; valid: None, "
                         f"{', '.join(map(repr, PARAMS_OPTIONS))}.")
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    if state_fmt is not None:
        adam = quantize_state(adam, state_fmt, block_size=block_size, min_size=min_size,
                              rounding=state_rounding, seed=seed + 1, prng_impl=prng_impl)
    links = [adam, optax.add_decayed_weights(weight_decay, mask),
             optax.scale_by_learning_rate(learning_rate)]
    if params is not None:
        links[0] = upcast_inner(adam, jnp.float32)
        links.append(bf16_params(_MODE[params], seed=seed, prng_impl=prng_impl))
    return optax.chain(*links)
