"""Tests of qjax.recipes: the Recipe data, the registry and the named recipes' contents."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import formats as F
from qjax import recipes as R

NAMED = ("bf16", "fp8", "fp8_blockwise", "mxfp8", "mxfp4", "nvfp4", "fp4_all_the_way", "quest",
         "quartet", "bitnet158", "switchback", "int8")
PAPER_WORDS = {  # a word of each recipe's paper that its description must name
    "bf16": "Micikevicius", "fp8": "FP8 Formats for Deep Learning", "fp8_blockwise": "DeepSeek-V3",
    "mxfp8": "MXFP8", "mxfp4": "Tseng", "nvfp4": "Pretraining Large Language Models with NVFP4",
    "fp4_all_the_way": "Chmiel", "quest": "QuEST", "quartet": "Quartet", "bitnet158": "1.58",
    "switchback": "Wortsman", "int8": "INT8",
}


def test_every_named_recipe_is_registered_and_described():
    assert set(R.names()) == set(NAMED)
    for name in NAMED:
        recipe = R.get(name)
        assert recipe.name == name
        assert PAPER_WORDS[name] in R.DESCRIPTIONS[name]
        hash(recipe)  # recipes are static arguments of jit


def test_unknown_recipe_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown recipe 'fp3'.*mxfp8.*nvfp4"):
        R.get("fp3")


def test_get_returns_a_recipe_unchanged_and_replace_builds_new_ones():
    r = R.get("nvfp4")
    assert R.get(r) is r
    mine = dataclasses.replace(r, name="mine", wgrad=dataclasses.replace(r.wgrad, transform=None))
    assert mine.wgrad.transform is None and r.wgrad.transform == "random_hadamard"
    assert mine != r and hash(mine) != hash(r)


@pytest.mark.parametrize("kwargs, match", [
    ({"rounding": "up"}, "unknown rounding 'up'; valid: nearest, stochastic"),
    ({"scale_mode": "ceil"}, "unknown scale_mode 'ceil'; valid: floor, rceil"),
    ({"estimator": "magic"}, "unknown estimator 'magic'; valid: ste, clipped_ste"),
    ({"prescale": 1.5}, r"prescale must be a number in \(0, 1\]"),
    ({"prescale": 0.75, "estimator": "quest"}, "prescale applies to plain"),
])
def test_operand_spec_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.OperandSpec("mxfp4", **kwargs)


def test_operand_spec_unknown_format_lists_formats():
    with pytest.raises(ValueError, match="unknown format 'fp5'.*mxfp4"):
        R.OperandSpec("fp5")


def test_gemm_and_recipe_errors():
    with pytest.raises(ValueError, match="unknown transform 'dct'"):
        R.GemmSpec(transform="dct")
    with pytest.raises(ValueError, match="hadamard_block_size must be a power of two"):
        R.GemmSpec(transform="hadamard", hadamard_block_size=24)
    with pytest.raises(ValueError, match="unknown save_for_backward 'fp8'"):
        R.Recipe("x", save_for_backward="fp8")
    with pytest.raises(ValueError, match="accumulation_dtype must be a float"):
        R.Recipe("x", accumulation_dtype="int32")
    quest = R.OperandSpec("mxfp4", estimator="quest")
    with pytest.raises(ValueError, match="backward GEMMs are not differentiated"):
        R.Recipe("x", dgrad=R.GemmSpec(quest, quest))


def test_estimator_options_dict_is_stored_hashable():
    spec = R.OperandSpec("mxfp4", estimator="clipped_ste", estimator_options={"b": 2, "a": 1})
    assert spec.estimator_options == (("a", 1), ("b", 2))
    hash(spec)


def test_needs_key_and_quantizes():
    assert not R.get("bf16").quantizes and not R.get("bf16").needs_key
    for name in ("fp8", "fp8_blockwise", "mxfp8", "bitnet158", "switchback", "int8"):
        assert R.get(name).quantizes and not R.get(name).needs_key, name
    for name in ("mxfp4", "nvfp4", "fp4_all_the_way", "quartet"):
        assert R.get(name).needs_key, name
    rht_only = R.Recipe("rht", forward=R.GemmSpec(transform="random_hadamard"))
    assert rht_only.needs_key and rht_only.quantizes


def _fmt(spec):
    return None if spec.fmt is None else spec.fmt


def test_named_recipe_contents_follow_their_papers():
    fp8 = R.get("fp8")
    assert fp8.forward.lhs.fmt.name == fp8.forward.rhs.fmt.name == "fp8_e4m3"
    assert fp8.dgrad.lhs.fmt.name == fp8.wgrad.rhs.fmt.name == "fp8_e5m2"  # dY in E5M2
    blockwise = R.get("fp8_blockwise")
    assert blockwise.forward.lhs.fmt.scaling.granularity == F.Block(128)
    assert blockwise.forward.rhs.fmt.scaling.granularity == F.Tile(128, 128)
    assert blockwise.dgrad.rhs.fmt.scaling.granularity == F.Tile(128, 128)
    mx = R.get("mxfp4")
    assert not mx.forward.quantizes
    for gemm in (mx.dgrad, mx.wgrad):
        assert gemm.transform == "random_hadamard"
        for spec in (gemm.lhs, gemm.rhs):
            assert (spec.fmt.name, spec.rounding, spec.prescale) == ("mxfp4", "stochastic", 0.75)
    nv = R.get("nvfp4")
    assert nv.forward.rhs.fmt.scaling.granularity == F.Tile(16, 16)
    assert nv.forward.lhs.rounding == nv.forward.rhs.rounding == "nearest"
    assert nv.dgrad.lhs.rounding == nv.wgrad.rhs.rounding == "stochastic"  # SR on dY
    assert nv.wgrad.transform == "random_hadamard" and nv.wgrad.hadamard_block_size == 16
    assert nv.dgrad.transform is None and nv.forward.transform is None
    bit = R.get("bitnet158")
    assert bit.forward.rhs.fmt.name == "ternary" and bit.forward.lhs.fmt.name == "int8"
    sb = R.get("switchback")
    assert not sb.wgrad.quantizes and sb.dgrad.quantizes
    assert isinstance(sb.forward.rhs.fmt.scaling.granularity, F.PerTensor)
    quartet = R.get("quartet")
    assert quartet.forward.lhs.estimator == "quest" and quartet.forward.transform == "hadamard"
    assert quartet.dgrad.lhs.rounding == "stochastic"


def test_table_has_a_row_per_recipe_gemm_operand():
    rows = [r for r in R.table().splitlines()[2:]]
    assert len(rows) == 6 * len(NAMED)
    assert "| nvfp4 | wgrad | dY | nvfp4 | stochastic | random_hadamard (16) | - |" in rows


def test_docs_table_matches_the_code():
    """docs/recipes.md carries the generated table; regenerate it when a recipe changes."""
    import pathlib

    doc = pathlib.Path(__file__).parent.parent / "docs" / "recipes.md"
    assert R.table() in doc.read_text()


def test_recipes_are_jit_static_arguments():
    @jax.jit
    def f(x):
        return qjax.ops.dot_general(x, x.T, (((1,), (0,)), ((), ())), recipe=R.get("mxfp8"))

    assert f(jnp.ones((4, 32))).shape == (4, 4)
    np.testing.assert_array_equal(f(jnp.ones((4, 32))), 32.0)
