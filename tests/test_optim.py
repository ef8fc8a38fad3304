"""Tests of qjax.optim: quantized optimizer state, bf16 weights with SR / Kahan, adamw, bytes."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import qjax.optim as qo
from qjax.optim import codes
from qjax.optim.state import QuantizedTensor

TABLES = {
    "dyn8_signed": codes.dynamic_code(8, True),
    "dyn8_unsigned": codes.dynamic_code(8, False),
    "dyn4_signed": codes.dynamic_code(4, True),
    "square4": codes.square_code(4),
}


def _is_q(x):
    return isinstance(x, QuantizedTensor)


_quantize = jax.jit(qo.quantize_tensor, static_argnames=("fmt", "block_size"))
_dequantize = jax.jit(qo.dequantize_tensor)


# --------------------------------------------------------------------------- code tables


@pytest.mark.parametrize("name", sorted(TABLES))
def test_tables_are_sorted_distinct_and_span_the_range(name):
    t = TABLES[name]
    assert t.dtype == np.float32 and t.size in (16, 256)
    assert np.all(np.diff(t) > 0)
    assert 0.0 in t and 1.0 in t
    assert (-1.0 in t) == name.endswith("_signed")


def test_dynamic_code_structure():
    # unsigned 8-bit: 0, 1, and 2**(i+1) linear fractions in decade 10**(i-6), i = 0..6
    t = codes.dynamic_code(8, False)
    positive = t[t > 0]
    decade = np.floor(np.log10(positive.astype(np.float64)) + 1e-9)
    counts = {int(d): int(np.sum(decade == d)) for d in np.unique(decade)}
    assert counts == {-7: 2, -6: 4, -5: 8, -4: 16, -3: 32, -2: 64, -1: 128 + 0, 0: 1}
    # signed 8-bit: symmetric except the smallest negative magnitude, which is left out for -1
    s = codes.dynamic_code(8, True)
    pos, neg = s[s > 0], -s[s < 0][::-1]
    assert pos.size == 128 and neg.size == 127
    np.testing.assert_array_equal(pos[1:], neg)


@pytest.mark.parametrize("name", sorted(TABLES))
def test_nearest_code_is_exact_nearest(name):
    t = TABLES[name]
    rng = np.random.default_rng(0)
    mids = (t[:-1] + t[1:]) / 2
    lo = -1.0 if t[0] < 0 else 0.0
    v = np.concatenate([rng.uniform(lo, 1, 4000), t, mids, np.nextafter(mids, 2), np.nextafter(mids, -2),
                        10.0 ** rng.uniform(-8, 0, 1000) * (np.sign(rng.uniform(-1, 1, 1000)) if lo < 0 else 1),
                        [lo - 0.5, 1.5]]).astype(np.float32)
    got = np.asarray(codes.nearest_code(jnp.asarray(v), t[None], jnp.zeros((), jnp.int32)))
    dist = np.abs(v[:, None].astype(np.float64) - t[None, :].astype(np.float64))
    best = dist.min(axis=1)
    np.testing.assert_array_equal(dist[np.arange(v.size), got], best)  # nearest (ties either way)
    ties = np.sum(dist == best[:, None], axis=1) > 1
    tie_pick = np.abs(t[got[ties]])
    tie_min = np.array([np.abs(t[dist[i] == best[i]]).min() for i in np.flatnonzero(ties)])
    np.testing.assert_array_equal(tie_pick, tie_min)  # ties go to the smaller magnitude


def test_nearest_code_stochastic_is_unbiased():
    t = codes.dynamic_code(8, False)
    v = jnp.asarray(np.array([3e-7, 0.0123456, 0.31, 0.5, 0.987654, 1.0], np.float32))
    n = 20000
    u = jax.random.uniform(jax.random.key(0), (n, v.size))
    idx = codes.nearest_code(jnp.broadcast_to(v, (n, v.size)), t[None], jnp.zeros((), jnp.int32),
                             uniform=u)
    values = np.asarray(t)[np.asarray(idx)].astype(np.float64)
    mean, se = values.mean(0), values.std(0) / np.sqrt(n) + 1e-12
    z = (mean - np.asarray(v, np.float64)) / se
    assert np.all(np.abs(z) < 5), z
    nearest = np.asarray(t)[np.asarray(codes.nearest_code(v, t[None], jnp.zeros((), jnp.int32)))]
    assert np.any(nearest != np.asarray(v))  # the test points are not all on the grid


# --------------------------------------------------------------------------- quantize_tensor


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_round_trip_is_exact_on_the_code_grid(fmt):
    signed, unsigned = qo.state._int_tables(fmt)
    rng = np.random.default_rng(1)
    bs = qo.state.DEFAULT_BLOCK_SIZE[fmt]
    scale = 2.0 ** rng.integers(-20, 5, size=(8, 1))
    a = rng.choice(signed, size=(8, bs)); a[:, 0] = -1.0  # mixed-sign blocks use the signed code
    b = rng.choice(unsigned, size=(8, bs)); b[:, 0] = 1.0  # non-negative blocks the unsigned one
    x = jnp.asarray(np.concatenate([a, b], axis=1) * scale, jnp.float32)
    q = _quantize(x, fmt)
    np.testing.assert_array_equal(np.asarray(q.block_info), np.tile([[0, 1]], (8, 1)))
    np.testing.assert_array_equal(np.asarray(_dequantize(q)), np.asarray(x))


def test_fp8_round_trip_is_exact_on_the_e4m3_grid():
    rng = np.random.default_rng(2)
    grid = np.unique(np.abs(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)))
    grid = grid[np.isfinite(grid)]
    x = rng.choice(grid, size=(4, 256)) * rng.choice([-1, 1], size=(4, 256))
    x[:, 0] = -448.0
    x = jnp.asarray(x * 2.0 ** rng.integers(-10, 10, size=(4, 1)), jnp.float32)
    q = _quantize(x, "fp8")
    assert np.all(np.asarray(q.block_info) == 8)  # k = 1: plain E4M3
    np.testing.assert_array_equal(np.asarray(_dequantize(q)), np.asarray(x))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_requantizing_is_idempotent(fmt):
    x = jax.random.normal(jax.random.key(3), (32, 1000)) * jnp.exp(jax.random.normal(jax.random.key(4), (32, 1000)))
    for data in (x, x**2):
        q = _quantize(data, fmt)
        q2 = _quantize(_dequantize(q), fmt)
        for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(q2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_int8_error_is_within_half_a_code_gap():
    x = jax.random.normal(jax.random.key(5), (64, 512)) ** 3
    for data, table in ((x, codes.dynamic_code(8, True)), (jnp.abs(x), codes.dynamic_code(8, False))):
        q = _quantize(data, "int8")
        err = np.abs(np.asarray(_dequantize(q)) - np.asarray(data)).reshape(64, 2, 256)
        absmax = np.asarray(q.scales)[..., None]
        assert np.all(err <= absmax * np.max(np.diff(table)) / 2 * (1 + 1e-5))


def test_small_positive_values_never_round_to_zero_in_nonnegative_blocks():
    x = jnp.concatenate([jnp.array([1.0, 1e-12, 0.0]), jnp.full((253,), 0.5)])
    for fmt in ("int8", "fp8", "int4"):
        d = np.asarray(jax.jit(lambda v: _dequantize(_quantize(v, fmt)))(x))
        assert d[1] > 0 and d[2] == 0, fmt


def _coat_reference(x, block_size=256):
    """COAT's expansion as written in the paper/kernel (centre sqrt(min*max)), in float64."""
    xb = np.asarray(x, np.float64).reshape(-1, block_size)
    mag = np.abs(xb)
    mx = mag.max(1, keepdims=True)
    mn = np.where(mag > 0, mag, np.inf).min(1, keepdims=True)
    k = np.floor(8 * np.log2(448.0**2 / 2) / np.log2(mx / mn)) / 8
    centre = np.sqrt(mx * mn)
    scale = (mx / centre) ** k / 448
    q = ((mag / centre) ** k / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return q, (q * scale) ** (1 / k) * centre


def test_fp8_expansion_matches_a_float64_reference_of_coat():
    g = jax.random.normal(jax.random.key(6), (20, 64, 256))
    nu = jnp.mean(g**2, 0) + 1e-3  # second-moment-like, all positive
    q = _quantize(nu, "fp8")
    ref_codes, ref_values = _coat_reference(nu)
    got_codes = np.asarray(q.codes.astype(jnp.float32), np.float64).reshape(ref_codes.shape)
    assert np.mean(got_codes == ref_codes) > 0.999
    np.testing.assert_allclose(np.asarray(_dequantize(q)).reshape(ref_values.shape), ref_values,
                               rtol=0.07)


def test_fp8_expansion_beats_plain_e4m3_on_second_moments():
    g = jax.random.normal(jax.random.key(7), (20, 64, 256))
    nu = jnp.mean(g**2, 0)
    q = _quantize(nu, "fp8")
    assert np.all(np.asarray(q.block_info) > 8)  # narrow-range blocks get k > 1
    err_dre = np.abs(np.asarray(_dequantize(q)) / np.asarray(nu) - 1)
    plain = np.asarray(qjax_fake_quant_blocks(nu))
    err_plain = np.abs(plain / np.asarray(nu) - 1)
    assert err_dre.mean() < 0.5 * err_plain.mean()


def qjax_fake_quant_blocks(x, block_size=256):
    """Plain E4M3 with a per-block absmax scale via the qjax core."""
    import qjax
    from qjax import formats as F
    fmt = F.Format("e4m3_b256", F.E4M3_ELEM, F.Scaling(F.Block(block_size), F.FP32))
    return qjax.fake_quant(x, fmt)


def test_int4_codes_are_packed_two_per_byte():
    x = jax.random.normal(jax.random.key(8), (3, 257))
    q = _quantize(x, "int4")
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (3, 129) and q.scales.shape == (3, 3)
    assert q.nbytes == 3 * 129 + 3 * 3 * 4 + 3 * 3


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="'int8', 'fp8', 'int4'"):
        qo.quantize_state(optax.adam(1e-3), "int3")
    with pytest.raises(ValueError, match="state_fmt"):
        qo.adamw(1e-3, state_fmt="nf4")
    with pytest.raises(ValueError, match="'bf16', 'bf16_sr', 'bf16_kahan'"):
        qo.adamw(1e-3, params="fp16_sr")
    with pytest.raises(ValueError, match="'sr', 'kahan', 'nearest'"):
        qo.bf16_params("dither")
    with pytest.raises(ValueError, match="rounding"):
        qo.quantize_state(optax.adam(1e-3), "int8", rounding="up")
    with pytest.raises(ValueError, match="bfloat16"):
        qo.bf16_params("sr").init({"w": jnp.ones(3)})


