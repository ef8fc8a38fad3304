"""Data-parallel, FSDP and tensor-parallel training of the LM example on JAX's sharding.

A ``--mesh data=N,fsdp=M,tensor=K`` flag builds a :class:`jax.sharding.Mesh` with Auto axes
(qjax's quantized ``dot_general`` rejects ``out_sharding`` under Explicit axes) and a
:class:`MeshPlan` that places every array of the train state with a path-based rule:

* the batch is split over ``("data", "fsdp")``;
* tensor parallelism (Megatron, Shoeybi et al., arXiv:1909.08053): the column-parallel
  projections ``qkv`` and ``gate_up`` split their output axis over ``"tensor"``, the row-parallel
  ``out`` and ``down`` their input axis;
* FSDP (ZeRO-3, Rajbhandari et al., arXiv:1910.02054): every parameter with an axis left is split
  over ``"fsdp"`` along its largest such axis whose length ``"fsdp"`` divides;
* optimizer state: each leaf under a parameter's path takes that parameter's spec, minus the axes
  its own shape cannot split (quantized moments' scale arrays are narrower).

XLA's SPMD partitioner inserts the all-gathers and the gradient reductions. qjax quantizes the
logical (global) arrays, so blocks are the same as unsharded; :func:`check_divisibility` makes sure
blocks along a tensor-sharded contraction axis also never straddle shards.

Example (8 devices; ``train_recipe(..., mesh="data=2,fsdp=2,tensor=2")`` does all of this):
  >>> plan = make_plan(parse_mesh("data=2,fsdp=2,tensor=2"))
  >>> check_divisibility(abstract_state.params, plan.sizes, "mxfp4", tokens_per_step=8 * 64)
  >>> shardings = plan.shardings(abstract_state)
  >>> state = jax.jit(init, out_shardings=shardings)()
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import qjax

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
COLUMN_PARALLEL = ("qkv", "gate_up")  # output features split over "tensor"
ROW_PARALLEL = ("out", "down")  # input features split over "tensor"
SCANNED = "blocks"  # scope of ModelConfig.scan_layers' blocks: a leading layer axis, never split


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,tensor=4"`` -> ``{"data": 2, "fsdp": 1, "tensor": 4}`` (missing axes are 1).

    Example:
      >>> parse_mesh("fsdp=8")
      {'data': 1, 'fsdp': 8, 'tensor': 1}
    """
    sizes = dict.fromkeys(AXES, 1)
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if name.strip() not in AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh: bad entry {item!r}; write name=size with names "
                             f"{', '.join(AXES)} and sizes >= 1, e.g. data=2,fsdp=2,tensor=2.")
        sizes[name.strip()] = int(value)
    return sizes


def make_mesh(sizes: dict[str, int], devices: list | None = None) -> Mesh:
    """A Mesh with axes ``("data", "fsdp", "tensor")`` over the first ``prod(sizes)`` devices,
    Auto axis types (``jax.sharding.Mesh``'s default)."""
    devices = jax.devices() if devices is None else devices
    shape = tuple(sizes[a] for a in AXES)
    count = math.prod(shape)
    if count > len(devices):
        raise ValueError(f"--mesh {sizes} needs {count} devices; {len(devices)} are visible.")
    return Mesh(np.asarray(devices[:count]).reshape(shape), AXES)


def _block_along(fmt, quantized_axis: bool) -> int:
    """The extent of one scale block of ``fmt`` along the GEMM's contraction axis (``True``) or the
    other axis of a 2-D operand; 1 for per-tensor / per-channel scales and casts."""
    if fmt is None:
        return 1
    gran = qjax.formats.get(fmt).scaling.granularity
    if isinstance(gran, qjax.formats.Block):
        return gran.size if quantized_axis else 1
    if isinstance(gran, qjax.formats.Tile):
        return gran.rows if quantized_axis else gran.cols
    return 1


def _gemm_blocks(gemm) -> int:
    """lcm of both operands' blocks and the Hadamard block along the GEMM's contraction axis."""
    sizes = [_block_along(gemm.lhs.format, True), _block_along(gemm.rhs.format, True)]
    if gemm.transform is not None:
        sizes.append(gemm.hadamard_block_size)
    return math.lcm(*sizes)


def kernel_blocks(recipe) -> tuple[int, int]:
    """``(along K, along N)``: the lengths a shard of a ``[K, N]`` kernel (and of the activation
    or gradient sharded with it) must be a multiple of, so blocks never straddle shards.

    K is the forward GEMM's contraction axis (both operands and its Hadamard block), plus the
    ``cols`` of a 2-D tile on W in dgrad; N is dgrad's contraction axis, plus the ``cols`` of a
    2-D tile on W in the forward GEMM.
    """
    recipe = qjax.recipes.get(recipe)
    along_k = math.lcm(_gemm_blocks(recipe.forward), _block_along(recipe.dgrad.rhs.format, False))
    along_n = math.lcm(_gemm_blocks(recipe.dgrad), _block_along(recipe.forward.rhs.format, False))
    return along_k, along_n


