"""Top-k eigenpairs by Lanczos with full reorthogonalization, in one `lax.while_loop`.

Owns the Krylov iteration (`krylov_decomposition`, shared with SLQ), the
warm start along a trajectory and the public `lanczos_top_k`. Basis storage
is `basis`'s, Ritz extraction `ritz`'s; this module only drives them.
"""

from __future__ import annotations

import operator
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lossland.curvature import basis
from lossland.curvature.operators import compiled_call
from lossland.curvature.ritz import ritz_pairs, ritz_residual_estimates

_WHICH = ("largest", "magnitude", "smallest")
_WARM_V0_WEIGHT = 0.1     # share of v0 mixed into a warm start (see `warm_start_vector`)


class LanczosResult(NamedTuple):
    """Top-k Ritz pairs. A NamedTuple, hence a pytree: it can leave a jit.

    Attributes:
      eigenvalues: (k,) Ritz values, descending (algebraic order, also for
        which="magnitude"); ascending for which="smallest", so that
        eigenvalues[0] is λ_min.
      eigenvectors: (k, P) Ritz vectors, orthonormal rows, row i for value i.
      residuals: (k,) ‖H v_i − λ_i v_i‖ for each returned pair, computed from the
        Arnoldi relation (see `lanczos_top_k`), with no extra matvec.
      num_matvecs: int32 scalar, the number of matvecs this call made.
    """
    eigenvalues: jax.Array
    eigenvectors: jax.Array
    residuals: jax.Array
    num_matvecs: jax.Array


class KrylovState(NamedTuple):
    """The loop state of `krylov_decomposition` (exposed for diagnostics and SLQ).

    The basis rows are q_0, q_1, … (orthonormal), stored as `blocks`, a tuple
    of (block_size, P) arrays whose unused rows are zero. Step j applied the
    matvec to q_j and expanded H q_j = Σ_i T[i, j] q_i exactly (up to rounding)
    in the basis, so T[:, :steps] holds every coefficient that was computed,
    and the Ritz pairs after any s ≤ steps matvecs are those of T[:s, :s].
    """
    blocks: tuple
    T: jax.Array               # (S, S); column j filled at step j
    steps: jax.Array           # int32, matvecs made so far
    n_basis: jax.Array         # int32, basis vectors stored so far (≥ steps)
    scale: jax.Array           # running max ‖H q_j‖, a scale for breakdown tests
    reserve_used: jax.Array    # bool, whether the reserve vector has been used
    converged: jax.Array       # bool, the tol rule is met
    exhausted: jax.Array       # bool, the basis spans the whole space


