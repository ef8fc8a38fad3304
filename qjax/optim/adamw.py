"""``qjax.optim.adamw``: optax's AdamW with quantized moments and/or bf16 weights in one call."""

from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax

from qjax.config import kernels_enabled, single_gpu
from qjax.optim.params import bf16_params, upcast_inner
from qjax.optim.state import STATE_FORMATS, QuantizedTensor, quantize_state

ParamsOption = Literal["bf16", "bf16_sr", "bf16_kahan"]
PARAMS_OPTIONS: tuple[str, ...] = ("bf16", "bf16_sr", "bf16_kahan")
_MODE = {"bf16": "nearest", "bf16_sr": "sr", "bf16_kahan": "kahan"}
FUSED_STATE_FORMATS: tuple[str, ...] = ("int8", "fp8")  # what the fused kernel handles


def adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
          eps: float = 1e-8, weight_decay: float = 1e-4, *,
          mask: Any | Callable[[optax.Params], Any] | None = None,
          state_fmt: Literal["int8", "fp8", "int4"] | None = None,
          params: ParamsOption | None = None,
          block_size: int | None = None, min_size: int = 4096,
          state_rounding: Literal["stochastic", "nearest"] = "stochastic", seed: int = 0,
          prng_impl: str | None = None,
          fused: bool | None = None) -> optax.GradientTransformationExtraArgs:
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
      prng_impl: PRNG implementation of the stochastic-rounding keys (they are split every step;
        the random bits are ``qjax.stochastic_bits`` of the split keys, or the kernel's hash).
      fused: the one-pass Pallas kernel (:mod:`qjax.pallas.adamw_8bit`) for the tensors it
        handles (``state_fmt="int8"`` or ``"fp8"`` with stochastic state rounding,
        ``params="bf16_sr"`` or ``None`` with float32 weights; leaves whose moments are
        quantized). ``None`` (default): on a single GPU, chosen when lowering for it (not under
        ``qjax.use_kernels(False)``); elsewhere the chain. ``False``: never (the composable chain, the reference). ``True``:
        always (in the Pallas interpreter off the GPU: slow, for tests). On an H200 (JAX 0.11.2,
        2026-11-23, 268M parameters) the first fused update took 9.2 ms against the chain's
        17.7 ms (``optax.adamw`` fp32: 3.1 ms); on an H100 (2026-12-07, steps dispatched back
        to back) the kernel alone takes 0.95x of ``optax.adamw``, the fused update through
        optax's API 1.15x. It is bit-identical to its reference on the H100 and H200. Both
        keep the same state pytree; they differ in the random stream of the stochastic rounding
        (the kernel's own hash streams vs ``qjax.stochastic_bits``), so not bit for bit. With fp8
        moments the fused update took 2.25x of ``optax.adamw`` (H100, 2026-12-07); on the GPU it
        agrees with its reference up to libdevice's last bits.

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
    def make_links(mask):
        adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
        if state_fmt is not None:
            adam = quantize_state(adam, state_fmt, block_size=block_size, min_size=min_size,
                                  rounding=state_rounding, seed=seed + 1, prng_impl=prng_impl)
        links = [adam, optax.add_decayed_weights(weight_decay, mask),
                 optax.scale_by_learning_rate(learning_rate)]
        if params is not None:
            links[0] = upcast_inner(adam, jnp.float32)
            links.append(bf16_params(_MODE[params], seed=seed, prng_impl=prng_impl))
        return links

    links = make_links(mask)
    chain = optax.chain(*links)
    fusable = (state_fmt in FUSED_STATE_FORMATS and state_rounding == "stochastic"
               and params in (None, "bf16_sr") and not callable(weight_decay))
    if fused is False or not fusable:
        return chain
    fused_update = functools.partial(
        _fused_update, chain=chain, make_links=make_links, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask,
        learning_rate=learning_rate, bf16=params is not None, prng_impl=prng_impl)

    def update_fn(updates, state, params=None, **extra_args):
        if fused is True:
            interpret = jax.default_backend() != "gpu"
            return fused_update(updates, state, params, interpret=interpret, **extra_args)
        if not (single_gpu() and kernels_enabled()):
            return chain.update(updates, state, params, **extra_args)
        # Chosen when lowering for the platform the data is on (a GPU machine may still run this
        # on its CPU, where only the chain compiles).
        return jax.lax.platform_dependent(
            updates, state, params,
            cuda=lambda u, s, p: fused_update(u, s, p, interpret=False, **extra_args),
            default=lambda u, s, p: chain.update(u, s, p, **extra_args))

    return optax.GradientTransformationExtraArgs(chain.init, update_fn)


def _key_words(key_data) -> jax.Array:
    """Two uint32 seed words from raw key data of any PRNG implementation."""
    words = jnp.ravel(key_data).astype(jnp.uint32)
    return jnp.stack([jnp.bitwise_xor.reduce(words[0::2]), jnp.bitwise_xor.reduce(words[1::2])])


def _decay_flags(mask, params, treedef) -> list[bool]:
    """Per leaf of ``params``: whether weight decay applies (optax's mask, resolved)."""
    n = treedef.num_leaves
    if mask is None:
        return [True] * n
    tree = mask(params) if callable(mask) else mask
    flags = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), tree, params)
    return [bool(f) for f in treedef.flatten_up_to(flags)]


