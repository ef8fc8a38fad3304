"""Quantize one tensor to every named format and print the error and the storage cost.

    python examples/quantize_demo.py [--rows 1024] [--cols 4096]
"""

import argparse

import jax
import jax.numpy as jnp

import qjax


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args()
    # Heavy-tailed activations (Student-t, 3 degrees of freedom) with a few outlier channels, as
    # LLM activations have.
    key_values, key_channels = jax.random.split(jax.random.key(0))
    x = jax.random.t(key_values, 3.0, (args.rows, args.cols))
    x = x.at[:, :8].multiply(30.0)
    x = x.astype(jnp.bfloat16)
    reference = x.astype(jnp.float32)
    print(f"x: {args.rows}x{args.cols} bf16, Student-t(3) with 8 outlier channels; devices: {jax.devices()}")
    print(f"{'format':12s} {'bits/value':>10s} {'rel. error':>10s} {'SNR dB':>7s} {'bytes packed':>12s}")
    for name in qjax.formats.names():
        q = qjax.quantize(x, name, axis=-1)
        error = q.dequantize(jnp.float32) - reference
        relative = float(jnp.linalg.norm(error) / jnp.linalg.norm(reference))
        snr = -20 * jnp.log10(relative) if relative > 0 else float("inf")
        bits = 8 * q.nbytes_packed / x.size
        print(f"{name:12s} {bits:10.3f} {relative:10.4f} {float(snr):7.1f} {q.nbytes_packed:12d}")


if __name__ == "__main__":
    main()
