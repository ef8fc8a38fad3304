"""Every Pallas kernel lowers to Triton for an H100, on a machine without a GPU.

The interpreter tests check what the kernels compute; they cannot see whether Pallas' Triton
lowering accepts the kernel body (primitives without a Triton rule, such as a boolean
``reduce_and``, or a NaN constant bitcast, failed only on the GPU in earlier sessions). Here each
kernel's ``pallas_call`` is lowered for CUDA against an abstract H100, which runs the whole
Pallas-to-Triton lowering and stops before PTX (``ptxas`` needs the GPU toolchain), so CI catches
such failures. Skipped where this JAX cannot lower for an abstract GPU device.
"""

import contextlib
import os
import sys

import jax
import jax.numpy as jnp
import pytest

import qjax
from qjax.pallas import adamw_8bit as K
from qjax.pallas import fake_quant as FQ
from qjax.pallas import hadamard_quant as HQ
from qjax.pallas import quantize as PQ
from qjax.pallas.packed_matmul import pack_weight, packed_matmul
from qjax.pallas.scaled_matmul import scaled_matmul

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_pallas_adamw import kernel_inputs  # noqa: E402

_TRITON_CALL = "__gpu$xla.gpu.triton"


@contextlib.contextmanager
def _abstract_h100():
    try:
        from jax._src.mesh import AbstractDevice
        device = AbstractDevice("NVIDIA H100 80GB HBM3", 132, "gpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                                         abstract_device=device)
        use = jax.sharding.use_abstract_mesh(mesh)
    except (ImportError, TypeError, AttributeError) as e:
        pytest.skip(f"this JAX has no abstract GPU devices to lower for: {e}")
    with use:
        yield


def _lower_for_gpu(fn, *args) -> str:
    """StableHLO text of ``jax.jit(fn)(*args)`` lowered for CUDA on an abstract H100."""
    with _abstract_h100():
        try:
            lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
        except RuntimeError as e:
            if "No supported GPU devices" in str(e):
                pytest.skip(f"this JAX cannot lower Pallas for an abstract GPU: {e}")
            raise
    return lowered.as_text()


def _assert_triton_calls(text: str):
    assert _TRITON_CALL in text, "no Triton kernel in the lowered module"


def _x(shape=(64, 512), dtype=jnp.bfloat16, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


@pytest.mark.parametrize("fmt,rounding,axis", [
    ("mxfp4", "nearest", -1), ("mxfp8", "stochastic", -1), ("nvfp4", "nearest", -1),
    ("nvfp4", "stochastic", 0), ("mxfp6_e3m2", "nearest", 0), ("int4", "nearest", -1),
])
def test_fake_quant_kernel_lowers(fmt, rounding, axis):
    key = jax.random.key(1) if rounding == "stochastic" else None
    split = fmt == "nvfp4"
    text = _lower_for_gpu(lambda x: FQ.fake_quant_pallas(
        x, fmt, rounding=rounding, key=key, axis=axis, split_tensor_scale=split), _x())
    _assert_triton_calls(text)


@pytest.mark.parametrize("fmt,rounding", [("mxfp4", "nearest"), ("mxfp8", "stochastic"),
                                          ("nvfp4", "stochastic")])
def test_quantize_kernel_lowers(fmt, rounding):
    key = jax.random.key(1) if rounding == "stochastic" else None
    text = _lower_for_gpu(lambda x: PQ.quantize_pallas(x, fmt, rounding=rounding, key=key), _x())
    _assert_triton_calls(text)


@pytest.mark.parametrize("fmt,h,axis,rounding,prescale", [
    ("mxfp4", 64, -1, "stochastic", 0.75), ("mxfp4", 32, 0, "nearest", 1.0),
    ("nvfp4", 16, 0, "stochastic", 1.0),
])
def test_hadamard_quant_kernel_lowers(fmt, h, axis, rounding, prescale):
    key = jax.random.key(1) if rounding == "stochastic" else None
    signs = qjax.transforms.random_signs(jax.random.key(2), h)
    text = _lower_for_gpu(lambda x: HQ.hadamard_fake_quant_pallas(
        x, fmt, hadamard_block_size=h, signs=signs, axis=axis, rounding=rounding, key=key,
        prescale=prescale), _x((128, 256)))
    _assert_triton_calls(text)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "int4"])
def test_packed_matmul_kernel_lowers(fmt):
    w = pack_weight(qjax.quantize(_x((512, 256), seed=3), fmt, axis=0))
    text = _lower_for_gpu(lambda x: packed_matmul(x, w), _x((16, 512)))
    _assert_triton_calls(text)


@pytest.mark.parametrize("fmt", ["mxfp8", "mxfp4", "nvfp4"])
def test_scaled_matmul_kernel_lowers(fmt):
    a = qjax.quantize(_x((128, 256), seed=4), fmt, axis=-1)
    b = qjax.quantize(_x((256, 128), seed=5), fmt, axis=0)
    text = _lower_for_gpu(lambda a, b: scaled_matmul(a, b), a, b)
    _assert_triton_calls(text)


@pytest.mark.parametrize("fmt,param_dtype,decode", [
    ("int8", jnp.bfloat16, "gather"), ("int8", jnp.float32, "arith"), ("fp8", jnp.bfloat16, "gather"),
])
def test_adamw_kernel_lowers(fmt, param_dtype, decode):
    g, p, mu, nu, h, keys = kernel_inputs((8, 1024), 6, param_dtype, fmt)
    mode = "bf16_sr" if param_dtype == jnp.bfloat16 else "fp32"
    config = K.AdamwKernelConfig(decode=decode)
    text = _lower_for_gpu(lambda g, p, mu, nu: K.adamw_8bit_pallas(
        g, p, mu, nu, h, keys, param_mode=mode, decay_bf16=mode == "bf16_sr", config=config),
        g, p, mu, nu)
    _assert_triton_calls(text)


def test_a_kernel_that_triton_cannot_lower_fails_here():
    # The check itself can fail: a boolean all-reduce inside a kernel has no Triton lowering.
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = jnp.where(jnp.all(x_ref[...] > 0), x_ref[...], -x_ref[...])

    def fn(x):
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    with pytest.raises(Exception, match="(?i)reduce_and|not implemented|unimplemented"):
        _lower_for_gpu(fn, _x((16, 128), jnp.float32))
