"""A Llama-style decoder whose projections are qjax layers.

Pre-norm blocks (Touvron et al., "LLaMA", arXiv:2302.13971): RMSNorm (Zhang & Sennrich,
arXiv:1910.07467), rotary position embeddings (Su et al., "RoFormer", arXiv:2104.09864) on
queries and keys, causal self-attention, and a SwiGLU MLP (Shazeer, "GLU Variants Improve
Transformer", arXiv:2002.05202). Queries/keys/values come from one fused projection and the
SwiGLU gate and up projections from another (fewer, larger GEMMs; the same parameters as separate
layers, concatenated). Every projection is made by :func:`dense`, the one line that decides which
layer the model uses. The embedding lookup is exact; the output head runs with ``head_recipe``
(``"bf16"`` by default, as the FP4/FP8 training papers keep it in high precision).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jax.sharding import PartitionSpec as P

import qjax

from lm import variants
from lm.sharding import BATCH_AXES, SCANNED

FLAX = "flax"  # pseudo-recipe: plain flax.linen layers, no qjax (the twin the speed bar uses)
ATTENTION_CHOICES = ("auto", "cudnn", "xla", "quantized")


def dense(features: int, recipe: str, **dense_kwargs: Any) -> nn.Module:
    """Every projection of the model: ``qjax.dense``, a drop-in for ``flax.linen.Dense`` (same
    parameters); ``recipe`` is a qjax recipe name or one of :mod:`lm.variants`, and ``"flax"``
    gives ``flax.linen.Dense`` itself.

    Example:
      >>> layer = dense(64, "mxfp8", use_bias=False)
    """
    if recipe == FLAX:
        return nn.Dense(features, **dense_kwargs)
    return qjax.dense(features, recipe=variants.resolve(recipe), **dense_kwargs)


def embed(num_embeddings: int, features: int, head_recipe: str, **embed_kwargs: Any) -> nn.Module:
    """The token embedding; with tied embeddings its ``attend`` is the output head, run with
    ``head_recipe`` (``qjax.nn.Embed``, same parameters as ``flax.linen.Embed``)."""
    if head_recipe == FLAX:
        return nn.Embed(num_embeddings, features, **embed_kwargs)
    return qjax.nn.Embed(num_embeddings, features, recipe=variants.resolve(head_recipe),
                         **embed_kwargs)


@jax.custom_vjp
def _take_rows(table: Float[Array, "v d"], tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
    return jnp.take(table, tokens, axis=0)


def _take_rows_forward(table, tokens):
    # A zero-size (rows, 0) array carries the table's row count and dtype to the backward pass.
    return _take_rows(table, tokens), (tokens, jnp.zeros((table.shape[0], 0), table.dtype))


def _split_like_the_batch(x: Array) -> Array:
    """``x`` split along its leading (batch) axis over the mesh's batch axes when the step is
    traced under a mesh (``lm.sharding``); unchanged otherwise."""
    axes = tuple(a for a in BATCH_AXES if a in jax.sharding.get_abstract_mesh().axis_names)
    return jax.lax.with_sharding_constraint(x, P(axes)) if axes else x


def _take_rows_backward(residuals, cotangent):
    tokens, like = residuals
    rows = like.shape[0]
    # Without the hint, XLA's SPMD partitioner all-gathers the cotangent (tokens x width) to
    # build a vocabulary-sharded gradient; with both operands split by batch it reduces the
    # partial [vocab, width] sums instead.
    one_hot = _split_like_the_batch(jax.nn.one_hot(tokens, rows, dtype=cotangent.dtype))
    cotangent = _split_like_the_batch(cotangent)
    grad = jnp.einsum("btv,btd->vd", one_hot, cotangent, preferred_element_type=jnp.float32)
    return grad.astype(like.dtype), None


_take_rows.defvjp(_take_rows_forward, _take_rows_backward)


def lookup(embedding: nn.Embed, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
    """``embedding(tokens)`` (the same gather) whose gradient is a one-hot matmul instead of the
    scatter-add of a gather's transpose. With a byte-level vocabulary every one of the 65k tokens
    of a step adds into one of a few hundred rows; that scatter took 90 of the 124 ms of a
    small-preset step on an H100. The matmul sums in float32. (A one-hot matmul in the forward
    pass too would be simpler, but it makes XLA's SPMD partitioner all-gather activations when
    the table is FSDP-sharded along the vocabulary.)

    Example:
      >>> module = nn.Embed(8, 4)
      >>> params = module.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))
      >>> tokens = jnp.array([[3, 1]])
      >>> out = module.apply(params, tokens, method=lambda m, t: lookup(m, t))
      >>> bool(jnp.all(out == module.apply(params, tokens)))
      True
    """
    table = embedding.embedding.astype(embedding.dtype or embedding.embedding.dtype)
    return _take_rows(table, tokens)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the decoder.

    Attributes:
      vocab_size: rows of the embedding / columns of the output head (padded vocabulary).
      d_model: residual width.
      num_layers: decoder blocks.
      num_heads: attention heads (``d_model / num_heads`` per head).
      mlp_hidden: SwiGLU hidden width.
      recipe: the recipe of every projection inside the blocks: a ``qjax.recipes`` name, an
        :mod:`lm.variants` name, or ``"flax"`` (plain Flax layers).
      head_recipe: the recipe of the output head (``"bf16"``; ``"flax"`` with ``recipe="flax"``).
      tie_embeddings: output head = embedding matrix transposed.
      attention: ``"auto"`` (cuDNN flash attention on a GPU when dtype and head size allow, XLA
        otherwise), ``"cudnn"``, ``"xla"``, or ``"quantized"`` (QKᵀ and PV through
        ``qjax.nn.dot_product_attention`` with ``recipe``).
      dtype: compute dtype (parameters stay in ``param_dtype``).
      param_dtype: parameter dtype.
      rope_theta: RoPE base.
      remat: recompute each block in the backward pass (saves activation memory).
      scan_layers: run the blocks as one ``flax.linen.scan`` over parameters stacked along a
        leading layer axis (under ``blocks/block``) instead of ``block_0`` .. ``block_{L-1}``:
        XLA compiles one block instead of L, which matters most for quantizing recipes (each
        projection carries up to six quantizers). Same model, different parameter tree; the
        step is slower (bf16 at the base preset on an H200: 68.0 vs 48.5 ms).
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    mlp_hidden: int
    recipe: str = "bf16"
    head_recipe: str = "bf16"
    tie_embeddings: bool = False
    attention: str = "auto"
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    rope_theta: float = 10000.0
    remat: bool = False
    scan_layers: bool = False

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of num_heads "
                             f"{self.num_heads}.")
        if self.head_dim % 2:
            raise ValueError(f"head size {self.head_dim} must be even (RoPE rotates pairs).")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"unknown attention {self.attention!r}; valid: "
                             f"{', '.join(ATTENTION_CHOICES)}.")
        for name in (self.recipe, self.head_recipe):
            if name != FLAX:
                qjax.recipes.get(variants.resolve(name))  # unknown names raise with valid ones
        if self.attention == "quantized" and self.recipe == FLAX:
            raise ValueError("attention='quantized' needs a qjax recipe, not 'flax'.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul (every projection and the output head)."""
        attention = 4 * self.d_model * self.d_model
        mlp = 3 * self.d_model * self.mlp_hidden
        return self.num_layers * (attention + mlp) + self.d_model * self.vocab_size

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6·N + 12·L·d·T (N matmul parameters; the attention term
        counts the full T x T score matrix), the convention of PaLM's MFU (Chowdhery et al.,
        arXiv:2204.02311, appendix B)."""
        return 6.0 * self.matmul_params() + 12.0 * self.num_layers * self.d_model * seq_len


def rotary(x: Float[Array, "b t h d"], theta: float) -> Float[Array, "b t h d"]:
    """Rotary position embedding (rotate-half form), angles computed in float32.

    Example:
      >>> rotary(jnp.ones((1, 4, 2, 8)), 10000.0).shape
      (1, 4, 2, 8)
    """
    length, size = x.shape[1], x.shape[-1]
    inverse_frequencies = theta ** (-jnp.arange(0, size, 2, dtype=jnp.float32) / size)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inverse_frequencies[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_implementation(choice: str, q: Array) -> str:
    """``"cudnn"`` or ``"xla"`` for ``jax.nn.dot_product_attention`` (``choice`` ``"auto"``:
    cuDNN when the backend is a GPU, the dtype bf16/fp16 and the head size a multiple of 8 up to
    128, which cuDNN's fused attention needs)."""
    if choice != "auto":
        return choice
    on_gpu = jax.default_backend() == "gpu"
    fits = q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128
    return "cudnn" if on_gpu and fits else "xla"


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        c = self.config
        batch, length, _ = x.shape
        init = nn.initializers.normal(0.02)
        qkv = dense(3 * c.d_model, c.recipe, use_bias=False, dtype=c.dtype,
                    param_dtype=c.param_dtype, kernel_init=init, name="qkv")(x)
        q, k, v = jnp.moveaxis(qkv.reshape(batch, length, 3, c.num_heads, c.head_dim), 2, 0)
        q, k = rotary(q, c.rope_theta), rotary(k, c.rope_theta)
        if c.attention == "quantized":
            recipe = qjax.recipes.get(variants.resolve(c.recipe))
            key = self.make_rng(qjax.nn.QUANT_STREAM) if recipe.needs_key else None
            mask = nn.make_causal_mask(jnp.ones((batch, length), jnp.bool_))
            out = qjax.nn.dot_product_attention(q, k, v, mask=mask, recipe=recipe,
                                                quant_key=key, dtype=q.dtype)
        else:
            out = jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation=attention_implementation(c.attention, q))
        out_init = nn.initializers.normal(0.02 / (2 * c.num_layers) ** 0.5)
        return dense(c.d_model, c.recipe, use_bias=False, dtype=c.dtype,
                     param_dtype=c.param_dtype, kernel_init=out_init,
                     name="out")(out.reshape(batch, length, c.d_model))