def _fused_update(updates, state, params, *, chain, make_links, b1, b2, eps, weight_decay, mask,
                  learning_rate, bf16, prng_impl, interpret, **extra_args):
    """``chain.update`` with the fused kernel on the leaves it handles and the chain on the rest.

    The chain's state is ``(QuantizedOptState(ScaleByAdamState(count, mu, nu), key),
    weight-decay state, learning-rate state[, Bf16ParamsState(key, None)])``. The fused leaves
    take their moments out of it; the rest run through the same chain links on sub-lists of
    leaves (its state rebuilt around them), so counts, schedules and keys advance as usual.
    """
    from qjax.pallas import adamw_8bit as kernel  # lazy: qjax.pallas imports qjax.optim

    if params is None:
        raise ValueError("adamw needs params: call opt.update(grads, state, params).")
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves = treedef.flatten_up_to(updates)
    q_state = state[0]
    adam = q_state.inner_state
    mu_leaves = treedef.flatten_up_to(adam.mu)
    nu_leaves = treedef.flatten_up_to(adam.nu)
    mode = "bf16_sr" if bf16 else "fp32"
    fuse = [g is not None and isinstance(m, QuantizedTensor) and kernel.supports(p, m, n, mode)
            for g, p, m, n in zip(g_leaves, p_leaves, mu_leaves, nu_leaves)]
    if not any(fuse):
        return chain.update(updates, state, params, **extra_args)
    decay_flags = _decay_flags(mask, params, treedef)
    rest = [i for i, f in enumerate(fuse) if not f]
    pick = lambda leaves: [leaves[i] for i in rest]

    q_key = jax.random.wrap_key_data(q_state.key, impl=prng_impl)
    q_key, q_sub = jax.random.split(q_key)
    state_words = _key_words(jax.random.key_data(q_sub))
    param_words = jnp.zeros(2, jnp.uint32)
    sub_state = [q_state._replace(inner_state=adam._replace(mu=pick(mu_leaves), nu=pick(nu_leaves)),
                                  key=jax.random.key_data(q_key)), state[1], state[2]]
    if bf16:
        p_key = jax.random.wrap_key_data(state[3].key, impl=prng_impl)
        p_key, p_sub = jax.random.split(p_key)
        param_words = _key_words(jax.random.key_data(p_sub))
        sub_state.append(state[3]._replace(key=jax.random.key_data(p_key)))
    links = make_links(None if mask is None else [decay_flags[i] for i in rest])
    sub_updates, new_sub = optax.chain(*links).update(pick(g_leaves), tuple(sub_state),
                                                     pick(p_leaves), **extra_args)

    count_inc = optax.safe_increment(adam.count)
    if callable(learning_rate):
        neg_lr = jnp.asarray(-1 * learning_rate(state[2].count), jnp.float32)
    else:
        neg_lr = -1 * learning_rate
    decay_on = not (isinstance(weight_decay, (int, float)) and weight_decay == 0.0)
    out_updates, out_mu, out_nu = [None] * len(p_leaves), list(mu_leaves), list(nu_leaves)
    for k, i in enumerate(rest):
        out_updates[i] = sub_updates[k]
        out_mu[i] = new_sub[0].inner_state.mu[k]
        out_nu[i] = new_sub[0].inner_state.nu[k]
    for i, f in enumerate(fuse):
        if not f:
            continue
        p = p_leaves[i]
        decay_dtype = jax.dtypes.result_type(weight_decay, p)
        hyper = kernel.hyperparameters(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                       neg_lr=neg_lr, count_inc=count_inc, decay_dtype=decay_dtype)
        out, out_mu[i], out_nu[i] = kernel.adamw_8bit_pallas(
            g_leaves[i], p, mu_leaves[i], nu_leaves[i], hyper,
            kernel.stream_keys(state_words, param_words, i), param_mode=mode,
            decay=decay_on and decay_flags[i], decay_bf16=decay_dtype == jnp.bfloat16,
            interpret=interpret)
        out_updates[i] = out.astype(jnp.float32) - p.astype(jnp.float32) if bf16 else out
    new_adam = new_sub[0].inner_state._replace(mu=treedef.unflatten(out_mu),
                                               nu=treedef.unflatten(out_nu))
    new_state = (new_sub[0]._replace(inner_state=new_adam), *new_sub[1:])
    return treedef.unflatten(out_updates), new_state
