"""qjax.nnx (Flax NNX layers) and quantize_model on NNX models, against qjax.ops references and
flax.nnx's own layers."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import qjax
from qjax import ops, stats
from qjax import nnx as qnnx

DENSE_DN = (((1,), (0,)), ((), ()))


def _x(seed, shape=(64, 64), dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _same_state(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(nnx.state(a, nnx.Param))
    lb, tb = jax.tree_util.tree_flatten_with_path(nnx.state(b, nnx.Param))
    assert ta == tb
    for (path, va), (_, vb) in zip(la, lb):
        assert va.shape == vb.shape and va.dtype == vb.dtype, path
        np.testing.assert_array_equal(np.asarray(va), np.asarray(vb), err_msg=str(path))


def test_params_identical_to_flax_nnx():
    _same_state(nnx.Linear(64, 32, rngs=nnx.Rngs(0)),
                qnnx.Linear(64, 32, recipe="mxfp8", rngs=nnx.Rngs(0)))
    _same_state(nnx.Linear(64, 32, use_bias=False, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1)),
                qnnx.Linear(64, 32, use_bias=False, param_dtype=jnp.bfloat16, recipe="fp8",
                            rngs=nnx.Rngs(1)))
    _same_state(nnx.LinearGeneral(64, (2, 16), rngs=nnx.Rngs(2)),
                qnnx.LinearGeneral(64, (2, 16), recipe="mxfp8", rngs=nnx.Rngs(2)))
    _same_state(nnx.Einsum("btd,df->btf", (64, 32), (32,), rngs=nnx.Rngs(3)),
                qnnx.Einsum("btd,df->btf", (64, 32), (32,), recipe="mxfp8", rngs=nnx.Rngs(3)))
    _same_state(nnx.Conv(32, 16, (3, 3), rngs=nnx.Rngs(4)),
                qnnx.Conv(32, 16, (3, 3), recipe="mxfp8", rngs=nnx.Rngs(4)))


def test_bf16_recipe_gives_identical_outputs():
    x = _x(0, dtype=jnp.bfloat16)
    kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ref = nnx.Linear(64, 48, rngs=nnx.Rngs(0), **kw)
    ours = qnnx.Linear(64, 48, recipe="bf16", rngs=nnx.Rngs(5), **kw)
    nnx.update(ours, nnx.state(ref, nnx.Param))  # load the Flax checkpoint
    np.testing.assert_array_equal(np.asarray(ours(x), np.float32), np.asarray(ref(x), np.float32))


def test_linear_matches_ops_reference_under_jit_and_grad():
    layer = qnnx.Linear(64, 32, recipe="mxfp8", rngs=nnx.Rngs(0))
    x = _x(1)

    def reference(kernel, bias, v):
        return jnp.sum(jnp.sin(ops.dot_general(v, kernel, DENSE_DN, recipe="mxfp8") + bias))

    got = nnx.jit(lambda m, v: jnp.sum(jnp.sin(m(v))))(layer, x)
    np.testing.assert_array_equal(got, reference(layer.kernel[...], layer.bias[...], x))
    grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(layer)
    g_kernel, g_bias = jax.grad(reference, argnums=(0, 1))(layer.kernel[...],
                                                          layer.bias[...], x)
    np.testing.assert_array_equal(grads.kernel[...], g_kernel)
    np.testing.assert_array_equal(grads.bias[...], g_bias)


def test_linear_general_and_einsum_match_ops():
    x = _x(2, (2, 32, 64))
    lg = qnnx.LinearGeneral(64, (2, 16), recipe="mxfp8", rngs=nnx.Rngs(0))
    want = ops.dot_general(x, lg.kernel[...], (((2,), (0,)), ((), ())), recipe="mxfp8")
    np.testing.assert_array_equal(lg(x), want + lg.bias[...])
    es = qnnx.Einsum("btd,df->btf", (64, 32), (32,), recipe="mxfp8", rngs=nnx.Rngs(1))
    want = ops.einsum("btd,df->btf", x, es.kernel[...], recipe="mxfp8") + es.bias[...]
    np.testing.assert_array_equal(es(x), want)


@pytest.mark.skipif(not hasattr(ops, "conv_general_dilated"),
                    reason="qjax.ops.conv_general_dilated not available yet")
def test_conv_matches_ops():
    x = _x(7, (2, 8, 8, 32))
    conv = qnnx.Conv(32, 16, (3, 3), recipe="mxfp8", rngs=nnx.Rngs(0))
    want = ops.conv_general_dilated(
        x, conv.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        recipe="mxfp8") + conv.bias[...]
    np.testing.assert_allclose(conv(x), want, rtol=1e-6, atol=1e-6)
    plain = nnx.Conv(32, 16, (3, 3), rngs=nnx.Rngs(0))
    assert not np.array_equal(conv(x), plain(x))


def test_quant_stream_required_and_deterministic():
    with pytest.raises(ValueError, match="'quant'"):
        qnnx.Linear(64, 64, recipe="mxfp4", rngs=nnx.Rngs(0))
    x = _x(3)

    def grads(seed):
        layer = qnnx.Linear(64, 64, recipe="mxfp4", rngs=nnx.Rngs(0, quant=seed))
        step = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))
        return step(layer).kernel[...], step(layer).kernel[...]

    first, second = grads(1)
    again, _ = grads(1)
    np.testing.assert_array_equal(first, again)  # fixed seed: same numbers
    assert not np.array_equal(first, second)  # the stream advances between steps
    assert not np.array_equal(first, grads(2)[0])


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.layer = qnnx.Linear(64, 64, recipe="mxfp8", rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.layer(x))


def test_nnx_scan_and_remat_over_layers():
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return _Block(nnx.Rngs(params=key))

    stack = create(jax.random.split(jax.random.key(0), 3))
    x = _x(4)

    def forward(model, v):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        @nnx.remat
        def body(block, h):
            return block(h)

        return jnp.sum(body(model, v) ** 2)

    def reference(kernel, bias):
        h = x
        for i in range(3):
            h = jnp.tanh(ops.dot_general(h, kernel[i], DENSE_DN, recipe="mxfp8") + bias[i])
        return jnp.sum(h**2)

    kernel, bias = stack.layer.kernel[...], stack.layer.bias[...]
    np.testing.assert_allclose(nnx.jit(forward)(stack, x), reference(kernel, bias), rtol=1e-6)
    grads = nnx.jit(nnx.grad(forward))(stack, x)
    g_kernel, g_bias = jax.grad(reference, argnums=(0, 1))(kernel, bias)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    close(grads.layer.kernel[...], g_kernel)
    close(grads.layer.bias[...], g_bias)


class TinyBlock(nnx.Module):
    """Attention projections, an MLP and a head; ``recipes`` quantizes layers by hand."""

    def __init__(self, rngs, recipes=None):
        recipes = recipes or {}

        def linear(name, n_in, n_out):
            if name in recipes:
                return qnnx.Linear(n_in, n_out, recipe=recipes[name], rngs=rngs)
            return nnx.Linear(n_in, n_out, rngs=rngs)

        self.q, self.k, self.v = (linear(f"attn/{n}", 64, 64) for n in "qkv")
        self.attn = nnx.Dict({"o": linear("attn/o", 64, 64)})
        self.mlp = nnx.List([linear("mlp/0", 64, 128), linear("mlp/1", 128, 64)])
        self.head = linear("head", 64, 64)

    def __call__(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).reshape(b, t, 2, 32) for f in (self.q, self.k, self.v))
        x = x + self.attn["o"](nnx.dot_product_attention(q, k, v).reshape(b, t, 64))
        x = x + self.mlp[1](nnx.gelu(self.mlp[0](x)))
        return self.head(x)


def test_quantize_model_nnx_report_and_outputs():
    x = _x(5, (4, 16, 64))
    model = TinyBlock(nnx.Rngs(0))
    rules = [(r"^[qkv]$|^attn/", None), (qjax.nn.LAST, None), (".*", "mxfp8")]
    model, report = qjax.quantize_model(model, rules, x)
    order = ["q", "k", "v", "attn/o", "mlp/0", "mlp/1", "head"]
    assert list(report.layers) == order
    assert report.quantized == {"mlp/0": "mxfp8", "mlp/1": "mxfp8"}
    assert isinstance(model.mlp[0], qnnx.Linear) and type(model.head) is nnx.Linear
    by_hand = TinyBlock(nnx.Rngs(1), {"mlp/0": "mxfp8", "mlp/1": "mxfp8"})
    nnx.update(by_hand, nnx.state(model, nnx.Param))
    forward = nnx.jit(lambda m: m(x))
    np.testing.assert_array_equal(forward(model), forward(by_hand))
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    g_hand = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(by_hand)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(g, nnx.Param)),
                 nnx.to_pure_dict(nnx.state(g_hand, nnx.Param)))
    with pytest.raises(ValueError, match="example inputs"):
        qjax.quantize_model(TinyBlock(nnx.Rngs(0)), [(qjax.nn.FIRST, None), (".*", "fp8")])
    _, by_graph = qjax.quantize_model(TinyBlock(nnx.Rngs(0)), [(r"^mlp/", "fp8")])
    assert by_graph.quantized == {"mlp/0": "fp8", "mlp/1": "fp8"}


def test_stats_do_not_change_outputs():
    x = _x(6)
    plain = qnnx.Linear(64, 32, recipe="mxfp8", rngs=nnx.Rngs(0))
    with_stats = qnnx.Linear(64, 32, recipe="mxfp8", collect_stats=True, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(with_stats(x), plain(x))
    flat = stats.flatten_stats(nnx.state(with_stats, qnnx.QuantStats))
    want = stats.quantization_stats(x, "mxfp8", axis=1, scale_mode="rceil")
    np.testing.assert_allclose(flat["lhs/snr_db"], want["snr_db"], rtol=1e-6)
    assert set(flat) == {f"{o}/{s}" for o in ("lhs", "rhs")
                         for s in ("snr_db", "clipped", "flushed", "amax", "noise_norm")}
    assert not nnx.state(plain, qnnx.QuantStats)


def _e4m3_reference(x, scale):
    scaled = np.clip(np.asarray(x, np.float32) * np.float32(1 / scale), -448, 448)
    return scaled.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * np.float32(scale)


def test_delayed_scaling_updates_across_optax_steps_and_freezes_in_eval():
    model = qnnx.Linear(64, 64, use_bias=False, rngs=nnx.Rngs(0),
                        delayed_scaling=qjax.nn.DelayedScaling(history_length=2))
    optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x):
        def loss_fn(m):
            y = m(x)
            return jnp.mean(y**2), y

        (_, y), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return y

    amaxes = []
    for step in range(3):
        x = _x(40 + step) * (step + 1)
        history = np.asarray(model.lhs_amax_history[...])
        kernel = np.asarray(model.kernel[...])
        amaxes.insert(0, float(np.max(np.abs(x))))
        scale = (history.max() if history.max() > 0 else amaxes[0]) / 448
        w_history = np.asarray(model.rhs_amax_history[...])
        w_scale = (w_history.max() if w_history.max() > 0 else np.abs(kernel).max()) / 448
        y = train_step(model, optimizer, x)
        np.testing.assert_allclose(y, _e4m3_reference(x, scale) @ _e4m3_reference(kernel, w_scale),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(model.lhs_amax_history[...], (amaxes + [0.0])[:2], rtol=1e-7)
    model.eval()
    frozen = np.asarray(model.lhs_amax_history[...])
    model(_x(50) * 100)
    np.testing.assert_array_equal(model.lhs_amax_history[...], frozen)
    assert nnx.state(model, qnnx.QuantScaling)


def test_sharded_train_step_matches_unsharded():
    """FSDP x TP on a 2x4 (data, model) mesh of CPU devices: same loss, gradients and update."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (CPU) devices")
    P, NamedSharding = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    # Auto axes: with Explicit ones a quantized GEMM with a sharded contraction axis asks for an
    # out_sharding, which quantized recipes do not take.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = qnnx.Linear(64, 64, recipe="mxfp8", rngs=rngs,
                                  bias_init=nnx.initializers.normal(0.1))
            self.down = qnnx.Linear(64, 64, recipe="mxfp8", rngs=rngs,
                                    bias_init=nnx.initializers.normal(0.1))

        def __call__(self, x):
            return self.down(nnx.gelu(self.up(x)))

    model = MLP(nnx.Rngs(0))
    sharded = nnx.clone(model)
    specs = {"up": {"kernel": P("data", "model"), "bias": P("model")},  # FSDP x column-parallel
             "down": {"kernel": P("model", "data"), "bias": P(None)}}  # row-parallel x FSDP
    state = nnx.state(sharded, nnx.Param)
    placed = jax.tree.map(lambda v, s: jax.device_put(v, NamedSharding(mesh, s)),
                          nnx.to_pure_dict(state), specs)
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(sharded, state)
    # 64 / 4 = 16 hidden features per model shard: MXFP8's blocks of 32 along the contraction
    # axes of down (forward) and up (dgrad) straddle shards, so per-shard scales would differ.
    assert sharded.down.kernel[...].sharding.spec == P("model", "data")
    assert len(model.up.kernel[...].sharding.device_set) == 1

    @nnx.jit
    def train_step(model, optimizer, x, target):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss, grads

    x, target = _x(14), _x(15)
    loss, grads = train_step(model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), x, target)
    batch = NamedSharding(mesh, P("data"))
    loss_s, grads_s = train_step(sharded, nnx.Optimizer(sharded, optax.sgd(0.1), wrt=nnx.Param),
                                 jax.device_put(x, batch), jax.device_put(target, batch))
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    leaves, leaves_s = jax.tree.leaves(grads), jax.tree.leaves(grads_s)
    assert len(leaves) == len(leaves_s) == 4
    for a, b in zip(leaves_s, leaves):
        rel = np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))
        assert rel < 1e-3
    for a, b in zip(jax.tree.leaves(nnx.state(sharded, nnx.Param)),
                    jax.tree.leaves(nnx.state(model, nnx.Param))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # sgd: 0.1 x the gradients
    assert sharded.up.kernel[...].sharding.spec == P("data", "model")  # the update kept it
