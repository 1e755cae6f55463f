"""Top-k eigenpairs from block products: a warm-started block Davidson solver.

Owns `block_top_k`, the tracker's alternative to `lanczos_top_k` when a block
product H V (b vectors in one data pass, `lossland.objective.full_batch_block_hvp`)
costs much less than b single products. It must not call single-vector matvecs.

The method. The search basis Q grows by one block of b orthonormal rows per
iteration; H Q is stored beside it, so the Rayleigh quotient T = Q (H Q)ᵀ and
the residuals need no extra products. T grows by the new block's b columns
(and, by symmetry, rows) per iteration, so the dense work per block is a few
(b × S) × (S × P) products, S the basis capacity, not S². After each block the Rayleigh–Ritz step
(eigh of T) gives Ritz pairs (θ_i, u_i); the next block is the residuals
r_i = H u_i − θ_i u_i of the top b Ritz pairs, orthogonalized against Q
(block Davidson with the identity preconditioner: the same space as block
Lanczos started from the current Ritz vectors, but spent only on the pairs
that are wanted). Selection is algebraic (largest θ), so negative eigenvalues
of large magnitude are never mistaken for top ones: the basis may contain them,
but Rayleigh–Ritz ranks them last.

The tolerance rule is `lanczos_top_k`'s: stop once every one of the k
selected pairs has ‖H u_i − θ_i u_i‖ ≤ tol·|θ_i|. Here the residuals are exact
(from the stored H Q), not estimates.

A warm start passes the previous tracked step's eigenvectors as the first
rows of `start`: when they are still accurate to `tol`, one block product
ends the call.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from lossland.curvature.basis import dot, eps, hash_vector
from lossland.curvature.lanczos import LanczosResult


def orthonormalize_block(X, Q, salt):
    """Rows of X made orthonormal and orthogonal to the rows of Q (unused rows of Q are 0).

    Block classical Gram–Schmidt against Q twice ("twice is enough"), then
    one QR, which keeps the span and so the orthogonality to Q. A row that
    vanishes in the first pass (X in the span of Q: breakdown) is replaced by
    a hashed generic direction before the second, so the block always has
    full rank while rows(Q) + b ≤ P. (On a 2-core CPU at P = 670k a QR of the
    block cost as much as a projection, hence one, not one per pass.)
    """
    b, P = X.shape
    tiny = jnp.finfo(X.dtype).tiny
    scale = jnp.max(jnp.linalg.norm(X, axis=1)) + tiny
    X = X - dot(dot(X, Q.T), Q)
    norms = jnp.linalg.norm(X, axis=1, keepdims=True)
    fresh = jax.vmap(lambda i: hash_vector(P, salt * b + i, X.dtype))(jnp.arange(b))
    X = jnp.where(norms > 1e3 * eps(X.dtype) * scale, X / (norms + tiny), fresh)
    X = X - dot(dot(X, Q.T), Q)
    return jnp.linalg.qr(X.T)[0].T


def block_top_k(block_matvec: Callable[[jax.Array], jax.Array], start: jax.Array, k: int,
                num_blocks: int, *, tol: float | None = None) -> LanczosResult:
    """Top-k (largest algebraic) eigenpairs of a symmetric H from block products.

    Args:
      block_matvec: (b, P) -> (b, P), row i of the output is H applied to row i.
        Traced once (it is the body of a `lax.while_loop`).
      start: (b, P) first block, b ≥ k: for a warm start, the previous
        eigenvectors followed by random rows. Need not be orthonormal.
      k: number of pairs returned (Python int).
      num_blocks: at most this many block products (Python int); capped so
        that the basis (num_blocks·b rows) fits in P dimensions.
      tol: the `lanczos_top_k` rule; None runs all `num_blocks`.

    Returns:
      LanczosResult with eigenvalues (k,) descending, eigenvectors (k, P),
      exact residual norms (k,) and num_matvecs = b × block products made.
    """
    b, P = start.shape
    if not 1 <= k <= b:
        raise ValueError(f"block size {b} must be >= k={k} >= 1.")
    if b > P:
        raise ValueError(f"block size {b} exceeds the dimension {P}.")
    num_blocks = max(1, min(num_blocks, P // b))
    S = num_blocks * b
    dtype = start.dtype
    tol_value = -1.0 if tol is None else float(tol)

    def rayleigh_ritz(T, used_rows):
        """Top-b Ritz values (descending) and their coefficient vectors Y (S, b)."""
        used = jnp.arange(S) < used_rows
        T = jnp.where(used[:, None] & used[None, :], 0.5 * (T + T.T), 0.0)
        # Unused rows get a value below every Ritz value, so they sort last.
        floor = -2.0 * (jnp.max(jnp.abs(T)) + 1.0)
        theta, Y = jnp.linalg.eigh(T + jnp.diag(jnp.where(used, 0.0, floor)))
        return theta[::-1][:b], Y[:, ::-1][:, :b]

    def cond(state):
        j, converged = state[3], state[4]
        return (j < num_blocks) & ~converged

    def body(state):
        Q, HQ, T, j, _, X, _, _, _ = state
        X = orthonormalize_block(X, Q, j)
        HX = block_matvec(X)
        Q = lax.dynamic_update_slice(Q, X, (j * b, jnp.int32(0)))
        HQ = lax.dynamic_update_slice(HQ, HX, (j * b, jnp.int32(0)))
        # T = Q (HQ)ᵀ grows by the new block's columns and rows only: Q HXᵀ (S, b);
        # rows of Q not yet filled are zero, so their entries are too.
        new_columns = dot(Q, HX.T)
        T = lax.dynamic_update_slice(T, new_columns, (jnp.int32(0), j * b))
        T = lax.dynamic_update_slice(T, new_columns.T, (j * b, jnp.int32(0)))
        theta, Y = rayleigh_ritz(T, (j + 1) * b)
        U, HU = dot(Y.T, Q), dot(Y.T, HQ)
        R = HU - theta[:, None] * U              # residuals: the next block's directions
        res = jnp.linalg.norm(R, axis=1)
        converged = jnp.all(res[:k] <= tol_value * jnp.abs(theta[:k]))
        return Q, HQ, T, j + 1, converged, R, theta, U, res

    zeros = jnp.zeros((S, P), dtype)
    init = (zeros, zeros, jnp.zeros((S, S), dtype), jnp.int32(0), jnp.asarray(False), start,
            jnp.zeros((b,), dtype), jnp.zeros((b, P), dtype), jnp.zeros((b,), dtype))
    _, _, _, blocks_done, _, _, theta, U, res = lax.while_loop(cond, body, init)
    return LanczosResult(eigenvalues=theta[:k], eigenvectors=U[:k], residuals=res[:k],
                         num_matvecs=blocks_done * b)
