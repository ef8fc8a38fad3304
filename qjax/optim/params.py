"""Low-precision weights: bf16 parameters updated with stochastic rounding or Kahan summation.

Zamirai et al., *Revisiting BFloat16 Training* (2020): with bf16 weights and round-to-nearest,
an update smaller than half a bf16 ulp of the weight (``|u| < 2**-9 |w|``) is lost entirely, so
training stalls once ``lr`` times the normalised update falls below ~0.2% of the weights. Two
remedies, both without an fp32 master copy:

* **stochastic rounding** (``mode="sr"``): ``w <- SR_bf16(w + u)``, rounding up with probability
  equal to the distance to the lower bf16 neighbour over the gap, so ``E[w_new] = w + u``
  exactly. State: a PRNG key (8 bytes in all).
* **Kahan summation** (``mode="kahan"``, the paper's Algorithm 2): a bf16 compensation buffer ``c``
  carries what rounding dropped, ``y = u - c; s = RN_bf16(w + y); c = RN_bf16((s - w) - y);
  w <- s``. Deterministic; costs 2 bytes per parameter. (Here ``y`` and ``s - w`` are computed in
  float32 -- ``s - w`` is exact -- and only stored values are bf16.)
* ``mode="nearest"`` is plain round-to-nearest, the baseline that stalls.

**Why a transformation and not an ``apply_updates(params, updates, key)``.** Both remedies need
state that must persist and be checkpointed with the optimizer (the key; the Kahan buffer). As the
last link of an ``optax.chain`` the state lives in the optimizer state, so it is saved, restored,
sharded and wrapped (``MultiSteps``, ``inject_hyperparams``) with everything else, and the user's
training step stays ``updates, state = opt.update(g, state, params); params =
optax.apply_updates(params, updates)``. A custom ``apply_updates`` would make every training loop
thread a key and a buffer by hand. The transformation emits, for each bf16 leaf, the float32
update ``t - w`` where ``t`` is the rounded new weight; ``optax.apply_updates`` computes
``(w + (t - w))`` in float32 (bf16 + float32 promotes) and casts to bf16, which lands exactly on
``t``: ``t - w`` is exact in float32 whenever the exponents of ``t`` and ``w`` differ by at most
16 (an update that changes a weight by a factor below 2**16), and then ``w + (t - w) = t``.

It must be the **last** transformation of the chain (after the learning rate), and ``update``
needs ``params``. Leaves that are not bfloat16 (e.g. norm scales kept in float32) pass through.

Example:
  >>> import optax
  >>> opt = optax.chain(optax.sgd(1e-3), bf16_params("sr", seed=0))
  >>> params = {"w": jnp.ones((4,), jnp.bfloat16)}
  >>> state = opt.init(params)
  >>> updates, state = opt.update({"w": jnp.full((4,), 0.5)}, state, params)
  >>> optax.apply_updates(params, updates)["w"].dtype
  dtype(bfloat16)
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, UInt32

import qjax

ParamsMode = Literal["sr", "kahan", "nearest"]
PARAMS_MODES: tuple[str, ...] = ("sr", "kahan", "nearest")


class Bf16ParamsState(NamedTuple):
    """State of :func:`bf16_params`.

    Attributes:
      key: raw PRNG key data (uint32; ``jax.random.key_data``), advanced every step (``"sr"``);
        ``None`` otherwise.
      compensation: bf16 Kahan buffer shaped like the bf16 params (``"kahan"``); ``None`` for
        other leaves and other modes.
    """

    key: UInt32[Array, "..."] | None
    compensation: Any


def _is_bf16(x) -> bool:
    return x is not None and getattr(x, "dtype", None) == jnp.bfloat16


def bf16_params(mode: ParamsMode = "sr", *, seed: int = 0,
                prng_impl: str | None = None) -> optax.GradientTransformation:
    """Turns float32 updates into the updates that put bf16 weights on their rounded new values.

    Args:
      mode: ``"sr"`` (stochastic rounding), ``"kahan"`` (round-to-nearest with a bf16 Kahan
        compensation buffer) or ``"nearest"`` (plain round-to-nearest, for comparison).
      seed: seed of the stochastic-rounding key (``"sr"`` only).
      prng_impl: PRNG implementation of the key, e.g. ``"threefry2x32"`` (JAX default) or
        ``"unsafe_rbg"``; ``None`` = JAX's default. It only splits the key every step: the
        rounding's random bits are ``qjax.stochastic_bits`` of the split key for any ``prng_impl``.

    Returns:
      An ``optax.GradientTransformation`` with :class:`Bf16ParamsState`. Put it last in a chain.

    Raises:
      ValueError: unknown ``mode``; at init, a params tree with no bfloat16 leaf; at update,
        ``params=None``.

    Example:
      >>> import optax
      >>> opt = optax.chain(optax.adam(1e-4), bf16_params("kahan"))
      >>> params = {"w": jnp.ones((8,), jnp.bfloat16)}
      >>> state = opt.init(params)
      >>> state[1].compensation["w"].dtype
      dtype(bfloat16)
    """
    if mode not in PARAMS_MODES:
        raise ValueError(f"unknown bf16 params mode {mode!r}; valid: {', '.join(map(repr, PARAMS_MODES))}.")

    def init_fn(params):
        if not any(_is_bf16(p) for p in jax.tree.leaves(params)):
            raise ValueError("bf16_params: no bfloat16 leaf in params; cast the weights first, e.g. "
                             "params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params).")
        if mode == "sr":
            key = jax.random.key_data(jax.random.key(seed, impl=prng_impl))
        else:
            key = None
        compensation = None
        if mode == "kahan":
            compensation = jax.tree.map(lambda p: jnp.zeros_like(p) if _is_bf16(p) else None, params)
        return Bf16ParamsState(key, compensation)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("bf16_params needs params: call opt.update(grads, state, params).")
        p_leaves, treedef = jax.tree.flatten(params)
        u_leaves = treedef.flatten_up_to(updates)
        if mode == "kahan":
            c_leaves = treedef.flatten_up_to(state.compensation)
        else:
            c_leaves = [None] * len(p_leaves)
        new_key = state.key
        keys = [None] * len(p_leaves)
        if mode == "sr":
            key = jax.random.wrap_key_data(state.key, impl=prng_impl)
            key, *keys = jax.random.split(key, len(p_leaves) + 1)
            new_key = jax.random.key_data(key)
        out_u, out_c = [], []
        for p, u, c, k in zip(p_leaves, u_leaves, c_leaves, keys):
            if not _is_bf16(p) or u is None:
                out_u.append(u)
                out_c.append(c)
                continue
            w = p.astype(jnp.float32)
            if mode == "sr":
                target = qjax.fake_quant(w + u.astype(jnp.float32), "bf16", rounding="stochastic", key=k)
            elif mode == "nearest":
                target = (w + u.astype(jnp.float32)).astype(jnp.bfloat16).astype(jnp.float32)
            else:
                y = u.astype(jnp.float32) - c.astype(jnp.float32)
                target = (w + y).astype(jnp.bfloat16).astype(jnp.float32)
                c = ((target - w) - y).astype(jnp.bfloat16)
            out_u.append(target - w)
            out_c.append(c)
        new_updates = treedef.unflatten(out_u)
        compensation = treedef.unflatten(out_c) if mode == "kahan" else None
        return new_updates, Bf16ParamsState(new_key, compensation)

    return optax.GradientTransformation(init_fn, update_fn)


def upcast_inner(inner: optax.GradientTransformation,
                 dtype=jnp.float32) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` on ``dtype`` copies of low-precision float params and updates.

    With bf16 weights, optax optimizers would keep their moments (and do their math) in bf16;
    wrapped in this, the inner state is created from float32 params and updated from float32
    gradients, so moments are float32 (or quantized by :func:`~qjax.optim.quantize_state`).

    Args:
      inner: the transformation to run in ``dtype``.
      dtype: the computation dtype (float32).

    Returns:
      A transformation with ``inner``'s state; its updates are ``dtype``.

    Example:
      >>> import optax
      >>> opt = upcast_inner(optax.scale_by_adam())
      >>> opt.init({"w": jnp.ones(3, jnp.bfloat16)}).nu["w"].dtype
      dtype('float32')
    """
    inner = optax.with_extra_args_support(inner)

    def cast(tree):
        return jax.tree.map(
            lambda x: x.astype(dtype) if (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
                                          and jnp.finfo(x.dtype).bits < jnp.finfo(dtype).bits) else x,
            tree)

    def init_fn(params):
        return inner.init(cast(params))

    def update_fn(updates, state, params=None, **extra_args):
        return inner.update(cast(updates), state, None if params is None else cast(params), **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
