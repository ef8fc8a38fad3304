"""Optimizer-update benchmark: optax.adamw (fp32) vs qjax.optim variants on ~1.07B parameters.

The update is memory-bound, so each variant is reported with the bytes it must move per parameter
(read params, grads and state; write params and state -- counted from the real arrays), the
achieved bandwidth, and that bandwidth as a fraction of a device-to-device copy measured in the
same run. Times are medians over many runs after warm-up, on random non-zero inputs, with the
params and state donated (updated in place, as in a training step).

    python benchmarks/optim_update.py               # GPU: 1.07B params
    python benchmarks/optim_update.py --embedding   # + the 128256x2048 embedding (1.34B)
    python benchmarks/optim_update.py --layers 4    # 268M parameters: a quicker compile
    python benchmarks/optim_update.py --small       # CPU smoke check (tiny shapes)
    python benchmarks/optim_update.py --hlo         # also count the kernels of each update
    python benchmarks/optim_update.py --convergence # the CPU convergence table (docs/optimizers.md)

Shapes: 16 Llama-like layers, each q, k, v, o (2048x2048), gate, up (2048x8192), down
(8192x2048) and two 2048 norm scales, plus a final norm: 1,073,809,408 parameters. That is the
parameter count behind the reference figure of the issue (optax.adamw: 28 B/param in 13.0 ms on an
H100 = 2.31 TB/s). ``--embedding`` adds the tied embedding of Llama 3.2 1B.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax.optim as qo


def llama_like_shapes(layers=16, hidden=2048, mlp=8192, vocab=128256, embedding=False):
    shapes = []
    if embedding:
        shapes.append(("embed", (vocab, hidden)))
    for i in range(layers):
        shapes += [(f"layers.{i}.attn.{n}", (hidden, hidden)) for n in ("q", "k", "v", "o")]
        shapes += [(f"layers.{i}.mlp.gate", (hidden, mlp)), (f"layers.{i}.mlp.up", (hidden, mlp)),
                   (f"layers.{i}.mlp.down", (mlp, hidden)),
                   (f"layers.{i}.attn_norm", (hidden,)), (f"layers.{i}.mlp_norm", (hidden,))]
    shapes.append(("final_norm", (hidden,)))
    return shapes


def random_tree(shapes, dtype, scale, seed):
    """A flat list of random non-zero arrays, generated on the device one leaf at a time."""
    out = []
    for i, (_, shape) in enumerate(shapes):
        key = jax.random.fold_in(jax.random.key(seed), i)
        leaf = jax.jit(lambda k, shape=shape: (jax.random.normal(k, shape) * scale).astype(dtype))(key)
        out.append(leaf)
    return out


def tree_bytes(tree) -> int:
    return qo.state_bytes(tree)


def median_time(fn, args, warmup, iters, chain=10):
    """Median seconds per step of ``args = fn(*args)`` (the first two outputs are fed back:
    donated). Each sample dispatches ``chain`` steps back to back before it waits, as a training
    loop does: the host prepares the next step while the device runs this one, so the time is the
    device's, not the host's dispatch of a few hundred buffers (with ``chain=1`` on an H100,
    2026-12-07, 268M parameters: optax.adamw 3.39 ms instead of 2.65, the int8 kernel 3.75 ms
    instead of 2.57)."""
    params, grads, state = args
    for _ in range(warmup):
        params, state = fn(params, grads, state)
    jax.block_until_ready((params, state))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(chain):
            params, state = fn(params, grads, state)
        jax.block_until_ready((params, state))
        times.append((time.perf_counter() - t0) / chain)
    return statistics.median(times), (params, state)


def copy_bandwidth(nbytes, warmup, iters):
    """Bytes/s of an elementwise read+write pass over ``nbytes`` (a device-to-device copy)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda v: v + 1.0)
    for _ in range(warmup):
        jax.block_until_ready(copy(x))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(copy(x))
        times.append(time.perf_counter() - t0)
    return 2 * x.size * 4 / statistics.median(times)


def count_kernels(compiled_text: str) -> int:
    """Fusions, custom calls and copies in the ENTRY computation of a compiled HLO module."""
    entry = compiled_text[compiled_text.index("ENTRY"):]
    entry = entry[: entry.index("\n}\n")] if "\n}\n" in entry else entry
    kinds = (" fusion(", " custom-call(", " copy(", " rng-bit-generator(", " sort(")
    return sum(1 for line in entry.splitlines() if any(k in line for k in kinds))


def optax_step(opt):
    """The training-state update through optax's API: ``opt.update`` then ``apply_updates``."""
    def step(p, g, s):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    return step


