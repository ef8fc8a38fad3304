"""Sharded training of the LM example (examples/lm/sharding.py) on 8 forced CPU host devices:
data parallel + FSDP + tensor parallel gives the unsharded loss curve, params are sharded as
claimed, and a recipe/mesh combination whose blocks would straddle shards is refused."""

import dataclasses
import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qjax

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from lm import data as D  # noqa: E402
from lm import sharding as S  # noqa: E402
from lm import train as T  # noqa: E402
from lm.model import Decoder, ModelConfig  # noqa: E402

MESH = "data=2,fsdp=2,tensor=2"
# d=128 and SwiGLU 256 keep every tensor shard a multiple of mxfp4's 64-wide dgrad Hadamard block.
MODEL = ModelConfig(D.VOCAB_PADDED, 128, 1, 2, 256, dtype="float32")
CONFIG = T.TrainConfig(model=MODEL, steps=5, batch_size=8, seq_len=64, lr=3e-3, warmup_steps=2,
                       eval_batches=1, log_every=1)


@functools.cache
def _corpus() -> D.Corpus:
    # 40k tokens of the default corpus: real text that does not change when this file is edited
    # (it once was this file's own bytes, so every edit moved the loss curves being compared).
    tokens = D.load_corpus().train[:40_000]
    return D.Corpus("default corpus, first 40k tokens", tokens[:32_000], tokens[32_000:], 1, 1, "test")


needs_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (forced host) devices")


def test_parse_mesh_fills_missing_axes_and_rejects_bad_entries():
    assert S.parse_mesh("tensor=4") == {"data": 1, "fsdp": 1, "tensor": 4}
    assert S.parse_mesh(MESH) == {"data": 2, "fsdp": 2, "tensor": 2}
    for bad in ("pipeline=2", "data=0", "data=x", "data"):
        with pytest.raises(ValueError, match="data, fsdp, tensor"):
            S.parse_mesh(bad)


def test_mesh_has_auto_axes_and_too_many_devices_is_an_error():
    mesh = S.make_mesh({"data": 2, "fsdp": 1, "tensor": 1})
    assert mesh.axis_names == S.AXES and mesh.devices.size == 2
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="devices"):
        S.make_mesh({"data": len(jax.devices()) + 1, "fsdp": 1, "tensor": 1})


@needs_8
@pytest.mark.parametrize("fmt,axis_size", [("mxfp4", 4), ("nvfp4", 2)])
def test_quantizing_a_sharded_contraction_axis_uses_the_logical_blocks(fmt, axis_size):
    x = jax.random.normal(jax.random.key(1), (16, 256)) * jnp.exp(
        jax.random.normal(jax.random.key(2), (16, 256)))
    mesh = S.make_mesh({"data": 1, "fsdp": 1, "tensor": axis_size})
    sharded = jax.device_put(x, NamedSharding(mesh, P(None, "tensor")))
    fq = jax.jit(lambda a: qjax.fake_quant(a, fmt, axis=-1))
    np.testing.assert_array_equal(np.asarray(fq(sharded)), np.asarray(fq(x)))


@needs_8
def test_params_and_optimizer_state_are_sharded_as_claimed():
    config = dataclasses.replace(CONFIG, optimizer_state="int8")
    model = Decoder(MODEL)
    optimizer = T.make_optimizer(config)
    plan = S.make_plan(S.parse_mesh(MESH))
    abstract = jax.eval_shape(lambda: T.init_state(model, optimizer, config))
    shardings = plan.shardings(abstract)
    # train_recipe builds the state like this, and its step keeps these shardings (in = out).
    state = jax.jit(lambda: T.init_state(model, optimizer, config), out_shardings=shardings)()
    tokens = jax.device_put(np.zeros((8, 65), np.int32), plan.batch)
    params = state.params
    expected = {
        ("block_0", "attention", "qkv", "kernel"): P("fsdp", "tensor"),     # column parallel
        ("block_0", "mlp", "gate_up", "kernel"): P("fsdp", "tensor"),
        ("block_0", "attention", "out", "kernel"): P("tensor", "fsdp"),     # row parallel
        ("block_0", "mlp", "down", "kernel"): P("tensor", "fsdp"),
        ("embed", "embedding"): P("fsdp", None),                            # FSDP: largest axis
        ("lm_head", "kernel"): P(None, "fsdp"),
        ("final_norm", "scale"): P("fsdp"),
    }
    for path, spec in expected.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
        assert leaf.addressable_shards[0].data.size == leaf.size // (
            4 if "tensor" in spec else 2)
    moments = state.opt_state[1][0].inner_state.mu["block_0"]["mlp"]["gate_up"]["kernel"]
    codes = jax.tree.leaves(moments)
    assert any(c.shape == (128, 512) and c.sharding.spec == P("fsdp", "tensor") for c in codes)
    assert tokens.sharding.spec == P(("data", "fsdp"))


@needs_8
# (mxfp4, sharded against unsharded: the scanned test below; fp8 has per-tensor scales, whose
# amax the sharded model reduces across devices.)
@pytest.mark.parametrize("recipe,tolerance", [("bf16", 2e-5), ("fp8", 5e-4)])
def test_sharded_training_gives_the_unsharded_loss_curve(recipe, tolerance):
    corpus = _corpus()
    alone = T.train_recipe(recipe, CONFIG, corpus, verbose=False)
    sharded = T.train_recipe(recipe, CONFIG, corpus, verbose=False, mesh=MESH)
    assert alone.train_steps == sharded.train_steps == [1, 2, 3, 4, 5]
    assert np.all(np.isfinite(alone.train_loss))
    np.testing.assert_allclose(sharded.train_loss, alone.train_loss, rtol=0, atol=tolerance)
    np.testing.assert_allclose(sharded.val_loss, alone.val_loss, rtol=0, atol=tolerance)