# --------------------------------------------------------------------------- the wrapper


def _params(key=0):
    k1, k2 = jax.random.split(jax.random.key(key), 2)
    return {"dense": {"kernel": jax.random.normal(k1, (64, 256)), "bias": jnp.zeros(256)},
            "out": {"kernel": jax.random.normal(k2, (256, 32)) * 0.1}}


def _small():
    """One quantized leaf (64x256) and one full-precision leaf: cheap to compile."""
    params = {"w": jax.random.normal(jax.random.key(0), (64, 256)), "b": jnp.zeros(256)}
    return params, _grads(params)


def _grads(params, key=1):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return treedef.unflatten([jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])


def test_state_quantizes_only_large_param_shaped_leaves():
    params = _params() | {"scale": jnp.ones(4096)}
    init = lambda opt: jax.eval_shape(opt.init, params)  # structure only: nothing is computed
    state = init(qo.quantize_state(optax.adam(1e-3), "int8"))
    adam = state.inner_state[0]
    assert _is_q(adam.mu["dense"]["kernel"]) and _is_q(adam.nu["scale"])
    assert not _is_q(adam.mu["dense"]["bias"])  # 256 < min_size: full precision
    assert _is_q(adam.mu["out"]["kernel"])  # 8192 elements
    bigger = init(qo.quantize_state(optax.adam(1e-3), "int8", min_size=8193)).inner_state[0]
    assert not _is_q(bigger.mu["out"]["kernel"]) and _is_q(bigger.mu["dense"]["kernel"])
    assert adam.count.dtype == jnp.int32
    # Adafactor's factored second moments are not shaped like any parameter: untouched.
    fact = init(qo.quantize_state(optax.adafactor(1e-3, min_dim_size_to_factor=32), "int8"))
    leaves = jax.tree.leaves(fact, is_leaf=_is_q)
    assert not any(_is_q(x) and len(x.shape) == 1 and x.shape[0] in (64, 256) for x in leaves)


