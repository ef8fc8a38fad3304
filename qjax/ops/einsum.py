"""``einsum`` of two operands under a training recipe, through :func:`qjax.ops.dot_general`.

The first operand plays X (activations) and the second W (weights) of the recipe, always: unlike
``jnp.einsum``, which may swap the operands of its ``dot_general``, the roles never change.
"""

from __future__ import annotations

import string

import jax.numpy as jnp
from jaxtyping import Array, Float, Key

from qjax import recipes as R
from qjax.ops.dot_general import dot_general


def _expand_ellipsis(term: str, ndim: int, fresh: str, which: str) -> str:
    if "..." not in term:
        if len(term) != ndim:
            raise ValueError(f"einsum: {which} subscripts {term!r} name {len(term)} axes but the "
                             f"operand has rank {ndim}.")
        return term
    named = len(term) - 3
    if named > ndim:
        raise ValueError(f"einsum: {which} subscripts {term!r} name more axes than its rank "
                         f"{ndim}.")
    return term.replace("...", fresh[len(fresh) - (ndim - named):] if ndim > named else "")


def _parse(subscripts: str, lhs_ndim: int, rhs_ndim: int) -> tuple[str, str, str]:
    subscripts = subscripts.replace(" ", "")
    if "->" in subscripts:
        inputs, output = subscripts.split("->")
    else:
        inputs, output = subscripts, None
    terms = inputs.split(",")
    if len(terms) != 2:
        raise ValueError(f"qjax.ops.einsum takes exactly two operands (one GEMM); subscripts "
                         f"{subscripts!r} name {len(terms)}. Chain two-operand einsums instead.")
    used = set(subscripts) - {".", ",", "-", ">"}
    if not all(c in string.ascii_letters for c in used):
        raise ValueError(f"einsum subscripts {subscripts!r}: use letters and '...' only.")
    fresh = "".join(c for c in string.ascii_letters if c not in used)
    width = max(lhs_ndim - (len(terms[0]) - 3) if "..." in terms[0] else 0,
                rhs_ndim - (len(terms[1]) - 3) if "..." in terms[1] else 0)
    fresh = fresh[:width]
    lhs = _expand_ellipsis(terms[0], lhs_ndim, fresh, "lhs")
    rhs = _expand_ellipsis(terms[1], rhs_ndim, fresh, "rhs")
    if output is None:
        counts = {c: (lhs + rhs).count(c) for c in set(lhs + rhs)}
        output = fresh[len(fresh) - width:] + "".join(
            sorted(c for c, n in counts.items() if n == 1 and c not in fresh))
    elif "..." in output:
        output = output.replace("...", fresh)
    for term, which in ((lhs, "lhs"), (rhs, "rhs"), (output, "output")):
        if len(set(term)) != len(term):
            raise ValueError(f"einsum subscripts {subscripts!r}: repeated index in the {which} "
                             "(diagonals) is not supported.")
    missing = set(output) - set(lhs) - set(rhs)
    if missing:
        raise ValueError(f"einsum subscripts {subscripts!r}: output indices {sorted(missing)} "
                         "appear in no operand.")
    return lhs, rhs, output


def einsum(subscripts: str, *operands: Float[Array, "..."], recipe: R.Recipe | str,
           key: Key[Array, ""] | None = None, precision=None,
           preferred_element_type=None) -> Float[Array, "..."]:
    """Two-operand ``einsum`` whose contraction runs as :func:`qjax.ops.dot_general`.

    Indices in both operands and the output are batch dimensions; indices in both operands but
    not the output are contracted (the GEMM's K); indices in one operand only are kept, or summed
    first if absent from the output. ``...`` broadcasts over equal leading axes.

    Args:
      subscripts: e.g. ``"btd,dh->bth"``, ``"bhqd,bhkd->bhqk"``, ``"...d,df->...f"``.
      *operands: exactly two arrays: X (activations) then W (weights).
      recipe: a :class:`~qjax.recipes.Recipe` or a recipe name.
      key: PRNG key for recipes that need one.
      precision: as for ``jnp.einsum``.
      preferred_element_type: output dtype.

    Returns:
      The contraction, with the output indices' layout.

    Example:
      >>> einsum("btd,dh->bth", jnp.ones((2, 3, 32)), jnp.ones((32, 5)), recipe="mxfp8").shape
      (2, 3, 5)
    """
    if len(operands) != 2:
        raise ValueError(f"qjax.ops.einsum takes exactly two operands (one GEMM), got "
                         f"{len(operands)}.")
    lhs, rhs = (jnp.asarray(o) for o in operands)
    lhs_idx, rhs_idx, out_idx = _parse(subscripts, lhs.ndim, rhs.ndim)
    # Indices only in one operand and not in the output are summed out before the GEMM.
    for name in ("lhs", "rhs"):
        idx, other = (lhs_idx, rhs_idx) if name == "lhs" else (rhs_idx, lhs_idx)
        arr = lhs if name == "lhs" else rhs
        drop = [i for i, c in enumerate(idx) if c not in out_idx and c not in other]
        if drop:
            arr = jnp.sum(arr, axis=tuple(drop))
            idx = "".join(c for c in idx if c in out_idx or c in other)
        if name == "lhs":
            lhs, lhs_idx = arr, idx
        else:
            rhs, rhs_idx = arr, idx
    batch = [c for c in lhs_idx if c in rhs_idx and c in out_idx]
    contract = [c for c in lhs_idx if c in rhs_idx and c not in out_idx]
    for c in batch + contract:
        if lhs.shape[lhs_idx.index(c)] != rhs.shape[rhs_idx.index(c)]:
            raise ValueError(f"einsum subscripts {subscripts!r}: index {c!r} has size "
                             f"{lhs.shape[lhs_idx.index(c)]} in lhs and "
                             f"{rhs.shape[rhs_idx.index(c)]} in rhs.")
    dims = ((tuple(lhs_idx.index(c) for c in contract), tuple(rhs_idx.index(c) for c in contract)),
            (tuple(lhs_idx.index(c) for c in batch), tuple(rhs_idx.index(c) for c in batch)))
    out = dot_general(lhs, rhs, dims, precision, preferred_element_type, recipe=recipe, key=key)
    names = ("".join(batch) + "".join(c for c in lhs_idx if c not in rhs_idx)
             + "".join(c for c in rhs_idx if c not in lhs_idx))
    return jnp.transpose(out, tuple(names.index(c) for c in out_idx))
