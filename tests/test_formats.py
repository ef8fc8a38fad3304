import dataclasses
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

from qjax import formats as F

ML_DTYPES = {
    F.FloatEncoding(4, 3, "fn"): ml_dtypes.float8_e4m3fn,
    F.FloatEncoding(5, 2, "ieee"): ml_dtypes.float8_e5m2,
    F.FloatEncoding(3, 2, "none"): ml_dtypes.float6_e3m2fn,
    F.FloatEncoding(2, 3, "none"): ml_dtypes.float6_e2m3fn,
    F.FloatEncoding(2, 1, "none"): ml_dtypes.float4_e2m1fn,
    F.FloatEncoding(8, 7, "ieee"): ml_dtypes.bfloat16,
    F.FloatEncoding(5, 10, "ieee"): np.float16,
}


@pytest.mark.parametrize("encoding", list(ML_DTYPES), ids=lambda e: e.name)
def test_float_encoding_constants_match_ml_dtypes(encoding):
    info = ml_dtypes.finfo(ML_DTYPES[encoding])
    assert encoding.max == float(info.max)
    assert encoding.min_normal == float(info.smallest_normal)
    assert encoding.min_subnormal == float(info.smallest_subnormal)
    assert encoding.epsilon == float(info.eps)
    assert encoding.bits == info.bits


def test_named_formats_have_the_documented_structure():
    assert F.get("mxfp4").element == F.FloatEncoding(2, 1, "none")
    assert F.get("mxfp8").element == F.FloatEncoding(4, 3, "fn")
    for name in ("mxfp8", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8"):
        fmt = F.get(name)
        assert fmt.scaling.granularity == F.Block(32) and fmt.scaling.scale == F.E8M0
    nvfp4 = F.get("nvfp4")
    assert nvfp4.scaling.granularity == F.Block(16)
    assert nvfp4.scaling.scale == F.E4M3 and nvfp4.scaling.tensor_scale
    assert F.get("mxint8").element.max == 127 / 64
    assert F.get("bf16").scaling is None and F.get("bf16").native_dtype == jax.numpy.bfloat16
    assert set(F.names()) >= {"fp8_e4m3", "fp8_e5m2", "mxfp8", "mxfp8_e5m2", "mxfp6_e3m2",
                              "mxfp6_e2m3", "mxfp4", "mxint8", "nvfp4", "int8", "int4",
                              "ternary", "binary", "bf16", "fp16"}


def test_bits_per_value_counts_scales():
    assert F.get("mxfp4").bits_per_value() == 4.25
    assert F.get("nvfp4").bits_per_value() == 4.5
    assert F.get("nvfp4").bits_per_value(elements_per_tensor=1024) == 4.5 + 32 / 1024
    assert F.get("bf16").bits_per_value() == 16


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown format 'mxfp5'.*mxfp4.*nvfp4"):
        F.get("mxfp5")


def test_formats_are_hashable_static_arguments():
    fmt = F.float_format(3, 4)
    assert hash(fmt) == hash(F.float_format(3, 4))
    f = jax.jit(lambda x, fmt: x * fmt.element.max, static_argnums=1)
    assert float(f(np.float32(1), fmt)) == fmt.element.max


def test_custom_formats_and_registry():
    e1m2 = F.float_format(1, 2, block_size=16)
    assert e1m2.element.max == 3.5 and e1m2.block_size == 16
    mine = dataclasses.replace(F.get("mxfp4"), name="my_mxfp4_b16",
                               scaling=F.Scaling(F.Block(16), F.E8M0))
    F.register(mine)
    assert F.get("my_mxfp4_b16") is mine
    with pytest.raises(ValueError, match="already registered"):
        F.register(dataclasses.replace(mine, element=F.FloatEncoding(3, 2)))


@pytest.mark.parametrize("bad", [
    lambda: F.FloatEncoding(0, 3),
    lambda: F.FloatEncoding(4, 3, "nan"),
    lambda: F.IntEncoding(9),
    lambda: F.ScaleEncoding("e3m0"),
    lambda: F.Block(0),
    lambda: F.Scaling(F.Block(16), F.FP32, tensor_scale=True),
    lambda: F.Format("x", F.IntEncoding(8), None),
])
def test_invalid_definitions_raise(bad):
    with pytest.raises(ValueError):
        bad()


def test_tile_needs_two_dimensions():
    with pytest.raises(ValueError, match="rank >= 2"):
        F.Tile(16, 16).block_shape((64,), 0)
    with pytest.raises(ValueError, match="last two axes"):
        F.Tile(16, 16).block_shape((4, 64, 64), 0)
    assert F.Tile(128, 16).block_shape((2, 256, 64), 1) == (1, 128, 16)


def test_module_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "qjax.formats"], capture_output=True, text=True,
                         check=True).stdout
    assert "| mxfp4 | e2m1 | 1x32 e8m0 | 4.25 | 6 |" in out
    assert "| nvfp4 | e2m1 | 1x16 e4m3 + fp32 tensor | 4.5 |" in out