def test_small_tensors_pass_through_unchanged():
    params, grads = _small()
    ref = optax.adam(1e-3)
    opt = qo.quantize_state(optax.adam(1e-3), "fp8")
    s_ref, s = ref.init(params), jax.jit(opt.init)(params)
    step, step_ref = jax.jit(opt.update), jax.jit(ref.update)
    for _ in range(3):
        u_ref, s_ref = step_ref(grads, s_ref, params)
        u, s = step(grads, s, params)
    # float32 math in two different programs: equal up to XLA's instruction choice (1 ulp)
    np.testing.assert_allclose(np.asarray(u["b"]), np.asarray(u_ref["b"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.inner_state[0].nu["b"]), np.asarray(s_ref[0].nu["b"]), rtol=1e-6)
    # ... while the quantized leaves are close but not identical
    d = np.asarray(u["w"] - u_ref["w"])
    assert 0 < np.abs(d).max() < 0.25 * np.abs(np.asarray(u_ref["w"])).max()  # E4M3


_WEIGHTS_FOR = {"int8": "bf16_sr", "fp8": "bf16_sr", "int4": "bf16_kahan"}


@functools.cache
def _one_step(fmt):
    """adamw with ``fmt`` moments and bf16 weights, jitted, one step from init on bf16 params."""
    params, grads = _small()
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    opt = qo.adamw(1e-3, state_fmt=fmt, params=_WEIGHTS_FOR[fmt])
    step = jax.jit(opt.update)
    state0 = jax.jit(opt.init)(bf16)
    updates, state = step(grads, state0, bf16)
    return step, bf16, grads, state0, updates, state


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_works_under_jit_and_preserves_structure(fmt):
    _, bf16, _, state0, updates, state = _one_step(fmt)
    assert jax.tree.structure(updates) == jax.tree.structure(bf16)
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state0)):
        assert a.shape == b.shape and a.dtype == b.dtype
    new = optax.apply_updates(bf16, updates)
    assert jax.tree.map(lambda a: a.dtype, new) == jax.tree.map(lambda a: a.dtype, bf16)
    assert all(np.any(np.asarray(a != b)) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(bf16)))