class SwiGLU(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        c = self.config
        gate_up = dense(2 * c.mlp_hidden, c.recipe, use_bias=False, dtype=c.dtype,
                        param_dtype=c.param_dtype, kernel_init=nn.initializers.normal(0.02),
                        name="gate_up")(x)
        gate, up = jnp.split(gate_up, 2, axis=-1)
        out_init = nn.initializers.normal(0.02 / (2 * c.num_layers) ** 0.5)
        return dense(c.d_model, c.recipe, use_bias=False, dtype=c.dtype,
                     param_dtype=c.param_dtype, kernel_init=out_init,
                     name="down")(nn.silu(gate) * up)


class Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        c = self.config
        norm = lambda name: nn.RMSNorm(1e-5, dtype=c.dtype, param_dtype=c.param_dtype,  # noqa: E731
                                       name=name)
        x = x + Attention(c, name="attention")(norm("attention_norm")(x))
        return x + SwiGLU(c, name="mlp")(norm("mlp_norm")(x))


class _ScannedBlock(nn.Module):
    """One step of the layer scan: ``(x, None) -> (block(x), None)``."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Float[Array, "b t d"], _) -> tuple[Float[Array, "b t d"], None]:
        block = nn.remat(Block) if self.config.remat else Block
        return block(self.config, name="block")(x), None


class Decoder(nn.Module):
    """The language model: tokens ``[batch, length]`` -> logits ``[batch, length, vocab]``.

    Example:
      >>> config = ModelConfig(384, 64, 2, 2, 192)
      >>> tokens = jnp.zeros((2, 16), jnp.int32)
      >>> params = Decoder(config).init(jax.random.key(0), tokens)["params"]
      >>> Decoder(config).apply({"params": params}, tokens).shape
      (2, 16, 384)
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t v"]:
        c = self.config
        embedding = embed(c.vocab_size, c.d_model, c.head_recipe, dtype=c.dtype,
                          param_dtype=c.param_dtype,
                          embedding_init=nn.initializers.normal(0.02), name="embed")
        x = lookup(embedding, tokens)
        if c.scan_layers:
            stacked = {"params": 0, qjax.nn.SCALING_COLLECTION: 0, qjax.nn.STATS_COLLECTION: 0}
            blocks = nn.scan(_ScannedBlock, variable_axes=stacked, length=c.num_layers,
                             split_rngs={"params": True, qjax.nn.QUANT_STREAM: True})
            x, _ = blocks(c, name=SCANNED)(x, None)
        else:
            block = nn.remat(Block) if c.remat else Block
            for i in range(c.num_layers):
                x = block(c, name=f"block_{i}")(x)
        x = nn.RMSNorm(1e-5, dtype=c.dtype, param_dtype=c.param_dtype, name="final_norm")(x)
        if c.tie_embeddings:
            return embedding.attend(x)
        return dense(c.vocab_size, c.head_recipe, use_bias=False, dtype=c.dtype,
                     param_dtype=c.param_dtype, kernel_init=nn.initializers.normal(0.02),
                     name="lm_head")(x)