def _layer(path: tuple[str, ...]) -> str | None:
    return path[-2] if len(path) >= 2 and path[-1] == "kernel" else None


def param_spec(path: tuple[str, ...], shape: tuple[int, ...], sizes: dict[str, int]) -> P:
    """The PartitionSpec of the parameter at ``path`` (dict keys) of shape ``shape``. Parameters
    of scanned blocks (``ModelConfig.scan_layers``) keep their leading layer axis whole."""
    stacked = 1 if SCANNED in path else 0
    spec: list[Any] = [None] * len(shape)
    layer = _layer(path)
    if sizes["tensor"] > 1 and layer in COLUMN_PARALLEL + ROW_PARALLEL and \
            len(shape) == 2 + stacked:
        spec[stacked + (1 if layer in COLUMN_PARALLEL else 0)] = "tensor"
    if sizes["fsdp"] > 1:
        free = [d for d in range(stacked, len(shape))
                if spec[d] is None and shape[d] % sizes["fsdp"] == 0]
        if free:
            spec[max(free, key=lambda d: shape[d])] = "fsdp"
    return P(*spec)


def check_divisibility(params: Any, sizes: dict[str, int], recipe,
                       tokens_per_step: int | None = None) -> None:
    """Raises ValueError when a shard is not a whole number of the recipe's blocks (scale blocks or
    Hadamard blocks) along a sharded contraction axis: a tensor-sharded kernel axis, or (with
    ``tokens_per_step``, the tokens of one step's batch) the token axis that wgrad contracts,
    split over ``data * fsdp``."""
    if recipe == "flax":
        return
    ways = sizes["data"] * sizes["fsdp"]
    if tokens_per_step is not None and ways > 1:
        block = _gemm_blocks(qjax.recipes.get(recipe).wgrad)
        if tokens_per_step % ways or (tokens_per_step // ways) % block:
            raise ValueError(
                f"--mesh data*fsdp={ways} splits the {tokens_per_step} tokens of a step into "
                f"shards of {tokens_per_step / ways:g}, but recipe "
                f"{getattr(recipe, 'name', recipe)!r} contracts tokens in wgrad in blocks of "
                f"{block} (its scale / Hadamard blocks must not straddle shards). Change "
                f"--batch-size / --seq-len or the mesh.")
    if sizes["tensor"] == 1:
        return
    along = kernel_blocks(recipe)
    for path, leaf in _leaves(params):
        layer = _layer(path)
        if layer not in COLUMN_PARALLEL + ROW_PARALLEL:
            continue
        axis = 1 if layer in COLUMN_PARALLEL else 0  # of the [K, N] kernel, after any layer axis
        length, block = leaf.shape[leaf.ndim - 2 + axis], along[axis]
        if length % sizes["tensor"] or (length // sizes["tensor"]) % block:
            raise ValueError(
                f"--mesh tensor={sizes['tensor']} splits {'/'.join(path)} {tuple(leaf.shape)} "
                f"along its {'NK'[axis == 0]} axis into shards of {length / sizes['tensor']:g}, "
                f"but recipe {getattr(recipe, 'name', recipe)!r} needs a multiple of {block} "
                f"there (its scale / Hadamard blocks must not straddle shards). Use a smaller "
                f"tensor size, a wider model, or another recipe.")


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _leaves(tree):
    return [(_keys(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)]


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """A mesh and the shardings of the batch and of a train state."""

    mesh: Mesh
    sizes: dict

    @property
    def batch(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(BATCH_AXES))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def shardings(self, state: Any) -> Any:
        """NamedShardings for every leaf of ``state`` (params and optimizer state: any pytree whose
        leaves have ``.shape``; parameters are found by their ``.../<layer>/kernel`` paths)."""
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: NamedSharding(self.mesh, self.spec(_keys(path), leaf.shape)),
            state)

    def spec(self, path: tuple[str, ...], shape: tuple[int, ...]) -> P:
        """A parameter's spec, or that of an optimizer-state leaf under a parameter's path (a
        moment, or the codes / scales of a quantized moment): the rule applied to the leaf's own
        shape, keeping only the axes its lengths divide. Anything else is replicated."""
        ends = [i for i, key in enumerate(path) if key in ("kernel", "embedding", "scale")]
        if not ends or len(shape) == 0:
            return P()
        spec = param_spec(path[:ends[-1] + 1], shape, self.sizes)
        return P(*[a if a is None or shape[d] % self.sizes[a] == 0 else None
                   for d, a in enumerate(spec)])


def make_plan(sizes: dict[str, int], devices: list | None = None) -> MeshPlan:
    """The plan for mesh ``sizes`` (from :func:`parse_mesh`)."""
    return MeshPlan(make_mesh(sizes, devices), dict(sizes))


def check_batch(plan: MeshPlan, batch_size: int) -> None:
    """Raises ValueError unless ``data * fsdp`` divides the batch size."""
    ways = plan.sizes["data"] * plan.sizes["fsdp"]
    if batch_size % ways:
        raise ValueError(f"--mesh: batch size {batch_size} is not divisible by data*fsdp = "
                         f"{ways}; pick a batch size that is.")