def test_adamw_without_options_equals_optax_adamw():
    params, grads = _params(), _grads(_params())
    ref, opt = optax.adamw(1e-3, weight_decay=1e-2), qo.adamw(1e-3, weight_decay=1e-2)
    s_ref, s = ref.init(params), opt.init(params)
    for _ in range(3):
        u_ref, s_ref = ref.update(grads, s_ref, params)
        u, s = opt.update(grads, s, params)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_inside_optax_chain():
    params, grads = _small()
    chained = optax.chain(optax.clip_by_global_norm(1.0),
                          qo.quantize_state(optax.scale_by_adam(), "int8"), optax.scale(-1e-3))
    u, _ = jax.jit(chained.update)(grads, jax.jit(chained.init)(params), params)
    assert jax.tree.structure(u) == jax.tree.structure(params)
    assert float(optax.tree.norm(u)) > 0


def test_inside_optax_multisteps():
    params, grads = _small()
    bparams = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    multi = optax.MultiSteps(qo.adamw(0.1, state_fmt="int8", params="bf16_sr"), every_k_schedule=2)
    step = jax.jit(multi.update)
    u1, s = step(grads, jax.jit(multi.init)(bparams), bparams)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u1))  # accumulating
    u2, s = step(grads, s, bparams)
    moved = optax.apply_updates(bparams, u2)
    assert np.mean(np.asarray(moved["w"] != bparams["w"])) > 0.9  # the inner step ran


