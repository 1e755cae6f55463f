"""The top-subspace gradient fraction and projections onto / out of a subspace.

Public API (a promise to users; keep these names and signatures):

    subspace_fraction(g, V)   χ = ‖V g‖² / ‖g‖²
    project_onto(g, V)        Vᵀ V g
    project_out(g, V)         g − Vᵀ V g

`g` is a flat (P,) vector (a params pytree is also accepted and flattened
with `ravel_pytree`; projections then return a pytree again) and `V` holds
orthonormal rows, shape (k, P), e.g. `lanczos_top_k(...).eigenvectors`. A
single (P,) vector is treated as k = 1. All products use
`Precision.HIGHEST`; the functions are pure and jit-compatible.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

_HIGHEST = jax.lax.Precision.HIGHEST


def _flat(g) -> tuple[jax.Array, Any]:
    """(flat g, unravel or None) for an array or a pytree."""
    if isinstance(g, (jax.Array, jnp.ndarray)) or hasattr(g, "__array__"):
        g = jnp.asarray(g)
        if g.ndim != 1:
            raise ValueError(f"g must be a flat (P,) vector or a pytree; got shape {g.shape}.")
        return g, None
    return ravel_pytree(g)


def _rows(V, P: int) -> jax.Array:
    V = jnp.asarray(V)
    V = V[None] if V.ndim == 1 else V
    if V.ndim != 2 or V.shape[1] != P:
        raise ValueError(f"V must have shape (k, {P}); got {V.shape}.")
    return V


def _coefficients(g, V):
    return jnp.matmul(V.astype(g.dtype), g, precision=_HIGHEST)


def subspace_fraction(g, V) -> jax.Array:
    """χ = ‖V g‖² / ‖g‖², the fraction of ‖g‖² inside span of V's orthonormal rows.

    Returns 0 for g = 0 (no NaN). For orthonormal V the value lies in [0, 1];
    it is clipped there, which only ever removes rounding (≈ eps) excess.
    """
    g, _ = _flat(g)
    V = _rows(V, g.shape[0])
    c = _coefficients(g, V)
    return fraction_of(jnp.sum(c * c), jnp.vdot(g, g, precision=_HIGHEST))


def fraction_of(part_sq, total_sq) -> jax.Array:
    """part_sq / total_sq clipped to [0, 1], 0 when total_sq is 0: χ from ‖V g‖² and ‖g‖²."""
    safe = jnp.where(total_sq > 0, total_sq, 1.0)
    return jnp.where(total_sq > 0, jnp.clip(part_sq / safe, 0.0, 1.0), 0.0)


def project_onto(g, V):
    """Vᵀ V g: the orthogonal projection of g onto span of V's orthonormal rows."""
    g, unravel = _flat(g)
    V = _rows(V, g.shape[0])
    out = jnp.matmul(_coefficients(g, V), V.astype(g.dtype), precision=_HIGHEST)
    return out if unravel is None else unravel(out)


def project_out(g, V):
    """g − Vᵀ V g: g with its component in span of V's orthonormal rows removed."""
    flat, unravel = _flat(g)
    V = _rows(V, flat.shape[0])
    out = flat - jnp.matmul(_coefficients(flat, V), V.astype(flat.dtype), precision=_HIGHEST)
    return out if unravel is None else unravel(out)
