"""Stochastic spectral estimators: SLQ spectral density and Hutchinson's trace.

Owns the estimators that average over random probe vectors. Each probe's
Lanczos run is `lanczos.krylov_decomposition`'s; this module adds the
probes, the quadrature and the broadening.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lossland.curvature import basis
from lossland.curvature.lanczos import krylov_decomposition
from lossland.curvature.operators import compiled_call
from lossland.curvature.ritz import ritz_pairs


class SLQResult(NamedTuple):
    """Stochastic Lanczos quadrature. A pytree.

    Attributes:
      nodes: (num_probes, num_iters) Ritz values per probe, ascending; padding
        entries (when a probe's Krylov space became invariant early) are 0
        with weight 0.
      weights: (num_probes, num_iters) Gauss quadrature weights (squared first
        components of the tridiagonal's eigenvectors); each row sums to 1.
      grid: the evaluation grid.
      density: the Gaussian-broadened spectral density on `grid`, normalized
        numerically (trapezoid rule) to integrate to 1 over the grid.
    """
    nodes: jax.Array
    weights: jax.Array
    grid: jax.Array
    density: jax.Array


def _rademacher(key, P, dtype):
    return jax.random.rademacher(key, (P,), dtype=dtype)


def _quadrature(matvec, probe, num_iters):
    """Nodes and weights of one probe's Lanczos quadrature (stops at breakdown)."""
    state = krylov_decomposition(matvec, probe, num_iters, restart=False)
    S = state.T.shape[0]
    # All computed Ritz pairs (k = S includes the sentinel padding, marked invalid).
    theta, Y, _, valid = ritz_pairs(state.T, state.steps, S, "largest")
    weights = jnp.where(valid, Y[0] ** 2, 0.0)
    # Keep num_iters entries: valid ones (≤ num_iters exist) first, ascending.
    order = jnp.argsort(jnp.where(valid, theta, jnp.inf))[:num_iters]
    return theta[order], weights[order]


def slq_density(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, key: jax.Array,
                num_probes: int, num_iters: int, grid: jax.Array, sigma: float) -> SLQResult:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Each probe is a Rademacher vector normalized to unit length; `num_iters`
    steps of fully reorthogonalized Lanczos from it give a Gauss quadrature
    (nodes θ_i, weights w_i, Σ w_i = 1) of the probe's spectral measure, whose
    expectation over probes is the spectral density (1/P) Σ_j δ(λ − λ_j). In
    particular Σ_i w_i θ_i = zᵀHz/P averages to trace(H)/P. The probes are
    processed sequentially (`lax.map`), each one `lax.while_loop`. A probe
    whose Krylov space becomes invariant stops early; its quadrature is then
    exact and the unused entries are padding with weight 0.

    density(t) = (1/num_probes) Σ_probes Σ_i w_i N(t; θ_i, σ²), then divided
    by its trapezoid-rule integral over `grid`, so that it integrates to 1 on
    the grid even when broadening puts some mass outside it (a grid missing
    all of the spectrum gives a zero density rather than NaN).

    Args:
      matvec: (P,) -> (P,), symmetric.
      v0: (P,) vector fixing size and dtype (its values are not used).
      key: PRNG key for the probes.
      num_probes, num_iters: Python ints.
      grid: (G,) increasing evaluation points.
      sigma: Gaussian broadening width (> 0).
    """
    v0 = jnp.asarray(v0)
    dtype = v0.dtype
    (P,) = v0.shape
    if num_iters < 1 or num_probes < 1:
        raise ValueError("num_probes and num_iters must be >= 1.")
    keys = jax.random.split(key, num_probes)

    def body(matvec, keys):
        def one(key):
            probe = _rademacher(key, P, dtype) / jnp.sqrt(jnp.asarray(P, dtype))
            return _quadrature(matvec, probe, num_iters)
        return lax.map(one, keys)

    nodes, weights = compiled_call(body, matvec, v0, keys)
    grid = jnp.asarray(grid, dtype)
    sigma = jnp.asarray(sigma, dtype)
    z = (grid[:, None, None] - nodes[None]) / sigma
    kernel = jnp.exp(-0.5 * z * z) / (sigma * jnp.sqrt(2 * jnp.pi).astype(dtype))
    density = jnp.sum(kernel * weights[None], axis=(1, 2)) / num_probes
    mass = jnp.trapezoid(density, grid)
    density = jnp.where(mass > 0, density / jnp.where(mass > 0, mass, 1.0), 0.0)
    return SLQResult(nodes=nodes, weights=weights, grid=grid, density=density)


class HutchinsonResult(NamedTuple):
    """Hutchinson trace estimate. A pytree.

    Attributes:
      estimate: mean over probes of zᵀHz.
      std_error: sample standard deviation / √num_probes (inf for one probe).
      samples: (num_probes,) the individual zᵀHz.
    """
    estimate: jax.Array
    std_error: jax.Array
    samples: jax.Array


def probe_samples(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, key: jax.Array,
                  num_probes: int, statistic: Callable) -> jax.Array:
    """(num_probes,) statistic(z, Hz) over Rademacher probes z, one matvec each, sequential.

    The common body of `hutchinson_trace` (zᵀHz) and `estimators.frobenius_norm_sq` (‖Hz‖²).
    v0 fixes size and dtype only.
    """
    v0 = jnp.asarray(v0)
    (P,) = v0.shape
    if num_probes < 1:
        raise ValueError("num_probes must be >= 1.")

    def body(matvec, keys):
        def one(key):
            z = _rademacher(key, P, v0.dtype)
            return statistic(z, matvec(z))
        return lax.map(one, keys)

    return compiled_call(body, matvec, v0, jax.random.split(key, num_probes))


def hutchinson_trace(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, key: jax.Array,
                     num_probes: int) -> HutchinsonResult:
    """trace(H) ≈ mean of zᵀHz over Rademacher probes z (one matvec each, sequential).

    v0 fixes size and dtype only.
    """
    samples = probe_samples(matvec, v0, key, num_probes,
                            lambda z, hz: jnp.vdot(z, hz, precision=basis.HIGHEST))
    estimate = jnp.mean(samples)
    if num_probes > 1:
        std_error = jnp.std(samples, ddof=1) / jnp.sqrt(num_probes)
    else:
        std_error = jnp.full((), jnp.inf, samples.dtype)
    return HutchinsonResult(estimate=estimate, std_error=std_error, samples=samples)