def test_with_inject_hyperparams():
    params, grads = _small()
    injected = optax.inject_hyperparams(qo.adamw, static_args=("min_size",))(
        learning_rate=1e-3, state_fmt="int8", min_size=4096)
    plain = qo.adamw(1e-3, state_fmt="int8")
    step = jax.jit(injected.update)
    u_i, s_i = step(grads, jax.jit(injected.init)(params), params)
    u_p, _ = jax.jit(plain.update)(grads, jax.jit(plain.init)(params), params)
    for a, b in zip(jax.tree.leaves(u_i), jax.tree.leaves(u_p)):
        # inject_hyperparams turns b1, b2, eps into float32 arrays: bias corrections round differently
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-9)
    s_i.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u0, _ = step(grads, s_i, params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(u0))


# --------------------------------------------------------------------------- bf16 weights


def test_sr_updates_land_exactly_on_the_stochastically_rounded_weights():
    import qjax
    w = jax.random.normal(jax.random.key(9), (4096,)).astype(jnp.bfloat16)
    u = jax.random.normal(jax.random.key(10), (4096,)) * 1e-3
    opt = qo.bf16_params("sr", seed=3)
    state = opt.init({"w": w})
    out, _ = opt.update({"w": u}, state, {"w": w})
    new = optax.apply_updates({"w": w}, out)["w"]
    assert new.dtype == jnp.bfloat16
    _, k = jax.random.split(jax.random.wrap_key_data(state.key), 2)
    expected = qjax.fake_quant(w.astype(jnp.float32) + u, "bf16", rounding="stochastic", key=k)
    np.testing.assert_array_equal(np.asarray(new.astype(jnp.float32)), np.asarray(expected))


def test_sr_weight_updates_are_unbiased_and_nearest_is_not():
    w = jnp.asarray(np.linspace(0.5, 4.0, 512), jnp.bfloat16)
    u = jnp.full((512,), 1e-3, jnp.float32)  # well below half a bf16 ulp of every weight
    exact = np.asarray(w, np.float64) + 1e-3

    def sample(mode, seed):
        opt = qo.bf16_params(mode, seed=seed)
        out, _ = opt.update({"w": u}, opt.init({"w": w}), {"w": w})
        return optax.apply_updates({"w": w}, out)["w"].astype(jnp.float32)

    n = 1000
    new = np.asarray(jax.vmap(lambda s: sample("sr", s))(jnp.arange(n)), np.float64)
    ulp = np.asarray(jnp.abs(jnp.nextafter(w, jnp.asarray(jnp.inf, jnp.bfloat16)) - w), np.float64)
    p = (exact - np.asarray(w, np.float64)) / ulp
    se = ulp * np.sqrt(p * (1 - p) / n)
    z = (new.mean(0) - exact) / se
    assert np.abs(z).max() < 5 and abs(z.mean()) < 5 / np.sqrt(z.size)
    nearest = np.asarray(sample("nearest", 0), np.float64)
    np.testing.assert_array_equal(nearest, np.asarray(w, np.float64))  # every update lost


def test_kahan_accumulates_updates_that_nearest_loses():
    w0 = jnp.full((256,), 1.0, jnp.bfloat16)
    u = jnp.asarray(np.random.default_rng(11).uniform(1e-4, 1e-3, 256), jnp.float32)
    opt = qo.bf16_params("kahan")
    state, w = opt.init({"w": w0}), {"w": w0}
    step = jax.jit(opt.update)
    for _ in range(200):
        out, state = step({"w": u}, state, w)
        w = optax.apply_updates(w, out)
    exact = 1.0 + 200 * np.asarray(u, np.float64)
    got = np.asarray(w["w"], np.float64) + np.asarray(state.compensation["w"], np.float64) * -1
    ulp = 2.0**-7  # bf16 ulp in [1, 2)
    assert np.all(np.abs(np.asarray(w["w"], np.float64) - exact) <= ulp)  # weights track the sum
    assert np.all(np.abs(got - exact) < 2e-3 * ulp * 50)  # and w - c recovers it closely