@needs_8
def test_scanned_blocks_keep_their_layer_axis_whole_and_train_as_unsharded():
    config = dataclasses.replace(CONFIG, model=dataclasses.replace(MODEL, num_layers=2,
                                                                   scan_layers=True))
    plan = S.make_plan(S.parse_mesh(MESH))
    abstract = jax.eval_shape(lambda: T.init_state(Decoder(config.model),
                                                   T.make_optimizer(config), config))
    specs = jax.tree.map(lambda s: s.spec, plan.shardings(abstract.params))["blocks"]["block"]
    assert specs["attention"]["qkv"]["kernel"] == P(None, "fsdp", "tensor")
    assert specs["mlp"]["down"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["mlp_norm"]["scale"] == P(None, "fsdp")
    corpus = _corpus()
    alone = T.train_recipe("mxfp4", config, corpus, verbose=False)
    sharded = T.train_recipe("mxfp4", config, corpus, verbose=False, mesh=MESH)
    assert np.all(np.isfinite(alone.train_loss))
    # Sharded GEMMs and all-reduces sum in another order; the quantizers turn those float32
    # differences into a few one-step flips, which moved the loss by 2.5e-4 after 4 steps once the
    # backward Hadamard multiplied bf16 operands (2026-12-02); fp8's tolerance above, for the
    # same reason.
    np.testing.assert_allclose(sharded.train_loss, alone.train_loss, rtol=0, atol=5e-4)


@needs_8
def test_fsdp_step_all_gathers_only_the_weights():
    # The embedding's one-hot-matmul gradient must reduce partial sums, not all-gather its
    # batch-sized cotangent (lm.model.lookup's sharding hint; see docs/sharding.md).
    sys.path.insert(0, str(EXAMPLES.parent / "benchmarks"))
    from collective_bytes import collective_bytes

    model = Decoder(MODEL)
    optimizer = T.make_optimizer(CONFIG)
    plan = S.make_plan(S.parse_mesh("fsdp=8"))
    abstract = jax.eval_shape(lambda: T.init_state(model, optimizer, CONFIG))
    shardings = plan.shardings(abstract)
    train_step, _ = T.make_steps(model, optimizer, CONFIG, plan, shardings)
    tokens = jax.ShapeDtypeStruct((CONFIG.batch_size, CONFIG.seq_len + 1), jnp.int32,
                                  sharding=plan.batch)
    totals = collective_bytes(train_step.lower(abstract, tokens).compile().as_text())
    gathered = sum(size for (kind, _), size in totals.items() if kind == "all-gather")
    weights = sum(4 * leaf.size for leaf in jax.tree.leaves(abstract.params))
    assert weights <= gathered <= 1.01 * weights, (gathered, weights, totals)


@needs_8
def test_blocks_that_would_straddle_tensor_shards_are_refused():
    # fp8_blockwise: 1x128 activation blocks along K; out/down split K over "tensor" -> 64 < 128.
    with pytest.raises(ValueError, match="straddle shards"):
        T.train_recipe("fp8_blockwise", CONFIG, _corpus(), verbose=False, mesh="tensor=2")
    # mxfp4's dgrad Hadamard block is 64 along N: qkv's 384 outputs over 8 shards are 48 each.
    with pytest.raises(ValueError, match="multiple of 64"):
        T.train_recipe("mxfp4", CONFIG, _corpus(), verbose=False, mesh="tensor=8")
    assert S.kernel_blocks("bf16") == (1, 1)
    # mxfp4's wgrad contracts tokens in Hadamard blocks of 64: 8 x 32 tokens over 8 shards = 32.
    short = dataclasses.replace(CONFIG, seq_len=32)
    with pytest.raises(ValueError, match="tokens of a step into shards of 32"):
        T.train_recipe("mxfp4", short, _corpus(), verbose=False, mesh="data=2,fsdp=4")
    with pytest.raises(ValueError, match="divisible by data\\*fsdp"):
        T.train_recipe("bf16", CONFIG, _corpus(), verbose=False, mesh="data=3")


_TWO_PROCESS_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2,
                           process_id=int(sys.argv[1]))
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import qjax
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "tensor"))
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 128)).astype(np.float32)
w = rng.standard_normal((128, 64)).astype(np.float32) / 8
def loss(x, w):
    return jnp.sum(qjax.ops.matmul(x, w, recipe="mxfp8") ** 2)
def put(a, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
grad = jax.jit(jax.grad(loss, argnums=1), out_shardings=NamedSharding(mesh, P()))
sharded = grad(put(x, P("data", None)), put(w, P(None, "tensor")))
local = jax.jit(jax.grad(loss, argnums=1), device=jax.local_devices()[0])(x, w)
error = np.max(np.abs(np.asarray(sharded.addressable_data(0)) - np.asarray(local)))
print("MATCH" if error <= 1e-5 * np.max(np.abs(np.asarray(local))) else f"DIFFER {error}",
      flush=True)
"""


def test_two_cpu_processes_train_step_matches_one_process_via_jax_distributed():
    """jax.distributed on one machine: 2 processes x 2 CPU devices form one 4-device mesh; the
    gradient of a quantized (mxfp8) matmul, data- and tensor-sharded across both processes, equals
    the single-device one up to float32 summation order (1e-5 of its largest entry: the token
    contraction of wgrad is split over "data" and summed across processes)."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    workers = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_WORKER, str(i), address],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env) for i in range(2)]
    try:
        outputs = [w.communicate(timeout=90)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-2000:]
        assert output.strip().splitlines()[-1] == "MATCH", output[-2000:]