def krylov_decomposition(matvec: Callable[[jax.Array], jax.Array], start: jax.Array,
                         num_iters: int, *, reserve: jax.Array | None = None, k: int = 1,
                         tol: float | None = None, which: str = "largest",
                         restart: bool = True) -> KrylovState:
    """The engine behind `lanczos_top_k` and `slq_density`: one `lax.while_loop`.

    Lanczos with full reorthogonalization, written as a symmetric Arnoldi
    process: q_0 = start/‖start‖; step j applies `matvec` to q_j,
    orthogonalizes H q_j twice against every stored basis row (classical
    Gram–Schmidt) and appends the normalized remainder as q_{j+1}. All
    coefficients are kept, T[:, j] = Qᵀ H q_j (tridiagonal up to rounding).

    Breakdown (the remainder vanishes to working precision: the basis spans
    an invariant subspace): with `restart`, the loop continues from a fresh
    direction orthogonalized against the basis — `reserve` if given and not
    yet used, else a deterministic pseudo-random vector — coupled with a zero
    coefficient, and stops only once the basis spans the whole space;
    without `restart` it stops. Restarting is what lets Lanczos find every
    copy of a repeated eigenvalue: one Krylov space holds a single vector of
    each eigenspace. A zero `start` is replaced by such a fresh direction.

    Stops after `num_iters` matvecs, at exhaustion, or when `tol` is given and
    the k selected Ritz pairs all have residual ≤ tol·|θ| (checked every step
    once steps ≥ k).
    """
    dtype = start.dtype
    (P,) = start.shape
    block, num_blocks = basis.layout(1 + num_iters, P)
    S = block * num_blocks
    eps = basis.eps(dtype)
    reserve = None if reserve is None else jnp.asarray(reserve, dtype).reshape(P)

    def candidate(blocks, n, r):
        """r orthogonalized twice against the basis: (remainder, its norm, accepted)."""
        _, r2, n1, n2 = basis.cgs2(blocks, r, n)
        return r2, n2, basis.accept(jnp.linalg.norm(r), n1, n2, 1e2 * eps * jnp.linalg.norm(r))

    def fresh_candidate(blocks, n, reserve_used, salt):
        """A fresh direction: `reserve` (if unused), else a pseudo-random vector.

        Returns (remainder, norm, ok, reserve_used); ok is False only when the
        basis already spans the whole space. The conditionals return vectors,
        never the basis (see `basis.write_row`).
        """
        def random_candidate(blocks, n):
            return candidate(blocks, n, basis.hash_vector(P, salt, dtype))

        if reserve is None:
            return (*random_candidate(blocks, n), reserve_used)

        def reserve_then_random(blocks, n):
            r2, n2, ok = candidate(blocks, n, reserve)
            return lax.cond(ok, lambda b, n: (r2, n2, ok), random_candidate, blocks, n)

        r2, n2, ok = lax.cond(reserve_used, random_candidate, reserve_then_random, blocks, n)
        return r2, n2, ok, jnp.bool_(True)

    def no_candidate(blocks, n, reserve_used):
        zero = jnp.zeros((P,), dtype)
        return zero, jnp.zeros((), dtype), jnp.bool_(True), reserve_used

    def append_fresh(blocks, n, reserve_used, need, salt):
        """When `need`, appends a fresh direction; returns (blocks, n, reserve_used, ok)."""
        r2, n2, ok, reserve_used = lax.cond(
            need, lambda b, n, u: fresh_candidate(b, n, u, salt), no_candidate,
            blocks, n, reserve_used)
        blocks, n = basis.append_row(blocks, n, r2, n2, need & ok)
        return blocks, n, reserve_used, ok

    blocks = tuple(jnp.zeros((block, P), dtype) for _ in range(num_blocks))
    r2, n2, ok = candidate(blocks, jnp.int32(0), start)
    blocks, n_basis = basis.append_row(blocks, jnp.int32(0), r2, n2, ok)
    # A degenerate start (e.g. zero): begin from a fresh direction instead.
    blocks, n_basis, reserve_used, _ = append_fresh(blocks, n_basis, jnp.bool_(reserve is None),
                                                    n_basis == 0, 2**31 - 1)

    state = KrylovState(
        blocks=blocks, T=jnp.zeros((S, S), dtype), steps=jnp.int32(0), n_basis=n_basis,
        scale=jnp.zeros((), dtype), reserve_used=reserve_used, converged=jnp.bool_(False),
        exhausted=jnp.bool_(False))

    def cond_fn(s: KrylovState):
        return (s.steps < num_iters) & (s.steps < s.n_basis) & ~s.converged

    def body_fn(s: KrylovState):
        j = s.steps
        q = basis.read_row(s.blocks, j)
        w = jnp.asarray(matvec(q)).astype(dtype).reshape(P)
        h, w2, n1, n2 = basis.cgs2(s.blocks, w, s.n_basis)
        scale = jnp.maximum(s.scale, jnp.linalg.norm(w))
        ok = basis.accept(jnp.linalg.norm(w), n1, n2, 10 * eps * scale)
        T = s.T.at[:, j].set(h)
        T = T.at[s.n_basis, j].set(jnp.where(ok, n2, 0.0).astype(dtype))
        blocks, n_basis = basis.append_row(s.blocks, s.n_basis, w2, n2, ok)
        reserve_used, exhausted = s.reserve_used, s.exhausted
        if restart:
            need = n_basis == j + 1          # breakdown with nothing left to process
            blocks, n_basis, reserve_used, ok_r = append_fresh(blocks, n_basis, reserve_used,
                                                               need, j)
            exhausted = need & ~ok_r
        steps = j + 1
        converged = s.converged
        if tol is not None:
            def check(T):
                theta, res = ritz_residual_estimates(T, steps, k, which)
                return jnp.all(res <= tol * jnp.abs(theta))
            converged = lax.cond(steps >= k, check, lambda T: jnp.bool_(False), T)
        return KrylovState(blocks=blocks, T=T, steps=steps, n_basis=n_basis, scale=scale,
                           reserve_used=reserve_used, converged=converged, exhausted=exhausted)

    return lax.while_loop(cond_fn, body_fn, state)