# --------------------------------------------------------------------------- convergence


def _task(n=1024, d_in=32, hidden=128, d_out=32, noise=0.1):
    """Teacher-student regression: a random tanh teacher, a GELU MLP student (24k params; the three
    weight matrices, 4096-16384 elements, are quantized; the biases are not)."""
    k = jax.random.split(jax.random.key(0), 8)
    x = jax.random.normal(k[0], (n, d_in))
    teacher1 = jax.random.normal(k[1], (d_in, 64)) / np.sqrt(d_in)
    teacher2 = jax.random.normal(k[2], (64, d_out)) / 8.0
    y = jnp.tanh(x @ teacher1) @ teacher2 + noise * jax.random.normal(k[3], (n, d_out))
    params = {"l1": {"w": jax.random.normal(k[4], (d_in, hidden)) / np.sqrt(d_in), "b": jnp.zeros(hidden)},
              "l2": {"w": jax.random.normal(k[5], (hidden, hidden)) / np.sqrt(hidden), "b": jnp.zeros(hidden)},
              "l3": {"w": jax.random.normal(k[6], (hidden, d_out)) / np.sqrt(hidden), "b": jnp.zeros(d_out)}}

    def loss(p):
        p = jax.tree.map(lambda a: a.astype(jnp.float32), p)
        h = jax.nn.gelu(x @ p["l1"]["w"] + p["l1"]["b"])
        h = jax.nn.gelu(h @ p["l2"]["w"] + p["l2"]["b"])
        return jnp.mean((h @ p["l3"]["w"] + p["l3"]["b"] - y) ** 2)

    return params, loss


def _train(opt, params, loss, steps=200):
    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    @jax.jit
    def run(p):
        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
        return loss(p), p

    final, p = run(params)
    return float(final), p


@functools.cache
def _state_runs():
    params, loss = _task()
    lr = optax.cosine_decay_schedule(3e-3, 200)
    runs = {"fp32": optax.adamw(lr),
            "int8": qo.adamw(lr, state_fmt="int8"), "fp8": qo.adamw(lr, state_fmt="fp8"),
            "int4": qo.adamw(lr, state_fmt="int4")}
    return {name: _train(opt, params, loss)[0] for name, opt in runs.items()} | {"initial": float(loss(params))}


@pytest.mark.parametrize("name,tolerance", [("int8", 0.01), ("fp8", 0.01), ("int4", 0.02)])
def test_quantized_state_converges_like_fp32_state(name, tolerance):
    r = _state_runs()
    assert r["fp32"] < 0.1 * r["initial"]  # the task is learned
    assert abs(r[name] / r["fp32"] - 1) < tolerance, r


@functools.cache
def _bf16_runs():
    params, loss = _task()
    lr = 1e-4  # Adam steps ~1e-4 are below half a bf16 ulp of most weights (|w| > 0.05)
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    out = {"initial": float(loss(params)), "fp32_master": _train(optax.adamw(lr), params, loss)[0]}
    for mode in ("bf16", "bf16_sr", "bf16_kahan"):
        out[mode], p = _train(qo.adamw(lr, params=mode), bf16, loss)
        out[mode + "_unchanged"] = float(np.mean(np.asarray(p["l2"]["w"] == bf16["l2"]["w"])))
        assert p["l2"]["w"].dtype == jnp.bfloat16
    return out


@pytest.mark.parametrize("mode", ["bf16_sr", "bf16_kahan"])
def test_bf16_weights_with_sr_or_kahan_match_fp32_master_weights(mode):
    r = _bf16_runs()
    assert abs(r[mode] / r["fp32_master"] - 1) < 0.01, r


