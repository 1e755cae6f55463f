"""Rayleigh–Ritz on a Krylov decomposition: Ritz pairs and their residuals.

Owns the extraction of eigenpairs from the coefficient matrix T that
`lanczos.krylov_decomposition` builds: a dense `ritz_pairs` for the pairs
returned to users, and the cheap tridiagonal `ritz_residual_estimates` for
the stopping rule. It makes no matvecs.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lossland.curvature import basis


def ritz_pairs(T, steps, k: int, which: str = "largest"):
    """The k selected Ritz pairs of the Krylov decomposition after `steps` matvecs.

    Rayleigh–Ritz on span(q_0 … q_{steps−1}): eigh of the symmetrized leading
    block of T. Inactive rows/columns get a sentinel diagonal value far below
    the active spectrum, so one fixed-shape eigh serves every `steps`.

    Returns (theta (k,), Y (S, k), residuals (k,), valid (k,)). Y are
    coefficient vectors in the basis (zero past `steps`); the residual of the
    pair is ‖T Y_i − θ_i Y_i‖ with the unsymmetrized T, which equals the true
    ‖H v − θ v‖ whenever the basis is orthonormal and each step's expansion
    H q_j = Σ_i T[i, j] q_i is exact — both hold to working precision with
    twice-repeated full reorthogonalization. `valid` is False only for
    padding, when fewer than k Ritz pairs exist.
    """
    S = T.shape[0]
    active = jnp.arange(S) < steps
    both = active[:, None] & active[None, :]
    A = jnp.where(both, 0.5 * (T + T.T), 0.0)
    fro = jnp.sqrt(jnp.sum(A * A))
    sentinel = jnp.where(fro > 0, -2.0 * fro - 1e3 * basis.tiny(T.dtype), -1.0)
    A = A + jnp.diag(jnp.where(active, 0.0, sentinel).astype(T.dtype))
    theta, Y = jnp.linalg.eigh(A, symmetrize_input=False)
    Y = jnp.where(active[:, None], Y, 0.0)
    is_active = jnp.sum(Y * Y, axis=0) > 0.5
    score = {"largest": theta, "magnitude": jnp.abs(theta), "smallest": -theta}[which]
    score = jnp.where(is_active, score, -jnp.inf)
    _, sel = lax.top_k(score, k)
    theta, Y, valid = theta[sel], Y[:, sel], is_active[sel]
    # Descending algebraic order (ascending for "smallest"), padding last.
    order = jnp.argsort(jnp.where(valid, theta if which == "smallest" else -theta, jnp.inf))
    theta, Y, valid = theta[order], Y[:, order], valid[order]
    residuals = jnp.linalg.norm(basis.dot(T, Y) - Y * theta, axis=0)
    theta = jnp.where(valid, theta, 0.0)
    Y = jnp.where(valid, Y, 0.0)
    residuals = jnp.where(valid, residuals, jnp.inf)
    return theta, Y, residuals, valid


def _sturm_count(alpha, beta_sq, x, pivmin):
    """Number of eigenvalues < x of the symmetric tridiagonal (alpha, beta), per x."""
    def step(i, carry):
        q, count = carry
        q = alpha[i] - x - beta_sq[i] / q
        q = jnp.where(jnp.abs(q) < pivmin, -pivmin, q)
        return q, count + (q < 0).astype(jnp.int32)

    q0 = alpha[0] - x
    q0 = jnp.where(jnp.abs(q0) < pivmin, -pivmin, q0)
    _, count = lax.fori_loop(1, alpha.shape[0], step, (q0, (q0 < 0).astype(jnp.int32)),
                             unroll=4)
    return count


def ritz_residual_estimates(T, steps, k: int, which: str = "largest"):
    """Cheap (θ, ‖residual‖) estimates of the k selected Ritz pairs, for the stopping rule.

    Uses only the Lanczos tridiagonal part of T (the other coefficients are
    rounding-level with full reorthogonalization): Ritz values by bisection on
    Sturm counts, each Ritz vector's last component by two steps of inverse
    iteration (a batched tridiagonal solve), and the classical estimate
    |β_s · y_s|. O(k·steps) work per call, with no dense eigensolver: a LAPACK
    eigh of the (num_iters+1)² matrix at every step costs little on an idle
    CPU but, being multithreaded above ~64 rows, can cost more than the
    matvec itself on a busy one. The pairs returned to the user still come
    from a full eigendecomposition with honest residuals (`ritz_pairs`).

    Returns θ (k,) and residual estimates (k,), +inf where not computable.
    """
    dtype = T.dtype
    S = T.shape[0]
    eps = basis.eps(dtype)
    idx = jnp.arange(S)
    active = idx < steps
    pair_active = idx[:-1] + 1 < steps
    alpha = jnp.where(active, jnp.diagonal(T), 0.0)
    beta = jnp.where(pair_active, 0.5 * (jnp.diagonal(T, -1) + jnp.diagonal(T, 1)), 0.0)
    absb = jnp.abs(beta)
    radius = jnp.max(jnp.where(active, jnp.abs(alpha) + jnp.concatenate([absb, jnp.zeros(1, dtype)])
                               + jnp.concatenate([jnp.zeros(1, dtype), absb]), 0.0))
    radius = jnp.where(radius > 0, radius, 1.0)
    sentinel = -2.0 * radius - 1.0 * radius          # inactive block: far below
    alpha = jnp.where(active, alpha, sentinel)
    beta_sq = jnp.concatenate([jnp.zeros(1, dtype), beta * beta])   # beta_sq[i] couples i−1, i
    pivmin = jnp.asarray(basis.tiny(dtype), dtype) * jnp.maximum(1.0, radius * radius)

    # Ascending indices (in the full S-sized matrix) of the candidate eigenvalues:
    # the inactive sentinels take the S − steps lowest places.
    top = S - 1 - jnp.arange(k)
    bottom = S - steps + jnp.arange(k)
    if which == "largest":
        targets = top
    elif which == "smallest":
        targets = bottom
    else:
        targets = jnp.concatenate([top, bottom])
    lo = jnp.full(targets.shape, -radius * (1 + 4 * eps), dtype)
    hi = jnp.full(targets.shape, radius * (1 + 4 * eps), dtype)

    def bisect(_, carry):
        lo, hi = carry
        mid = 0.5 * (lo + hi)
        below = _sturm_count(alpha, beta_sq, mid, pivmin) <= targets
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = lax.fori_loop(0, jnp.finfo(dtype).nmant + 3, bisect, (lo, hi))
    theta = 0.5 * (lo + hi)
    if which == "magnitude":
        dup = jnp.concatenate([jnp.zeros(k, bool), targets[k:] >= S - k])
        score = jnp.where(dup, -jnp.inf, jnp.abs(theta))
        _, sel = lax.top_k(score, k)
        theta = theta[sel]

    # Inverse iteration for the last active component of each Ritz vector.
    shift = theta + 4 * eps * radius
    d = alpha[None, :] - shift[:, None]
    off = jnp.broadcast_to(beta, (k, S - 1))
    zero = jnp.zeros((k, 1), dtype)
    dl = jnp.concatenate([zero, off], axis=1)
    du = jnp.concatenate([off, zero], axis=1)
    x = jnp.where(active, 1.0 + basis.hash_vector(S, 7, dtype), 0.0)
    x = jnp.broadcast_to(x, (k, S))
    for _ in range(2):
        x = lax.linalg.tridiagonal_solve(dl, d, du, x[..., None])[..., 0]
        x = jnp.where(active, x, 0.0)
        x = x / jnp.linalg.norm(x, axis=1, keepdims=True)
    last = x[:, jnp.maximum(steps - 1, 0)]
    beta_next = jnp.abs(T[jnp.minimum(steps, S - 1), jnp.maximum(steps - 1, 0)])
    res = beta_next * jnp.abs(last)
    res = jnp.where(jnp.isfinite(res), res, jnp.inf)
    return theta, res