def warm_start_vector(v0: jax.Array, init_vectors: jax.Array,
                      v0_weight: float = _WARM_V0_WEIGHT) -> jax.Array:
    """The Lanczos start vector for a warm start: Σ_i u_i/‖u_i‖, normalized, + w·v0/‖v0‖.

    Zero rows of `init_vectors` are skipped; a zero sum leaves just v0.
    """
    dtype = v0.dtype
    U = jnp.asarray(init_vectors, dtype).reshape(-1, v0.shape[0])
    norms = jnp.linalg.norm(U, axis=1, keepdims=True)
    s = jnp.sum(jnp.where(norms > 0, U / jnp.where(norms > 0, norms, 1.0), 0.0), axis=0)
    unit = lambda x: x / jnp.where(jnp.linalg.norm(x) > 0, jnp.linalg.norm(x), 1.0)
    s = unit(s)
    return jnp.where(jnp.linalg.norm(s) > 0, s + v0_weight * unit(v0), v0)


def lanczos_top_k(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, k: int,
                  num_iters: int, *, tol: float | None = None,
                  init_vectors: jax.Array | None = None,
                  which: str = "largest") -> LanczosResult:
    """Top-k eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    The whole iteration is one `lax.while_loop`, so the function can be
    called eagerly (the loop runs compiled) or inside a caller's `jax.jit`
    whose `matvec` closes over traced values (params, data):

        @jax.jit
        def top(params, data, v0):
            _, unravel = ravel_pytree(params)
            matvec = lambda u: ravel_pytree(objective.hvp_fn(params, unravel(u), data))[0]
            return lanczos_top_k(matvec, v0, k=10, num_iters=60, tol=1e-3)

    Called eagerly, the whole computation (matvec included, its closed-over
    arrays passed as arguments) is compiled once per call — a few seconds;
    for repeated calls, jit a function that takes the operator's arrays as
    arguments, as above, and the compiled program is reused.

    Algorithm. The Krylov basis is a fixed (≈num_iters + 1, P) buffer held as
    blocks of rows; each step orthogonalizes H q_j against every stored row
    twice (classical Gram–Schmidt; blocks not yet in use are skipped, so the
    cost grows with the basis actually built), with `Precision.HIGHEST` dot
    products. All Gram–Schmidt coefficients are kept (T[:, j] = Qᵀ H q_j), and
    Ritz pairs come from the symmetrized leading block of T.

    Args:
      matvec: (P,) -> (P,), symmetric.
      v0: (P,) start vector; fixes size and dtype. Need not be normalized.
      k: number of eigenpairs (Python int, 1 ≤ k ≤ min(num_iters, P)).
      num_iters: maximum number of matvecs (Python int). With `tol=None`
        exactly this many are made unless the basis exhausts the space first.
      tol: stop early once every one of the k selected Ritz pairs has
        residual ≤ tol·|θ| (checked each step from step k on; `num_iters` is
        then a cap). The check uses the classical Lanczos estimate |β_s·y_s|
        from the tridiagonal part of T (`ritz_residual_estimates`: bisection
        and inverse iteration, O(k·steps) per step, no dense eigensolver); the
        returned residuals are the full ones described below. A residual r
        guarantees an eigenvalue within r of θ, and for a Ritz value
        separated by a gap δ from the rest of the spectrum the error is
        ≲ r²/δ, so tol=1e-3 is conservative for a 1e-3 eigenvalue accuracy. Like every Ritz-residual rule it cannot detect
        an eigenvalue the Krylov space has not yet seen at all.
      init_vectors: (m, P) warm start, e.g. the eigenvectors of a previous call
        along a trajectory (rows need not be orthonormal; zero rows are
        ignored). Lanczos then starts from Σ_i u_i/‖u_i‖ (normalized) plus
        0.1·v0/‖v0‖: a vector concentrated on the old top subspace, so each
        nearby new eigenvector has a large component in it instead of the
        ~1/√P of a random start, and converges in fewer matvecs. (A block
        start, Rayleigh–Ritz over span(init_vectors) followed by block
        Krylov expansion, was tried and needed *more* matvecs than a cold
        start for k ≥ 5: a block of m vectors only raises the polynomial
        degree once per m matvecs.) v0 is also kept as the first restart
        direction after a breakdown.
      which: "largest" (algebraic; negative eigenvalues are fine),
        "magnitude" (largest |λ|) or "smallest" (algebraic: the most negative
        first, e.g. λ_min of a Hessian at a saddle). "largest" and "magnitude"
        return the k selected pairs in descending algebraic order, "smallest"
        in ascending order. The Krylov space is the same for every `which`
        (it is shift-invariant); only the Ritz pairs kept and the stopping
        rule differ. A tol stop is relative to |θ|, so for λ_min ≈ 0 it may
        never trigger and num_iters is then the budget.

    Returns:
      LanczosResult(eigenvalues, eigenvectors, residuals, num_matvecs).
      `residuals` are ‖Hv − λv‖ obtained from the Arnoldi relation
      H Q_s = Q T[:, :s] (norm of T y − θ y, no extra matvec). With full
      reorthogonalization applied twice, this equals the true residual up to
      rounding (the tests check it against explicit matvecs). In exact
      arithmetic it is the classical |β_s · y_s| (last component), which is
      what it reduces to here apart from rounding-level reorthogonalization
      coefficients. Computing the residuals with k extra matvecs was
      rejected: for k = 10 that would add ~25% to a typical run.

    Breakdown. When H q_j lies in the span of the basis (β ≈ 0: the basis
    spans an invariant subspace) the iteration restarts from a fresh
    direction orthogonal to the basis (v0 when warm-started, else a
    deterministic pseudo-random vector) with zero coupling, so further
    eigenpairs —
    including further copies of a repeated eigenvalue — can still be found;
    it stops when the basis spans the whole space. No NaNs are produced. If
    fewer than k Ritz pairs exist at the end (only when the space is
    exhausted before k steps, impossible for k ≤ P), the missing entries are
    padding: eigenvalue 0, a zero eigenvector, residual +inf, placed last.
    """
    try:
        k, num_iters = operator.index(k), operator.index(num_iters)
    except TypeError:
        raise TypeError(f"k and num_iters must be integers (they fix array shapes); got "
                        f"k={k!r}, num_iters={num_iters!r}.") from None
    if which not in _WHICH:
        raise ValueError(f"which={which!r}; choose one of {_WHICH}.")
    v0 = jnp.asarray(v0)
    if v0.ndim != 1:
        raise ValueError(f"v0 must be a flat (P,) vector, got shape {v0.shape}.")
    if not jnp.issubdtype(v0.dtype, jnp.floating):
        v0 = v0.astype(jnp.float32)
    P = v0.shape[0]
    if not 1 <= k <= min(num_iters, P):
        raise ValueError(f"need 1 <= k <= min(num_iters, P); got k={k}, num_iters={num_iters}, "
                         f"P={P}.")
    if init_vectors is not None and (jnp.ndim(init_vectors) not in (1, 2)
                                     or jnp.shape(init_vectors)[-1] != P):
        raise ValueError(f"init_vectors must have shape (m, {P}); got {jnp.shape(init_vectors)}.")
    if tol is not None and tol < 0:
        raise ValueError(f"tol={tol} must be >= 0 or None.")

    def body(matvec, v0, init_vectors):
        if init_vectors is None:
            start, reserve = v0, None
        else:
            start, reserve = warm_start_vector(v0, init_vectors), v0
        state = krylov_decomposition(matvec, start, num_iters, reserve=reserve, k=k, tol=tol,
                                     which=which)
        theta, Y, residuals, _ = ritz_pairs(state.T, state.steps, k, which)
        vectors = basis.combine(state.blocks, Y)
        return LanczosResult(eigenvalues=theta, eigenvectors=vectors, residuals=residuals,
                             num_matvecs=state.steps)

    return compiled_call(body, matvec, v0, v0, init_vectors)