def kernel_only_step(config, keys_per_leaf=True):
    """A step that runs the fused kernel on every quantized leaf and writes the new bf16 weights
    directly (no optax updates, no ``apply_updates`` pass): what one pass per tensor costs. The
    few small leaves (norm scales, 0.003% of the parameters) are left as they are.
    ``keys_per_leaf=False`` gives every leaf the same stream keys (wrong random bits; it times what
    deriving them per leaf costs)."""
    from qjax.optim.state import QuantizedTensor
    from qjax.pallas import adamw_8bit as K

    def step(p, g, s):
        adam = s[0].inner_state
        count_inc = adam.count + 1
        h = K.hyperparameters(b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, neg_lr=-1e-4,
                              count_inc=count_inc, decay_dtype=jnp.bfloat16)
        words = jnp.stack([count_inc.astype(jnp.uint32), jnp.uint32(7)])
        new_p, mus, nus = [], [], []
        shared = K.stream_keys(words, words, 0)
        for i, (pi, gi, m, n) in enumerate(zip(p, g, adam.mu, adam.nu)):
            if isinstance(m, QuantizedTensor):
                keys = K.stream_keys(words, words, i) if keys_per_leaf else shared
                pi, m, n = K.adamw_8bit_pallas(gi, pi, m, n, h, keys,
                                        decay_bf16=True, config=config, param_in_place=True,
                                        interpret=jax.default_backend() != "gpu")
            new_p.append(pi)
            mus.append(m)
            nus.append(n)
        inner = adam._replace(count=count_inc, mu=mus, nu=nus)
        return new_p, (s[0]._replace(inner_state=inner), *s[1:])

    return step


def variants():
    """(name, optimizer factory, params dtype, grads dtype[, step builder])."""
    from qjax.pallas.adamw_8bit import AdamwKernelConfig as Config

    f32, bf16 = jnp.float32, jnp.bfloat16
    lr = 1e-4
    int8_sr = lambda: qo.adamw(lr, state_fmt="int8", params="bf16_sr", fused=False)
    fp8_sr = lambda: qo.adamw(lr, state_fmt="fp8", params="bf16_sr", fused=False)
    return [
        ("optax.adamw fp32", lambda: optax.adamw(lr), f32, f32),
        ("qjax adamw (no options)", lambda: qo.adamw(lr), f32, f32),
        ("int8 state + bf16_sr", int8_sr, bf16, bf16),  # the composable chain
        ("int8 state + bf16_sr (fused kernel)",
         lambda: qo.adamw(lr, state_fmt="int8", params="bf16_sr", fused=None), bf16, bf16),
        ("int8 fused kernel only", int8_sr, bf16, bf16, kernel_only_step(Config())),
        ("int8 fused kernel only, arith decode", int8_sr, bf16, bf16,
         kernel_only_step(Config(decode="arith"))),  # (launch configurations: adamw_kernel_costs.py)
        ("int8 state, fp32 params (fused)", lambda: qo.adamw(lr, state_fmt="int8", fused=None),
         f32, f32),
        ("int8 state + bf16_sr, rbg", lambda: qo.adamw(lr, state_fmt="int8", params="bf16_sr",
                                                        prng_impl="unsafe_rbg", fused=False),
         bf16, bf16),
        ("int8 nearest + bf16_sr", lambda: qo.adamw(lr, state_fmt="int8", params="bf16_sr",
                                                     state_rounding="nearest"), bf16, bf16),
        ("int8 nearest + bf16 RTN", lambda: qo.adamw(lr, state_fmt="int8", params="bf16",
                                                      state_rounding="nearest"), bf16, bf16),
        ("fp8 state + bf16_sr", fp8_sr, bf16, bf16),  # the composable chain
        ("fp8 state + bf16_sr (fused kernel)",
         lambda: qo.adamw(lr, state_fmt="fp8", params="bf16_sr", fused=True), bf16, bf16),
        ("fp8 fused kernel only", fp8_sr, bf16, bf16, kernel_only_step(Config())),
        ("fp8 state, fp32 params", lambda: qo.adamw(lr, state_fmt="fp8"), f32, f32),
        ("int4 state + bf16_sr", lambda: qo.adamw(lr, state_fmt="int4", params="bf16_sr"), bf16, bf16),
        ("int8 state + bf16_kahan", lambda: qo.adamw(lr, state_fmt="int8", params="bf16_kahan"), bf16, bf16),
        ("fp32 state + bf16_sr", lambda: qo.adamw(lr, params="bf16_sr"), bf16, bf16),
    ]