def test_bf16_round_to_nearest_stalls():
    r = _bf16_runs()
    progress = (r["initial"] - r["bf16"]) / (r["initial"] - r["fp32_master"])
    assert progress < 0.7 and r["bf16"] > 1.5 * r["fp32_master"], r
    assert r["bf16_unchanged"] > 0.5 and r["bf16_sr_unchanged"] < 0.1, r


# --------------------------------------------------------------------------- bytes


def _llama_like_params(layers=2, dtype=jnp.float32):
    shapes = {"embed": (8192, 2048)}
    for i in range(layers):
        shapes |= {f"l{i}.q": (2048, 2048), f"l{i}.k": (2048, 512), f"l{i}.v": (2048, 512),
                   f"l{i}.o": (2048, 2048), f"l{i}.gate": (2048, 8192), f"l{i}.up": (2048, 8192),
                   f"l{i}.down": (8192, 2048), f"l{i}.norm": (2048,)}
    return {k: jax.ShapeDtypeStruct(s, dtype) for k, s in shapes.items()}


def test_bytes_per_param_meets_the_targets():
    params = _llama_like_params()
    bf16 = _llama_like_params(dtype=jnp.bfloat16)
    n = qo.param_count(params)

    def per_param(opt, p, **kw):
        return qo.bytes_per_param(jax.eval_shape(opt.init, p), p, **kw)

    fp32 = per_param(optax.adamw(1e-3), params, include_params=True)
    assert abs(fp32 - 12.0) < 1e-3  # fp32 weights + two fp32 moments (+ a step count)
    int8 = per_param(qo.adamw(1e-3, state_fmt="int8"), params)
    norm_bytes = 2 * 4 * 2048 * 2 / n  # the 2048-element norm scales stay fp32 moments
    assert int8 == pytest.approx(2 * (1 + 5 / 256) + norm_bytes, abs=1e-4) and int8 <= 2.1
    fp8 = per_param(qo.adamw(1e-3, state_fmt="fp8"), params)
    assert fp8 <= 2.1
    int4 = per_param(qo.adamw(1e-3, state_fmt="int4"), params)
    assert int4 == pytest.approx(2 * (0.5 + 5 / 128) + norm_bytes, abs=1e-3)
    total = per_param(qo.adamw(1e-3, state_fmt="int8", params="bf16_sr"), bf16, include_params=True)
    assert total <= 4.1 and total == pytest.approx(2 + int8, abs=1e-3)
    kahan = per_param(qo.adamw(1e-3, state_fmt="int8", params="bf16_kahan"), bf16, include_params=True)
    assert kahan == pytest.approx(total + 2, abs=1e-3)
    concrete = qo.adamw(1e-3, state_fmt="int8").init({"w": jnp.ones((64, 512))})
    # step count + 8-byte stochastic-rounding key + two moments of codes, scales and block info
    assert qo.state_bytes(concrete) == 4 + 8 + 2 * (64 * 512 + 64 * 2 * 5)


# --------------------------------------------------------------------------- sharding, checkpoints


def test_state_is_sharded_like_the_params():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, P("data", None))
    params = {"w": jax.device_put(jax.random.normal(jax.random.key(0), (64, 1024)), sharding)}
    grads = {"w": jax.device_put(jax.random.normal(jax.random.key(1), (64, 1024)), sharding)}
    opt = qo.adamw(1e-3, state_fmt="int8")
    state = jax.jit(opt.init)(params)
    _, state = jax.jit(opt.update)(grads, state, params)
    q = state[0].inner_state.mu["w"]
    for arr in (q.codes, q.scales, q.block_info):
        assert arr.sharding.is_equivalent_to(sharding, arr.ndim), arr.sharding
        assert arr.addressable_shards[0].data.shape[0] == 8


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
def test_orbax_checkpoint_round_trip_is_exact(fmt, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    _, _, _, _, _, state = _one_step(fmt)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / fmt, state)
    ckptr.wait_until_finished()
    restored = ckptr.restore(tmp_path / fmt, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.atleast_1d(np.asarray(a)).view(np.uint8),
                                      np.atleast_1d(np.asarray(b)).view(np.uint8))
