"""qjax.nn (Flax Linen layers, quantize_model, delayed scaling, stats) against hand-written
qjax.ops references and Flax's own layers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qjax
from qjax import ops, stats
from qjax import nn as qnn

DENSE_DN = (((1,), (0,)), ((), ()))


def _x(seed, shape=(64, 64), dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _same_tree(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (pa, va), (_, vb) in zip(la, lb):
        assert va.shape == vb.shape and va.dtype == vb.dtype, pa
        np.testing.assert_array_equal(np.asarray(va), np.asarray(vb), err_msg=str(pa))


# --------------------------------------------------------------------------- drop-in parameters


@pytest.mark.parametrize("kwargs", [{}, {"use_bias": False},
                                    {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16}])
def test_dense_params_identical_to_flax(kwargs):
    x = _x(0)
    ref = nn.Dense(32, **kwargs).init(jax.random.key(1), x)
    got = qjax.dense(32, "mxfp8", **kwargs).init(jax.random.key(1), x)
    _same_tree(ref, got)


def test_other_linen_layers_params_identical_to_flax():
    x = _x(0, (4, 16, 64))
    _same_tree(nn.DenseGeneral((2, 32), axis=-1).init(jax.random.key(1), x),
               qnn.DenseGeneral((2, 32), axis=-1, recipe="mxfp8").init(jax.random.key(1), x))
    _same_tree(nn.Einsum((64, 32), "btd,df->btf").init(jax.random.key(1), x),
               qnn.Einsum((64, 32), "btd,df->btf", recipe="mxfp8").init(jax.random.key(1), x))
    tokens = jnp.arange(12).reshape(3, 4)
    _same_tree(nn.Embed(50, 64).init(jax.random.key(1), tokens),
               qnn.Embed(50, 64, recipe="mxfp8").init(jax.random.key(1), tokens))


def test_bf16_checkpoint_loads_and_bf16_recipe_is_identical():
    x = _x(2, dtype=jnp.bfloat16)
    flax_layer = nn.Dense(48, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    checkpoint = flax_layer.init(jax.random.key(3), x)
    ours = qjax.dense(48, recipe="bf16", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(ours.apply(checkpoint, x), np.float32),
                                  np.asarray(flax_layer.apply(checkpoint, x), np.float32))


# --------------------------------------------------------------------------- layer == ops reference


def test_dense_matches_ops_reference_forward_and_grad():
    layer = qnn.Dense(32, recipe="mxfp8")
    x = _x(4)
    params = layer.init(jax.random.key(5), x)["params"]

    def ours(p, v):
        return jnp.sum(jnp.sin(layer.apply({"params": p}, v)))

    def reference(p, v):
        y = ops.dot_general(v, p["kernel"], DENSE_DN, recipe="mxfp8") + p["bias"]
        return jnp.sum(jnp.sin(y))

    np.testing.assert_array_equal(ours(params, x), reference(params, x))  # eager
    g_ours = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(params, x)
    g_ref = jax.jit(jax.value_and_grad(reference, argnums=(0, 1)))(params, x)
    jax.tree.map(np.testing.assert_array_equal, g_ours, g_ref)
    plain = nn.Dense(32).apply({"params": params}, x)
    assert not np.array_equal(layer.apply({"params": params}, x), plain)  # it does quantize


def test_dense_general_einsum_embed_match_ops():
    x = _x(6, (2, 32, 64))
    dg = qnn.DenseGeneral((2, 32), axis=-1, recipe="mxfp8")
    p = dg.init(jax.random.key(0), x)["params"]
    ref = ops.dot_general(x, p["kernel"], (((2,), (0,)), ((), ())), recipe="mxfp8") + p["bias"]
    np.testing.assert_array_equal(dg.apply({"params": p}, x), ref)

    es = qnn.Einsum((64, 16), "btd,df->btf", recipe="mxfp8")
    p = es.init(jax.random.key(1), x)["params"]
    ref = ops.einsum("btd,df->btf", x, p["kernel"], recipe="mxfp8") + p["bias"]
    np.testing.assert_array_equal(es.apply({"params": p}, x), ref)

    emb = qnn.Embed(96, 64, recipe="mxfp8")
    v = emb.init(jax.random.key(2), jnp.arange(4))
    np.testing.assert_array_equal(emb.apply(v, jnp.arange(4)),
                                  nn.Embed(96, 64).apply(v, jnp.arange(4)))  # lookup is exact
    logits = emb.apply(v, x, method="attend")
    ref = ops.dot_general(x, v["params"]["embedding"], (((2,), (1,)), ((), ())), recipe="mxfp8")
    np.testing.assert_array_equal(logits, ref)


@pytest.mark.skipif(not hasattr(ops, "conv_general_dilated"),
                    reason="qjax.ops.conv_general_dilated not available yet")
def test_conv_params_and_ops_reference():
    x = _x(7, (2, 8, 8, 32))
    ref_layer, layer = nn.Conv(16, (3, 3)), qnn.Conv(16, (3, 3), recipe="mxfp8")
    params = ref_layer.init(jax.random.key(0), x)
    _same_tree(params, layer.init(jax.random.key(0), x))
    want = ops.conv_general_dilated(
        x, params["params"]["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        recipe="mxfp8") + params["params"]["bias"]
    np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- randomness, errors


def test_quant_stream_is_required_and_deterministic():
    layer = qjax.dense(64, "mxfp4")  # stochastic rounding in the backward GEMMs
    x = _x(8)
    params = layer.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="'quant'"):
        layer.apply({"params": params}, x)

    step = jax.jit(jax.grad(lambda p, key: jnp.sum(layer.apply(
        {"params": p}, x, rngs={"quant": key}) ** 2)))

    def grads(seed):
        return step(params, jax.random.key(seed))

    jax.tree.map(np.testing.assert_array_equal, grads(1), grads(1))
    assert not np.array_equal(grads(1)["kernel"], grads(2)["kernel"])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="fmt= or recipe="):
        qjax.dense(8, "mxfp8", recipe="fp8")
    with pytest.raises(ValueError, match="mxfp8"):  # the message lists the valid names
        qnn.Dense(8, recipe="mxfp9").init(jax.random.key(0), jnp.ones((2, 32)))
    with pytest.raises(ValueError, match="example inputs"):
        qjax.quantize_model(nn.Dense(8), [(".*", "fp8")])
    with pytest.raises(ValueError, match="recipe=None"):
        qnn.Dense(8, recipe="fp8", delayed_scaling=qnn.DelayedScaling())
    with pytest.raises(TypeError, match="linen"):
        qjax.quantize_model(object(), [])


# --------------------------------------------------------------------------- transforms


class _ScanBody(nn.Module):
    recipe: str

    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(qnn.Dense(64, recipe=self.recipe)(x)), None


def test_nn_scan_and_remat_over_layers():
    stack = nn.scan(nn.remat(_ScanBody), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=3)("mxfp8")
    x = _x(9)
    params = stack.init(jax.random.key(0), x, None)["params"]

    def ours(p):
        return jnp.sum(stack.apply({"params": p}, x, None)[0] ** 2)

    def reference(p):
        w = p["Dense_0"]
        h = x
        for i in range(3):
            h = jnp.tanh(ops.dot_general(h, w["kernel"][i], DENSE_DN, recipe="mxfp8")
                         + w["bias"][i])
        return jnp.sum(h**2)

    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 jax.jit(jax.value_and_grad(ours))(params),
                 jax.jit(jax.value_and_grad(reference))(params))


def test_vmap_over_a_leading_axis_equals_per_slice():
    layer = qnn.Dense(32, recipe="mxfp8")
    xs = _x(16, (2, 64, 64))
    params = layer.init(jax.random.key(0), xs[0])
    got = jax.vmap(lambda v: layer.apply(params, v))(xs)
    for i in range(2):
        np.testing.assert_array_equal(got[i], layer.apply(params, xs[i]))


# --------------------------------------------------------------------------- quantize_model


class _Attention(nn.Module):
    recipes: tuple = ()

    @nn.compact
    def __call__(self, x):
        r = dict(self.recipes)

        def proj(name, features=64):
            if name in r:
                return qnn.Dense(features, recipe=r[name], name=name)
            return nn.Dense(features, name=name)

        b, t, _ = x.shape
        q, k, v = (proj(n)(x).reshape(b, t, 2, 32) for n in ("q", "k", "v"))
        return proj("o")(nn.dot_product_attention(q, k, v).reshape(b, t, 64))


class _MLP(nn.Module):
    recipes: tuple = ()

    @nn.compact
    def __call__(self, x):
        r = dict(self.recipes)
        up = qnn.Dense(128, recipe=r["up"], name="up") if "up" in r else nn.Dense(128, name="up")
        down = (qnn.Dense(64, recipe=r["down"], name="down") if "down" in r
                else nn.Dense(64, name="down"))
        return down(nn.gelu(up(x)))


class TinyLM(nn.Module):
    """Embedding, one pre-norm block, untied head; ``recipes`` quantizes layers by hand."""

    recipes: tuple = ()

    @nn.compact
    def __call__(self, tokens):
        r = dict(self.recipes)

        def sub(prefix):
            return tuple((k.split("/", 1)[1], v) for k, v in r.items()
                         if k.startswith(prefix + "/"))

        x = nn.Embed(64, 64, name="embed")(tokens)
        x = x + _Attention(sub("attn"), name="attn")(nn.LayerNorm(name="ln1")(x))
        x = x + _MLP(sub("mlp"), name="mlp")(nn.LayerNorm(name="ln2")(x))
        head = (qnn.Dense(64, recipe=r["head"], name="head") if "head" in r
                else nn.Dense(64, name="head"))
        return head(x)


LAYERS = ["attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/down", "head"]


@pytest.mark.parametrize("policy,expected", [
    (qnn.all_but_first_and_last("mxfp8"), {p: "mxfp8" for p in LAYERS[1:-1]}),
    (qnn.attention_in_bf16("fp8"), {"mlp/up": "fp8", "mlp/down": "fp8", "head": "fp8"}),
    (qnn.mlp_only("mxfp8"), {"mlp/up": "mxfp8", "mlp/down": "mxfp8"}),
    ([(r"attn/(q|k)$", "fp8"), (r"^mlp/", "mxfp8")],
     {"attn/q": "fp8", "attn/k": "fp8", "mlp/up": "mxfp8", "mlp/down": "mxfp8"}),
])
def test_quantize_model_linen_report(policy, expected):
    tokens = jnp.zeros((4, 16), jnp.int32)
    _, report = qjax.quantize_model(TinyLM(), policy, tokens)
    assert list(report.layers) == LAYERS
    assert report.quantized == expected
    assert set(report.kept) == set(LAYERS) - set(expected)
    assert "mlp/up" in str(report)


def test_quantize_model_linen_matches_hand_written():
    tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, 64)
    model = TinyLM()
    params = model.init(jax.random.key(1), tokens)
    qmodel, report = qjax.quantize_model(model, qnn.all_but_first_and_last("mxfp8"), tokens)
    _same_tree(params, qmodel.init(jax.random.key(1), tokens))
    by_hand = TinyLM(tuple(report.quantized.items()))

    def loss_and_grad(m):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply(p, tokens) ** 2)))(params)

    (loss_q, grad_q), (loss_h, grad_h) = loss_and_grad(qmodel), loss_and_grad(by_hand)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(loss_q, loss_h)
        jax.tree.map(np.testing.assert_array_equal, grad_q, grad_h)
    else:  # the two programs are fused differently on GPU: float32 summation order may differ
        np.testing.assert_allclose(loss_q, loss_h, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     grad_q, grad_h)


def test_quantize_model_tied_embedding_and_einsum():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            emb = nn.Embed(64, 64, name="embed")
            h = nn.Einsum((64, 64), "btd,df->btf", name="mix")(emb(tokens))
            return emb.attend(h)

    tokens = jax.random.randint(jax.random.key(0), (2, 32), 0, 64)
    params = Tied().init(jax.random.key(1), tokens)
    qmodel, report = qjax.quantize_model(Tied(), [(".*", "mxfp8")], tokens)
    assert report.layers == {"mix": "mxfp8", "embed": "mxfp8"}
    e = params["params"]["embed"]["embedding"]
    mix = params["params"]["mix"]
    h = ops.einsum("btd,df->btf", e[tokens], mix["kernel"], recipe="mxfp8") + mix["bias"]
    want = ops.dot_general(h, e, (((2,), (1,)), ((), ())), recipe="mxfp8")
    np.testing.assert_array_equal(qmodel.apply(params, tokens), want)


# --------------------------------------------------------------------------- attention helper


def test_attention_helper_matches_hand_written_and_flax():
    q, k, v = (_x(s, (2, 32, 2, 32)) for s in (10, 11, 12))
    mask = nn.make_causal_mask(jnp.ones((2, 32)))
    got = qnn.dot_product_attention(q, k, v, mask=mask, recipe="mxfp8")
    logits = ops.einsum("...qhd,...khd->...hqk", q / jnp.sqrt(32.0), k, recipe="mxfp8")
    probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min))
    want = ops.einsum("...hqk,...khd->...qhd", probs, v, recipe="mxfp8")
    np.testing.assert_array_equal(got, want)
    plain = qnn.dot_product_attention(q, k, v, mask=mask, recipe="bf16")
    np.testing.assert_allclose(plain, nn.dot_product_attention(q, k, v, mask=mask),
                               rtol=1e-5, atol=1e-5)


def test_multi_head_attention_einsums_keep_params():
    x = _x(13, (2, 32, 64))
    plain = nn.MultiHeadDotProductAttention(2)
    quant = nn.MultiHeadDotProductAttention(2, **qnn.attention_einsums("mxfp8"))
    params = plain.init(jax.random.key(0), x)
    _same_tree(params, quant.init(jax.random.key(0), x))
    out = quant.apply(params, x)
    assert out.shape == x.shape and not np.array_equal(out, plain.apply(params, x))


# --------------------------------------------------------------------------- sharding


def test_sharded_train_step_matches_unsharded():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (CPU) devices")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.gelu(qnn.Dense(128, recipe="mxfp8", name="up")(x))
            return qnn.Dense(64, recipe="mxfp8", name="down")(h)

    model, x, target = MLP(), _x(14), _x(15)
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(p, v, t):
        return jnp.mean((model.apply({"params": p}, v) - t) ** 2)

    step = jax.jit(jax.value_and_grad(loss_fn))
    loss, grads = step(params, x, target)
    specs = {"up": {"kernel": P("data", "model"), "bias": P("model")},  # FSDP x TP
             "down": {"kernel": P("model", "data"), "bias": P(None)}}
    shard = lambda tree, spec: jax.device_put(tree, NamedSharding(mesh, spec))  # noqa: E731
    sharded_params = jax.tree.map(shard, params, specs,
                                  is_leaf=lambda s: isinstance(s, P))
    assert sharded_params["up"]["kernel"].sharding.spec == P("data", "model")
    loss_s, grads_s = step(sharded_params, shard(x, P("data")), shard(target, P("data")))
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads)):
        rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
        assert rel < 1e-3


# --------------------------------------------------------------------------- delayed scaling


def _e4m3_reference(x, scale):
    scaled = np.clip(np.asarray(x, np.float32) * np.float32(1 / scale), -448, 448)
    return scaled.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.float32(scale)


def test_delayed_scaling_history_and_values_across_optax_steps():
    history_length = 3
    model = qnn.Dense(64, use_bias=False,
                      delayed_scaling=qnn.DelayedScaling(history_length=history_length))
    xs = [_x(20 + i) * (i + 1) for i in range(4)]
    variables = model.init(jax.random.key(0), xs[0])
    assert set(variables) == {"params", qnn.SCALING_COLLECTION}
    params, scaling = variables["params"], variables[qnn.SCALING_COLLECTION]
    optimizer = optax.sgd(0.05)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, scaling, opt_state, x):
        def loss_fn(p):
            y, updated = model.apply({"params": p, qnn.SCALING_COLLECTION: scaling}, x,
                                     mutable=[qnn.SCALING_COLLECTION])
            return jnp.mean(y**2), (y, updated[qnn.SCALING_COLLECTION])

        (loss, (y, scaling)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), scaling, opt_state, y, grads

    lhs_amaxes, rhs_amaxes = [], []
    for x in xs:
        kernel = np.asarray(params["kernel"])
        lhs_hist = np.asarray(scaling["qjax"]["lhs_amax_history"])
        rhs_hist = np.asarray(scaling["qjax"]["rhs_amax_history"])
        lhs_amaxes.insert(0, float(np.max(np.abs(x))))
        rhs_amaxes.insert(0, float(np.max(np.abs(kernel))))
        lhs_scale = (lhs_hist.max() if lhs_hist.max() > 0 else lhs_amaxes[0]) / 448
        rhs_scale = (rhs_hist.max() if rhs_hist.max() > 0 else rhs_amaxes[0]) / 448
        xq, wq = _e4m3_reference(x, lhs_scale), _e4m3_reference(kernel, rhs_scale)
        # float32 GEMMs exactly (GPUs default to TF32 for them)
        with jax.default_matmul_precision("highest"):
            params, scaling, opt_state, y, grads = train_step(params, scaling, opt_state, x)
        np.testing.assert_allclose(y, xq @ wq, rtol=1e-5, atol=1e-5)
        dy = qjax.fake_quant(2 * jnp.asarray(xq @ wq) / y.size, "fp8_e5m2")
        np.testing.assert_allclose(grads["kernel"], xq.T @ np.asarray(dy), rtol=1e-4, atol=1e-7)
        want = (lhs_amaxes + [0.0] * history_length)[:history_length]
        np.testing.assert_allclose(scaling["qjax"]["lhs_amax_history"], want, rtol=1e-7)
        want = (rhs_amaxes + [0.0] * history_length)[:history_length]
        np.testing.assert_allclose(scaling["qjax"]["rhs_amax_history"], want, rtol=1e-7)
    # without a mutable collection (evaluation) the history stays as it is
    y_eval = model.apply({"params": params, qnn.SCALING_COLLECTION: scaling}, xs[0])
    assert y_eval.shape == (64, 64)


# --------------------------------------------------------------------------- stats


def test_stats_do_not_change_outputs_and_match_qjax_stats():
    x = _x(30)
    plain = qnn.Dense(32, recipe="mxfp8")
    with_stats = qnn.Dense(32, recipe="mxfp8", collect_stats=True)
    params = plain.init(jax.random.key(0), x)

    @jax.jit
    def run(p):
        def loss(q):
            y, collected = with_stats.apply(q, x, mutable=[qnn.STATS_COLLECTION])
            return jnp.sum(y), (y, collected)

        (_, (y, collected)), grads = jax.value_and_grad(loss, has_aux=True)(p)
        plain_y, plain_grads = jax.value_and_grad(lambda q: jnp.sum(plain.apply(q, x)))(p)
        return y, collected, grads, plain.apply(p, x), plain_grads

    y, collected, grads, y_plain, grads_plain = run(params)
    np.testing.assert_array_equal(y, y_plain)
    jax.tree.map(np.testing.assert_array_equal, grads, grads_plain)
    assert qnn.STATS_COLLECTION not in params
    flat = stats.flatten_stats(collected)
    lhs = stats.quantization_stats(x, "mxfp8", axis=1, scale_mode="rceil")
    rhs = stats.quantization_stats(params["params"]["kernel"], "mxfp8", axis=0,
                                   scale_mode="rceil")
    for name in ("snr_db", "clipped", "flushed", "amax"):
        np.testing.assert_allclose(flat[f"qjax/lhs/{name}"], lhs[name], rtol=1e-6)
        np.testing.assert_allclose(flat[f"qjax/rhs/{name}"], rhs[name], rtol=1e-6)
