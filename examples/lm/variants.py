"""Recipe variants for the reproduction's ablations, built from qjax's named recipes with
``dataclasses.replace`` (qjax's public way to make a recipe of your own).

Two questions the newer literature disputes:

* Cim et al., "Pretraining Large Language Models with MXFP4 on Native FP4 Hardware"
  (arXiv:2605.09825, 2026) enable MXFP4 stage by stage (forward, then dgrad, then wgrad) and report
  that quantizing wgrad drives the degradation, that stochastic rounding and random Hadamard
  rotations do not repair it, and that deterministic Hadamard rotations do. The ``mxfp4_fprop`` …
  ``mxfp4_all_wgrad_*`` variants are that ladder: all MXFP4 round-to-nearest (OCP ``floor``
  scales), then one intervention on the wgrad GEMM at a time.
* Tseng et al. (``mxfp4``, random Hadamard + SR in the backward) and NVIDIA's NVFP4 recipe (random
  Hadamard on wgrad, SR on the gradient) use random signs and SR. ``mxfp4_rtn``, ``mxfp4_dht``,
  ``nvfp4_dht`` and ``nvfp4_wgrad_rtn`` swap one of those choices.

"Deterministic Hadamard" is the plain Walsh–Hadamard matrix (the same rotation every step);
"random" draws fresh ±1 signs every step from the ``"quant"`` stream.
"""

from __future__ import annotations

import dataclasses

from qjax import recipes as R

_RTN = R.OperandSpec("mxfp4")
_SR = R.OperandSpec("mxfp4", "stochastic", prescale=0.75)
_MXFP4_RTN_GEMM = R.GemmSpec(_RTN, _RTN, None)


def _variant(name: str, base: R.Recipe, description: str, **gemms) -> tuple[str, R.Recipe, str]:
    return name, dataclasses.replace(base, name=name, **gemms), description


def _swap_wgrad(base: R.Recipe, name: str, description: str, **wgrad) -> tuple:
    return _variant(name, base, description, wgrad=dataclasses.replace(base.wgrad, **wgrad))


_ALL_RTN = R.Recipe("mxfp4_all_rtn", forward=_MXFP4_RTN_GEMM, dgrad=_MXFP4_RTN_GEMM,
                    wgrad=_MXFP4_RTN_GEMM)
_MXFP4, _NVFP4 = R.get("mxfp4"), R.get("nvfp4")

_TABLE = [
    _variant("mxfp4_fprop", R.Recipe("x"), "MXFP4 RTN in the forward GEMM only",
             forward=_MXFP4_RTN_GEMM),
    _variant("mxfp4_fprop_dgrad", R.Recipe("x"), "MXFP4 RTN in forward and dgrad; wgrad in "
             "high precision", forward=_MXFP4_RTN_GEMM, dgrad=_MXFP4_RTN_GEMM),
    _variant("mxfp4_all_rtn", _ALL_RTN, "MXFP4 RTN in all three GEMMs, no transform (naive FP4)"),
    _swap_wgrad(_ALL_RTN, "mxfp4_all_wgrad_sr", "mxfp4_all_rtn + stochastic rounding (3/4 "
                "pre-scale) of both wgrad operands", lhs=_SR, rhs=_SR),
    _swap_wgrad(_ALL_RTN, "mxfp4_all_wgrad_rht", "mxfp4_all_rtn + random Hadamard (block 32) on "
                "wgrad", transform="random_hadamard", hadamard_block_size=32),
    _swap_wgrad(_ALL_RTN, "mxfp4_all_wgrad_dht", "mxfp4_all_rtn + deterministic Hadamard (block "
                "32) on wgrad", transform="hadamard", hadamard_block_size=32),
    _variant("mxfp4_rtn", _MXFP4, "mxfp4 (Tseng et al.) with RTN and no Hadamard in dgrad and "
             "wgrad", dgrad=_MXFP4_RTN_GEMM, wgrad=_MXFP4_RTN_GEMM),
    _variant("mxfp4_dht", _MXFP4, "mxfp4 (Tseng et al.) with a deterministic instead of a random "
             "Hadamard in dgrad and wgrad (SR kept)",
             dgrad=dataclasses.replace(_MXFP4.dgrad, transform="hadamard"),
             wgrad=dataclasses.replace(_MXFP4.wgrad, transform="hadamard")),
    _swap_wgrad(_NVFP4, "nvfp4_dht", "nvfp4 with a deterministic instead of a random Hadamard on "
                "wgrad", transform="hadamard"),
    _swap_wgrad(_NVFP4, "nvfp4_wgrad_rtn", "nvfp4 with round-to-nearest instead of SR for dY in "
                "wgrad", rhs=dataclasses.replace(_NVFP4.wgrad.rhs, rounding="nearest")),
]

VARIANTS: dict[str, R.Recipe] = {name: recipe for name, recipe, _ in _TABLE}
DESCRIPTIONS: dict[str, str] = {name: text for name, _, text in _TABLE}


def resolve(name: str) -> R.Recipe | str:
    """A variant's :class:`~qjax.recipes.Recipe`, or the name itself (a qjax recipe or "flax")."""
    return VARIANTS.get(name, name)
