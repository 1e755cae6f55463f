"""Curvature kernels on pytrees and flat vectors.

Public API (a promise to users; keep these names and signatures):

    hvp(loss_fn, params, v)                        Hessian-vector product
    gnvp(model_fn, output_loss_fn, params, v)      Gauss–Newton-vector product
    lanczos_top_k(matvec, v0, k, num_iters, *, tol=None, init_vectors=None, which="largest")
                                                   top-k eigenpairs (Lanczos, full reorth.)
    slq_density(matvec, v0, key, num_probes, num_iters, grid, sigma)
                                                   spectral density (stochastic Lanczos quadrature)
    hutchinson_trace(matvec, v0, key, num_probes)  trace estimate with its standard error

Matvecs act on flat (P,) vectors; `lossland.objective.flat_matvec` wraps a
pytree product such as `Objective.hvp_fn` into one.

Full-batch chunked forms of hvp and gnvp live in `lossland.objective`
(`full_batch_hvp`, `full_batch_gnvp`, `Objective.hvp`, `Objective.gnvp`).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

PyTree = Any


def hvp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
    """H v, where H = ∇² loss_fn(params); forward-over-reverse (jvp of grad).

    Args:
      loss_fn: params -> scalar.
      params, v: pytrees of the same structure.
    Returns:
      A pytree like `params`. Cost: about one gradient plus one forward-mode
      pass through it (≈ 1.5–2 gradients).
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def gnvp(model_fn: Callable[[PyTree], jax.Array], output_loss_fn: Callable[[jax.Array], jax.Array],
         params: PyTree, v: PyTree) -> PyTree:
    """G v = Jᵀ H_out J v, the Gauss–Newton part of the Hessian of output_loss_fn∘model_fn.

    J is the Jacobian of the network outputs z = model_fn(params), and
    H_out = ∇²_z output_loss_fn(z). The full Hessian splits as
        ∇²(ℓ∘f) = Jᵀ H_out J + Σ_i (∂ℓ/∂z_i) ∇² z_i,
    so the residual part is `hvp(loss, params, v) − gnvp(...)`.

    Args:
      model_fn: params -> outputs z (any shape), e.g. `lambda p: apply(p, x)`.
      output_loss_fn: z -> scalar loss, e.g. `lambda z: losses.mse(z, y)`.
      params, v: pytrees of the same structure.

    Example, with a user's own Flax model:

        model_fn = lambda p: model.apply({"params": p}, x)
        output_loss_fn = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
        Gv = gnvp(model_fn, output_loss_fn, params, v)
    """
    z, jv = jax.jvp(model_fn, (params,), (v,))           # J v, in output space
    h_out_jv = jax.jvp(jax.grad(output_loss_fn), (z,), (jv,))[1]   # H_out (J v)
    _, vjp_fn = jax.vjp(model_fn, params)
    return vjp_fn(h_out_jv)[0]                            # Jᵀ (H_out J v)


# ----------------------------------------------------------------------------
# Lanczos with full reorthogonalization
# ----------------------------------------------------------------------------

_HIGHEST = jax.lax.Precision.HIGHEST
_WHICH = ("largest", "magnitude")
_RESTART_SEED = 0x1A2C05  # fixed: restart vectors are a deterministic function of the step
_WARM_V0_WEIGHT = 0.1     # share of v0 mixed into a warm start (see `warm_start_vector`)


