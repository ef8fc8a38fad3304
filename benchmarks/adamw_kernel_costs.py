"""What each part of the fused AdamW kernel costs on the GPU (issue 7): launch configurations and
ablations, against ``optax.adamw`` (fp32) in the same run.

    python benchmarks/adamw_kernel_costs.py --layers 4
    python benchmarks/adamw_kernel_costs.py --layers 4 --configs 8x4,4x4,2x2 --no-ablations
    python benchmarks/adamw_kernel_costs.py --configs 16x8 --ablate-configs 4x4,16x8 --ablations "copy only"
    ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
        python benchmarks/adamw_kernel_costs.py --profile --ablations "copy only"

An ablation swaps one part of the kernel for a trivial stand-in of the same inputs and outputs
(results are wrong, only the time means something): ``no hash`` (random bits = the index),
``cheap encode`` (codes = a cast), ``cheap adam`` (three products instead of Adam), ``io only``
(all three: what the loads, decoding, block statistics and stores alone cost), ``copy only``
(each input tile copied to its output: the memory floor of this tiling), ``keys once`` (the
same stream keys for every tensor: what deriving them per tensor in XLA costs), ``decade
selects`` (the encoder's two per-decade constants from select chains instead of table loads:
the same results) and ``no neighbour loads`` (the two neighbouring code values made up from the
index instead of loaded from the table). ``--state-fmt
fp8`` times ``no hash``, ``cheap adam``, ``no pow``, ``libdevice powf`` (the kernel's ``x**p``
replaced by ``powf``) and ``pow in every tile`` (no skipping of tiles without an expanded block)
instead.
The difference to the full kernel is what that part costs. Each variant is timed as the
optimizer step over the whole Llama-like tree (``optim_update.kernel_only_step``), median of many
runs after warm-up. The row ``xla io`` moves the same bytes with XLA alone (new weights ``p + g``,
every code, scale and info rewritten): the floor of these arrays without Pallas.

``--profile`` runs only three steps on one 2048x8192 tensor (the first ablation config, with the
first of ``--ablations`` if given), so that ``ncu`` reports each kernel's time and DRAM bytes
(on the whole tree ncu crashed, H100, 2026-12-07).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optim_update as ou
import qjax.optim as qo
from qjax.pallas import adamw_8bit as K


def _cheap_encode(x, absmax, unsigned, u, ops, lookup):
    return (x * absmax + u + unsigned.astype(jnp.float32)).astype(jnp.int32).astype(jnp.uint8)


def _cheap_step(g, w, mu_old, nu_old, h, ops, **_):
    return g * h[8] + w, g * h[0] + mu_old, g * g * h[2] + nu_old


def _copy_kernel(h_ref, k_ref, table_ref, g_ref, p_ref, mc_ref, ms_ref, mi_ref, nc_ref, ns_ref,
                 ni_ref, po_ref, mco_ref, mso_ref, mio_ref, nco_ref, nso_ref, nio_ref, **_):
    po_ref[...] = p_ref[...] + g_ref[...].astype(po_ref.dtype)
    for src, dst in ((mc_ref, mco_ref), (ms_ref, mso_ref), (mi_ref, mio_ref), (nc_ref, nco_ref),
                     (ns_ref, nso_ref), (ni_ref, nio_ref)):
        dst[...] = src[...]


def _decade_constants_by_selects(i, s, lookup):
    """The same constants as ``K._decade_constants_of`` (exactly) from select chains, no loads."""
    scale = K._select(i, [np.float32(256 * 5 ** (7 - d)) for d in range(7)])
    scale = jnp.where(s == 1, scale * 2, scale)  # times a power of two: exact
    offset = K._select(i + s, [np.float32(16 * 2**t - 9) for t in range(8)])
    return scale, offset


def _neighbours_without_loads(lo_index, lookup):
    value = lo_index.astype(jnp.float32) * (1 / 256)
    return value, value + 1 / 256


ABLATIONS = {
    "no hash": {"hash32": lambda x: x},
    "cheap encode": {"_encode": _cheap_encode},
    "cheap adam": {"_step": _cheap_step},
    "io only": {"hash32": lambda x: x, "_encode": _cheap_encode, "_step": _cheap_step},
    "copy only": {"_kernel": _copy_kernel},  # the same tiles in and out (whole tiles only)
    "keys once": {},  # every leaf gets the same stream keys (see kernel_only_step)
    "decade selects": {"_decade_constants_of": _decade_constants_by_selects},  # exact, no loads
    "no neighbour loads": {"_neighbours": _neighbours_without_loads},
}

FP8_ABLATIONS = {  # the int8 encoder's stand-ins do not apply to fp8
    name: ABLATIONS[name] for name in ("no hash", "cheap adam")} | {
    "no pow": {"_pow": lambda x, p: x + p},  # what COAT's expansion costs (4 pow per element)
    # the kernel's pow is exp2(p log2 x); this is what libdevice's powf would cost instead
    "libdevice powf": {"_pow": jax.lax.pow},
    # the pow evaluated in every tile, also where no block of the tile is expanded
    "pow in every tile": {"_per_block": lambda steps, plain, expanded: jnp.where(
        steps == K._state._K_STEPS, plain, expanded())},
}


def xla_io_step():
    """The kernel-only step's reads and writes done by XLA: weights ``p + g``, each moment's codes,
    scales and block info rewritten (wrong values; only the time means something)."""
    from qjax.optim.state import QuantizedTensor

    def touch(q):
        return dataclasses.replace(q, codes=q.codes + jnp.uint8(1), scales=q.scales * 1.5,
                         block_info=q.block_info ^ jnp.uint8(1))

    def step(p, g, s):
        adam = s[0].inner_state
        quantized = [isinstance(m, QuantizedTensor) for m in adam.mu]
        new_p = [(pi + gi).astype(pi.dtype) if q else pi for pi, gi, q in zip(p, g, quantized)]
        mus = [touch(m) if q else m for m, q in zip(adam.mu, quantized)]
        nus = [touch(n) if q else n for n, q in zip(adam.nu, quantized)]
        inner = adam._replace(count=adam.count + 1, mu=mus, nu=nus)
        return new_p, (s[0]._replace(inner_state=inner), *s[1:])

    return step


@contextlib.contextmanager
def patched(replacements):
    saved = {name: getattr(K, name) for name in replacements}
    for name, fn in replacements.items():
        setattr(K, name, fn)
    K._fused.clear_cache()  # the kernel wrapper is jitted: retrace with the replacements
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(K, name, fn)
        K._fused.clear_cache()


def parse_config(text: str) -> K.AdamwKernelConfig:
    """``BxW`` or ``BxWxdecode`` (e.g. ``8x4``, ``4x2xarith``)."""
    parts = text.split("x")
    decode = parts[2] if len(parts) > 2 else "gather"
    return K.AdamwKernelConfig(int(parts[0]), int(parts[1]), decode=decode)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--configs", default="8x4,4x4,2x2,4x2,1x1,2x1,8x8,16x8")
    parser.add_argument("--ablate-configs", default=None, help="comma-separated configs to time "
                        "each ablation at (default: the kernel's default)")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--ablations", default=None, help="comma-separated names of the ablations "
                        "to time (default: all of the state format's)")
    parser.add_argument("--state-fmt", choices=("int8", "fp8"), default="int8")
    parser.add_argument("--profile", action="store_true", help="only run three steps on one "
                        "2048x8192 tensor (the first ablation config and ablation), for ncu")
    parser.add_argument("--chain", type=int, default=10, help="steps per timed sample "
                        "(optim_update.median_time)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    ablations = {} if args.no_ablations else FP8_ABLATIONS if args.state_fmt == "fp8" else ABLATIONS
    if args.ablations and not args.no_ablations:
        names = args.ablations.split(",")
        unknown = sorted(set(names) - set(ablations))
        if unknown:
            parser.error(f"--ablations: unknown {unknown}; valid for --state-fmt {args.state_fmt}: "
                         f"{', '.join(ablations)}")
        ablations = {name: ablations[name] for name in names}
    ablate_configs = ([parse_config(t) for t in args.ablate_configs.split(",")]
                      if args.ablate_configs else [K.AdamwKernelConfig()])

    shapes = [("w", (2048, 8192))] if args.profile else ou.llama_like_shapes(layers=args.layers)

    def inputs(opt, p_dtype):
        params = ou.random_tree(shapes, p_dtype, 0.02, seed=0)
        grads = ou.random_tree(shapes, p_dtype, 1e-3, seed=1)
        return [params, grads, jax.jit(opt.init)(params)]

    quantized = lambda: qo.adamw(  # noqa: E731
        1e-4, state_fmt=args.state_fmt, params="bf16_sr", fused=False)
    if args.profile:
        params, grads, state = inputs(quantized(), jnp.bfloat16)
        replacements = next(iter(ablations.values())) if args.ablations and ablations else {}
        with patched(replacements):
            fn = jax.jit(ou.kernel_only_step(ablate_configs[0]))
            for _ in range(3):
                params, state = fn(params, grads, state)
            jax.block_until_ready(params)
        return
    n = sum(int(jnp.prod(jnp.array(s))) for _, s in shapes)
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; {n:,} parameters")
    bw = ou.copy_bandwidth(4 * 2**30, args.warmup, args.iters)
    print(f"copy bandwidth {bw / 1e9:,.0f} GB/s")

    def measure(step, data):
        """Times ``step`` on ``data`` (params, grads, state), which it updates in place."""
        fn = jax.jit(step, donate_argnums=(0, 2))
        t, (data[0], data[2]) = ou.median_time(fn, tuple(data), args.warmup, args.iters,
                                                args.chain)
        return t

    base_opt = optax.adamw(1e-4)
    data = inputs(base_opt, jnp.float32)
    base = measure(ou.optax_step(base_opt), data)
    del data
    gc.collect()
    data = inputs(quantized(), jnp.bfloat16)
    params_bytes, grads_bytes, state_bytes = (ou.tree_bytes(x) for x in data)
    moved = 2 * params_bytes + grads_bytes + 2 * state_bytes  # as optim_update.py counts it
    print(f"\n{'variant':34s} {'ms':>8s} {'x optax':>8s} {f'GB/s at {moved / n:.2f} B/param':>22s}")
    print(f"{'optax.adamw fp32':34s} {base * 1e3:8.3f} {1.0:8.3f}")

    def row(name, step):
        try:
            t = measure(step, data)
        except Exception as e:  # noqa: BLE001 (one variant that does not compile must not end the run)
            print(f"{name:34s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
            return
        print(f"{name:34s} {t * 1e3:8.3f} {t / base:8.3f} {moved / t / 1e9:22.0f}", flush=True)

    row("xla io", xla_io_step())
    for text in args.configs.split(","):
        row(f"kernel {text}", ou.kernel_only_step(parse_config(text)))
    if "keys once" in ablations:  # not a patch of the kernel: the step passes the same keys
        cfg = ablate_configs[0]
        row(f"keys once ({cfg.blocks_per_program}x{cfg.warps_for(args.state_fmt)})",
            ou.kernel_only_step(cfg, keys_per_leaf=False))
    for name, replacements in ablations.items():
        if name == "keys once":
            continue
        with patched(replacements):
            for cfg in ablate_configs:
                row(f"{name} ({cfg.blocks_per_program}x{cfg.warps_for(args.state_fmt)})",
                    ou.kernel_only_step(cfg))


if __name__ == "__main__":
    main()