def run_benchmark(args):
    if args.small:
        shapes = llama_like_shapes(layers=1, hidden=256, mlp=1024, vocab=4096, embedding=args.embedding)
    else:
        shapes = llama_like_shapes(layers=args.layers, embedding=args.embedding)
    n = sum(int(np.prod(s)) for _, s in shapes)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}); {len(shapes)} tensors, {n:,} parameters")
    bw = copy_bandwidth(256 * 2**20 if args.small else 4 * 2**30, args.warmup, args.iters)
    print(f"device-to-device copy (x + 1 over {'256 MiB' if args.small else '4 GiB'}): {bw / 1e9:,.0f} GB/s\n")
    header = f"{'variant':28s} {'ms':>9s} {'B/param':>8s} {'GB/s':>7s} {'% copy':>7s} {'x optax':>8s}"
    if args.hlo:
        header += f" {'kernels':>8s}"
    print(header)
    print("-" * len(header))
    base = None
    selected = [v for v in variants() if not args.only or any(s in v[0] for s in args.only)]
    for name, factory, p_dtype, g_dtype, *custom in selected:
        opt = factory()
        params = random_tree(shapes, p_dtype, 0.02, seed=0)
        grads = random_tree(shapes, g_dtype, 1e-3, seed=1)
        state = jax.jit(opt.init)(params)

        step = custom[0] if custom else optax_step(opt)

        fn = jax.jit(step, donate_argnums=(0, 2))
        kernels = None
        if args.hlo:
            kernels = count_kernels(fn.lower(params, grads, state).compile().as_text())
        p_bytes, g_bytes, s_bytes = tree_bytes(params), tree_bytes(grads), tree_bytes(state)
        moved = 2 * p_bytes + g_bytes + 2 * s_bytes  # read p, g, state; write p, state
        t, (params, state) = median_time(fn, (params, grads, state), args.warmup, args.iters,
                                         args.chain)
        base = t if base is None else base
        gbs = moved / t / 1e9
        line = (f"{name:28s} {t * 1e3:9.3f} {moved / n:8.2f} {gbs:7.0f} {100 * moved / t / bw:6.1f}% "
                f"{t / base:8.3f}")
        if kernels is not None:
            line += f" {kernels:8d}"
        print(line, flush=True)
        del params, grads, state, fn
        gc.collect()
    print("\nB/param: bytes read and written per parameter per step (params + grads + state, scales,"
          "\nkeys and Kahan buffers included). x optax: time relative to the first row."
          "\nThrough optax's API the fused path also writes the bf16 weights that apply_updates then"
          "\nreads with the old weights (+6 B/param not counted in B/param); 'kernel only' rows skip it.")


# --------------------------------------------------------------------------- CPU convergence table


def convergence_task(n=1024, d_in=32, hidden=128, d_out=32, noise=0.1):
    """The teacher-student MLP regression of tests/test_optim.py."""
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


def train(opt, params, loss, steps):
    def step(carry, _):
        p, s = carry
        u, s = opt.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, u), s), None

    @jax.jit
    def run(p):
        (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
        return loss(p), p

    final, p = run(params)
    return float(final), p


def run_convergence(args):
    params, loss = convergence_task()
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    steps = args.steps
    print(f"teacher-student MLP regression, {sum(p.size for p in jax.tree.leaves(params)):,} params, "
          f"{steps} steps; initial loss {float(loss(params)):.4f}\n")
    settings = [("lr 3e-3 cosine", optax.cosine_decay_schedule(3e-3, steps)), ("lr 3e-4 constant", 3e-4),
                ("lr 1e-4 constant", 1e-4)]
    for title, lr in settings:
        base, _ = train(optax.adamw(lr), params, loss, steps)
        print(f"{title}: optax.adamw fp32 final loss {base:.5f}")
        rows = [(f"{fmt} state, {r}", qo.adamw(lr, state_fmt=fmt, state_rounding=r), params)
                for fmt in ("int8", "fp8", "int4") for r in ("stochastic", "nearest")]
        rows += [(f"bf16 weights, {m}", qo.adamw(lr, params=m), bf16)
                 for m in ("bf16_sr", "bf16_kahan", "bf16")]
        rows += [("int8 state + bf16_sr", qo.adamw(lr, state_fmt="int8", params="bf16_sr"), bf16)]
        for name, opt, p0 in rows:
            final, p = train(opt, p0, loss, steps)
            unchanged = ""
            if p0 is bf16:
                frac = float(np.mean(np.asarray(p["l2"]["w"] == bf16["l2"]["w"])))
                unchanged = f"   ({100 * frac:.0f}% of l2 weights never changed)"
            print(f"  {name:26s} {final:.5f}  {100 * (final / base - 1):+6.2f}%{unchanged}", flush=True)
        print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes: a CPU smoke check")
    parser.add_argument("--layers", type=int, default=16, help="Llama-like layers (16: 1.07B "
                        "parameters; fewer compile faster, same bytes per parameter)")
    parser.add_argument("--embedding", action="store_true", help="add the 128256x2048 embedding")
    parser.add_argument("--hlo", action="store_true", help="count the kernels of each compiled update")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 5; --small 1)")
    parser.add_argument("--iters", type=int, default=None, help="timed runs (default 30; --small 3)")
    parser.add_argument("--chain", type=int, default=10, help="steps dispatched back to back per "
                        "timed sample (1: each step waits for the last, host dispatch included)")
    parser.add_argument("--only", nargs="*", help="run the variants whose name contains one of these")
    parser.add_argument("--convergence", action="store_true", help="print the CPU convergence table")
    parser.add_argument("--steps", type=int, default=200, help="training steps for --convergence")
    args = parser.parse_args()
    args.warmup = (1 if args.small else 5) if args.warmup is None else args.warmup
    args.iters = (3 if args.small else 30) if args.iters is None else args.iters
    if args.convergence:
        run_convergence(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