class LanczosResult(NamedTuple):
    """Top-k Ritz pairs. A NamedTuple, hence a pytree: it can leave a jit.

    Attributes:
      eigenvalues: (k,) Ritz values, descending (algebraic order, also for
        which="magnitude").
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


def _dot(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


_SINGLE_BLOCK_ELEMENTS = 1 << 22   # bases smaller than this are one masked block
_MAX_BLOCKS = 4


def _layout(num_slots: int, P: int) -> tuple[int, int]:
    """(block_size, num_blocks) for a basis of num_slots rows of length P.

    Small bases are one block: every Gram–Schmidt pass is one masked matmul
    over the whole buffer (unused rows are zero). Large ones are split into
    up to `_MAX_BLOCKS` blocks so that the passes skip the blocks not yet in
    use (`lax.cond` per block): on a memory-bound CPU/GPU this roughly halves
    the reorthogonalization traffic of a typical run, while keeping the
    compiled program small.
    """
    if num_slots * P <= _SINGLE_BLOCK_ELEMENTS:
        return num_slots, 1
    block = -(-num_slots // _MAX_BLOCKS)
    return block, -(-num_slots // block)


def _coefficients(blocks, w, n):
    """Q w over the first n basis rows (rows past n are zero; blocks past n are skipped)."""
    if len(blocks) == 1:
        return _dot(blocks[0], w)
    bs = blocks[0].shape[0]
    parts = [lax.cond(b * bs < n, lambda blk: _dot(blk, w),
                      lambda blk: jnp.zeros((bs,), w.dtype), blk)
             for b, blk in enumerate(blocks)]
    return jnp.concatenate(parts)


def _subtract(blocks, h, w, n):
    """w − Qᵀ h over the first n rows of the basis."""
    if len(blocks) == 1:
        return w - _dot(h, blocks[0])
    bs = blocks[0].shape[0]
    for b, blk in enumerate(blocks):
        hb = h[b * bs:(b + 1) * bs]
        w = lax.cond(b * bs < n, lambda blk, w, hb=hb: w - _dot(hb, blk),
                     lambda blk, w: w, blk, w)
    return w


def _cgs2(blocks, w, n):
    """Classical Gram–Schmidt, twice, against the first n basis rows.

    Returns (h, w2, ‖w1‖, ‖w2‖) with w = Qᵀh + w2 and w1 the remainder after
    the first pass. `w2` is orthogonal to the basis to working precision when
    ‖w2‖ > ‖w1‖/2 ("twice is enough", Kahan–Parlett); otherwise w lies in
    span(Q) to working precision.
    """
    h1 = _coefficients(blocks, w, n)
    w1 = _subtract(blocks, h1, w, n)
    h2 = _coefficients(blocks, w1, n)
    w2 = _subtract(blocks, h2, w1, n)
    return h1 + h2, w2, jnp.linalg.norm(w1), jnp.linalg.norm(w2)


def _write(blocks, v, i):
    """Stores v as basis row i."""
    if len(blocks) == 1:
        return (lax.dynamic_update_index_in_dim(blocks[0], v, i, 0),)
    bs = blocks[0].shape[0]
    block, row = i // bs, i % bs
    return tuple(lax.cond(block == b,
                          lambda blk: lax.dynamic_update_index_in_dim(blk, v, row, 0),
                          lambda blk: blk, blk)
                 for b, blk in enumerate(blocks))


def _read(blocks, i):
    """Basis row i."""
    if len(blocks) == 1:
        return lax.dynamic_index_in_dim(blocks[0], i, 0, keepdims=False)
    bs = blocks[0].shape[0]
    block, row = i // bs, i % bs
    out = jnp.zeros(blocks[0].shape[1:], blocks[0].dtype)
    for b, blk in enumerate(blocks):
        out = lax.cond(block == b,
                       lambda blk, out: lax.dynamic_index_in_dim(blk, row, 0, keepdims=False),
                       lambda blk, out: out, blk, out)
    return out


def _combine(blocks, Y):
    """Yᵀ Q for Y (S, k): the Ritz vectors as (k, P) rows."""
    bs = blocks[0].shape[0]
    return sum(_dot(Y[b * bs:(b + 1) * bs].T, blk) for b, blk in enumerate(blocks))


def _append(blocks, n, v, norm, ok):
    """Stores v/norm as row n when ok; returns (blocks, n')."""
    safe = jnp.where(ok, norm, 1.0)
    blocks = lax.cond(ok, lambda bl: _write(bl, v / safe, n), lambda bl: bl, blocks)
    return blocks, n + ok.astype(n.dtype)


def _accept(norm_in, norm1, norm2, floor):
    """Whether a twice-orthogonalized remainder is a new direction (see `_cgs2`)."""
    return (norm2 > 0.5 * norm1) & (norm2 > floor) & (norm2 > 1e3 * _tiny(norm_in.dtype)) & \
        jnp.isfinite(norm2)


def _hash_vector(P: int, salt, dtype) -> jax.Array:
    """A deterministic, generic-direction vector with entries in [−1/2, 1/2).

    An integer hash (a murmur3-style finalizer of index and salt) rather than
    `jax.random`: restart directions only need to be generic, and this
    compiles in a fraction of the time of a threefry draw.
    """
    u32 = lambda c: jnp.uint32(c)
    x = lax.iota(jnp.uint32, P) * u32(0x9E3779B1)
    x = x + (jnp.asarray(salt).astype(jnp.uint32) * u32(0x85EBCA77) + u32(_RESTART_SEED))
    x = x ^ (x >> 15)
    x = x * u32(0x2C1B3C6D)
    x = x ^ (x >> 12)
    x = x * u32(0x297A2D39)
    x = x ^ (x >> 15)
    return (x >> 8).astype(dtype) / jnp.asarray(2.0 ** 24, dtype) - jnp.asarray(0.5, dtype)


def _tiny(dtype):
    return jnp.finfo(dtype).tiny


def _eps(dtype):
    return jnp.finfo(dtype).eps


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
    sentinel = jnp.where(fro > 0, -2.0 * fro - 1e3 * _tiny(T.dtype), -1.0)
    A = A + jnp.diag(jnp.where(active, 0.0, sentinel).astype(T.dtype))
    theta, Y = jnp.linalg.eigh(A, symmetrize_input=False)
    Y = jnp.where(active[:, None], Y, 0.0)
    is_active = jnp.sum(Y * Y, axis=0) > 0.5
    score = theta if which == "largest" else jnp.abs(theta)
    score = jnp.where(is_active, score, -jnp.inf)
    _, sel = lax.top_k(score, k)
    theta, Y, valid = theta[sel], Y[:, sel], is_active[sel]
    # Descending algebraic order, padding last.
    order = jnp.argsort(jnp.where(valid, -theta, jnp.inf))
    theta, Y, valid = theta[order], Y[:, order], valid[order]
    residuals = jnp.linalg.norm(_dot(T, Y) - Y * theta, axis=0)
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
    eps = _eps(dtype)
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
    pivmin = jnp.asarray(_tiny(dtype), dtype) * jnp.maximum(1.0, radius * radius)

    # Ascending indices (in the full S-sized matrix) of the candidate eigenvalues:
    # the inactive sentinels take the S − steps lowest places.
    top = S - 1 - jnp.arange(k)
    if which == "largest":
        targets = top
    else:
        bottom = S - steps + jnp.arange(k)
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
    x = jnp.where(active, 1.0 + _hash_vector(S, 7, dtype), 0.0)
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
    block, num_blocks = _layout(1 + num_iters, P)
    S = block * num_blocks
    eps = _eps(dtype)
    reserve = None if reserve is None else jnp.asarray(reserve, dtype).reshape(P)

    def try_vector(blocks, n, r):
        _, r2, n1, n2 = _cgs2(blocks, r, n)
        ok = _accept(jnp.linalg.norm(r), n1, n2, 1e2 * eps * jnp.linalg.norm(r))
        blocks, n = _append(blocks, n, r2, n2, ok)
        return blocks, n, ok

    def fresh_vector(blocks, n, reserve_used, salt):
        """Appends `reserve` (if unused) or else a random vector, orthogonalized.

        Returns (blocks, n, reserve_used, ok); ok is False only when the basis
        already spans the whole space.
        """
        def random_vector(blocks, n):
            return try_vector(blocks, n, _hash_vector(P, salt, dtype))

        if reserve is None:
            blocks, n, ok = random_vector(blocks, n)
            return blocks, n, reserve_used, ok

        def reserve_then_random(blocks, n):
            blocks, n, ok = try_vector(blocks, n, reserve)
            return lax.cond(ok, lambda b, n: (b, n, ok), random_vector, blocks, n)

        blocks, n, ok = lax.cond(reserve_used, random_vector, reserve_then_random, blocks, n)
        return blocks, n, jnp.bool_(True), ok

    blocks = tuple(jnp.zeros((block, P), dtype) for _ in range(num_blocks))
    blocks, n_basis, _ = try_vector(blocks, jnp.int32(0), start)
    reserve_used = jnp.bool_(reserve is None)
    # A degenerate start (e.g. zero): begin from a fresh direction instead.
    blocks, n_basis, reserve_used = lax.cond(
        n_basis == 0, lambda b, n, u: fresh_vector(b, n, u, 2**31 - 1)[:3],
        lambda b, n, u: (b, n, u), blocks, n_basis, reserve_used)

    state = KrylovState(
        blocks=blocks, T=jnp.zeros((S, S), dtype), steps=jnp.int32(0), n_basis=n_basis,
        scale=jnp.zeros((), dtype), reserve_used=reserve_used, converged=jnp.bool_(False),
        exhausted=jnp.bool_(False))

    def cond_fn(s: KrylovState):
        return (s.steps < num_iters) & (s.steps < s.n_basis) & ~s.converged

    def body_fn(s: KrylovState):
        j = s.steps
        q = _read(s.blocks, j)
        w = jnp.asarray(matvec(q)).astype(dtype).reshape(P)
        h, w2, n1, n2 = _cgs2(s.blocks, w, s.n_basis)
        scale = jnp.maximum(s.scale, jnp.linalg.norm(w))
        ok = _accept(jnp.linalg.norm(w), n1, n2, 10 * eps * scale)
        T = s.T.at[:, j].set(h)
        T = T.at[s.n_basis, j].set(jnp.where(ok, n2, 0.0).astype(dtype))
        blocks, n_basis = _append(s.blocks, s.n_basis, w2, n2, ok)
        reserve_used, exhausted = s.reserve_used, s.exhausted
        if restart:
            need = n_basis == j + 1          # breakdown with nothing left to process
            blocks, n_basis, reserve_used, ok_r = lax.cond(
                need, lambda b, n, u: fresh_vector(b, n, u, j),
                lambda b, n, u: (b, n, u, jnp.bool_(True)), blocks, n_basis, reserve_used)
            exhausted = ~ok_r
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


def _compiled(body: Callable, matvec: Callable, example: jax.Array, *args):
    """body(matvec, *args) as one `jax.jit` program.

    matvec is traced once to a jaxpr whose closed-over arrays (params, data,
    or tracers of a caller's jit) become arguments of the jitted program,
    never constants baked into it. Eager calls thus run compiled end to end
    (not op by op around the loop), and inside a caller's jit this is just
    an inlined nested jit.
    """
    closed = jax.make_jaxpr(matvec)(example)
    if len(closed.out_avals) != 1 or closed.out_avals[0].shape != example.shape:
        raise ValueError(f"matvec must map a {example.shape} vector to one {example.shape} "
                         f"vector; got outputs {closed.out_avals}.")
    jaxpr = closed.jaxpr

    def run(consts, *args):
        def hoisted(v):
            return jax.core.eval_jaxpr(jaxpr, consts, v)[0]
        return body(hoisted, *args)

    return jax.jit(run)(closed.consts, *args)


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
      which: "largest" (algebraic; negative eigenvalues are fine) or
        "magnitude" (largest |λ|). Either way the k selected pairs are
        returned in descending algebraic order.

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
        vectors = _combine(state.blocks, Y)
        return LanczosResult(eigenvalues=theta, eigenvectors=vectors, residuals=residuals,
                             num_matvecs=state.steps)

    return _compiled(body, matvec, v0, v0, init_vectors)


# ----------------------------------------------------------------------------
# Stochastic estimators
# ----------------------------------------------------------------------------

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

    nodes, weights = _compiled(body, matvec, v0, keys)
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


def hutchinson_trace(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, key: jax.Array,
                     num_probes: int) -> HutchinsonResult:
    """trace(H) ≈ mean of zᵀHz over Rademacher probes z (one matvec each, sequential).

    v0 fixes size and dtype only.
    """
    v0 = jnp.asarray(v0)
    (P,) = v0.shape
    if num_probes < 1:
        raise ValueError("num_probes must be >= 1.")

    def body(matvec, keys):
        def one(key):
            z = _rademacher(key, P, v0.dtype)
            return jnp.vdot(z, matvec(z), precision=_HIGHEST)
        return lax.map(one, keys)

    samples = _compiled(body, matvec, v0, jax.random.split(key, num_probes))
    estimate = jnp.mean(samples)
    if num_probes > 1:
        std_error = jnp.std(samples, ddof=1) / jnp.sqrt(num_probes)
    else:
        std_error = jnp.full((), jnp.inf, samples.dtype)
    return HutchinsonResult(estimate=estimate, std_error=std_error, samples=samples)
