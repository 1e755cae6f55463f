"""Streaming subspace iteration: the top-k eigenpairs of a slowly moving H_t, one product a step.

Owns the state and the update of the stream tracker (`lossland.streaming`).
It makes no products itself: the caller multiplies the `stream_pending` rows by
H_t (inside the fused training step, `grad_and_block_hvp`) and hands the images
to `stream_update`.

The state is a block V of b orthonormal rows and, beside it, W: row i of W is
the latest image H_{t_i} v_i of row i, computed at some step t_i ≤ t. At step t
the m = `refresh` pending rows get fresh images H_t v, then

  1. Rayleigh–Ritz over the whole block with each row's latest image:
     T = ½(V Wᵀ + W Vᵀ) (symmetrized: stale rows make V Wᵀ non-symmetric),
     T = Y diag(θ) Yᵀ, θ descending; Ritz vectors U = Yᵀ V, their images
     G = Yᵀ W, residuals ‖G_i − θ_i U_i‖.
  2. The block is rotated to the Ritz basis (V ← U, W ← G, images follow
     linearly), and the rows due next take one step of subspace iteration on
     H + τI: v ← orth((G_i + τ U_i) ⟂ the other rows), with the centred shift τ
     below; their images are computed at the next step. The rows due are all
     of them when m = b; for 1 < m < b the top Ritz row at every step (so λ1
     has a fresh image at every step, and the period-2 oscillation at the edge
     of stability is not blurred by stale images) and the next m − 1 of the
     other b − 1 rows
     in turn (a cursor over Ritz positions, each refreshed every
     ⌈(b−1)/(m−1)⌉ steps); for m = 1 < b one row in turn.

Exactness. When m = b every image is from step t, so G = H_t U exactly and the
residuals are the true ‖H_t u_i − θ_i u_i‖ (this is one step of subspace
iteration with Rayleigh–Ritz per training step). When m < b the images are
up to ⌈(b−1)/(m−1)⌉ − 1 updates of their block old (q times as many steps): the
values and residuals are those of the matrix the stale images define, and their
error is measured by the accuracy audit (`--stream_check_every`), not claimed exact.

Phases (period 2 at the edge of stability). The state holds q blocks, one per
phase of the step count: step t images and updates block t mod q only, so each
block follows the subsequence H_p, H_{p+q}, H_{p+2q}, … At the edge of
stability GD oscillates with period 2 and H_t with it: on the CE benchmark
trajectory the top eigenvectors of H_t and H_{t+1} overlap by 0.004–0.3 (λ1
alternates between two directions) while those of H_t and H_{t+2} overlap by
0.97–1.0 (BUILD_NOTES.md). A single block is turned by a large angle every
step and one product cannot bring it back; with q = 2 each block sees a nearly
fixed matrix. Same products per step, q times the memory; the Ritz pairs of a
step are those of its phase's block, at H_t. q = 1 is the plain algorithm.
The blocks are kept apart, as a tuple with the block imaged next first, and a
step reads and writes that block only (`current_block`, `update_block`,
`advance`): stacked in one (q, b, P) array, every step copied all of them.

Momentum (b = 1). A single vector (the k = 1 default) takes a step of the
momentum power method instead (Xu et al. 2018, "Accelerated stochastic power
iteration"): x' ∝ (H_t + σI) x − β x_prev, with x_prev the previous vector
scaled by the same normalization and β = (c (θ + σ))² / 4, c = MOMENTUM. While
(λ2 + σ) ≤ c (λ1 + σ) it contracts the other components by c / (1 + √(1 − c²))
a step (0.56 at c = 0.85) instead of (λ2 + σ)/(λ1 + σ) (0.8–0.9 at the edge of
stability); for c < 1 it cannot diverge. No extra product; one more vector per
phase (`previous`, zeros for b > 1, where the plain step is taken).

Largest algebraic, and the centred shift. Subspace iteration amplifies the
largest |λ + τ|. σ ≥ −λ_min is a bound kept in the state: it starts from a
cheap one (the smallest Ritz value of the cold-start Lanczos, negated) and
rises to −θ_min whenever a Ritz value of the block falls below −σ (σ never
falls, so the state stays a pure function of the trajectory). A block with
guard rows (b > k, the caller's k) steps with τ = (σ − θ_b)/2, θ_b the block's
smallest Ritz value: it centres the unwanted spectrum [λ_min, λ_{b+1}] ⊂
[−σ, θ_b] on 0, so every unwanted |λ + τ| ≤ (θ_b + σ)/2 < λ_i + τ for each
wanted λ_i > θ_b: the order stays the algebraic one and a large negative
eigenvalue never crowds the top out. If σ is not yet a true bound, a negative
direction the step amplifies is ranked last by Rayleigh–Ritz, into a guard row,
where it lowers θ_b and so raises σ past it (tested). Without guards (b = k)
the wanted λ_k is θ_b itself and the centring would tie it with −σ; σ then
steps as τ = σ, which a σ above −(λ_min + λ_k)/2 already keeps safe. Among
one-product filters p(H) = H + τI it is the one that minimizes the worst ratio
|λ + τ|/(λ_k + τ) over that interval (the optimal shift of the shifted power
method; Saad, "Numerical Methods for Large Eigenvalue Problems", ch. 4); τ = σ
maps λ_min to 0 but leaves the ratio (λ_{b+1} + σ)/(λ_k + σ) closer to 1. On
the tracking benchmark's --quick trajectory it halved the k = 10 error at
b = 12, m = 4 (BUILD_NOTES.md). The b = 1 momentum step keeps τ = σ: its
β assumes (λ2 + σ) ≤ c (λ1 + σ), and one row has no θ_b below θ_1.
Rayleigh–Ritz itself ranks algebraically, whatever the shift is.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lossland.curvature.basis import dot, eps
from lossland.curvature.block import orthonormalize_block

MOMENTUM = 0.85   # c: the assumed bound of (λ2 + σ)/(λ1 + σ) for b = 1 (module docstring)


class StreamState(NamedTuple):
    """The stream's state: q blocks, one per phase, kept apart (not stacked), so that a
    step reads and writes only the block it images (`current_block`, `advance`)."""
    basis: tuple        # q × (b, P): V per phase, orthonormal rows; basis[0] is imaged next
    images: tuple       # q × (b, P): W per phase, row i the latest image H_{t_i} v_i
    shift: jax.Array    # scalar σ ≥ 0, shared by the phases: the iteration runs on H + σI
    cursor: tuple       # q × int32: per phase, the first of the rows imaged at its next step
    phase: jax.Array    # int32: steps taken mod q (the phase of basis[0]); −1 = not started
    previous: tuple     # q × (1, P): b = 1, the previous vector scaled as the current
                        # (momentum); zeros for b > 1


class StreamBlock(NamedTuple):
    """The block of the phase imaged at this step: `current_block` reads it, `update_block`
    advances it, `advance` puts it back behind the others."""
    basis: jax.Array     # (b, P)
    images: jax.Array    # (b, P)
    cursor: jax.Array    # int32
    previous: jax.Array  # (1, P)


class StreamRitz(NamedTuple):
    eigenvalues: jax.Array   # (b,) Ritz values, descending
    eigenvectors: jax.Array  # (b, P) Ritz vectors, orthonormal rows
    residuals: jax.Array     # (b,) ‖G_i − θ_i u_i‖ from the latest images (exact when m = b)


def stream_start(vectors: jax.Array, values: jax.Array, shift, phases: int = 2) -> StreamState:
    """A state from b approximate eigenpairs, e.g. a short Lanczos's top-b Ritz pairs.

    Every phase's block starts from the same pairs. The images start as θ_i v_i:
    wrong by the Ritz residuals until each row's first fresh image replaces
    them. `shift` is σ, `phases` is q (see the module docstring).
    """
    basis = orthonormalize_block(vectors, jnp.zeros_like(vectors), 0)
    images = values[:, None] * basis
    previous = jnp.zeros((1, vectors.shape[1]), vectors.dtype)
    return StreamState(basis=(basis,) * phases, images=(images,) * phases,
                       shift=jnp.maximum(jnp.asarray(shift, vectors.dtype), 0.0),
                       cursor=(jnp.int32(0),) * phases, phase=jnp.int32(0),
                       previous=(previous,) * phases)


def current_block(state: StreamState) -> StreamBlock:
    """The block imaged at this step (phase `state.phase`)."""
    return StreamBlock(state.basis[0], state.images[0], state.cursor[0], state.previous[0])


def advance(state: StreamState, block: StreamBlock, shift) -> StreamState:
    """The state of the next step: `block` (this step's, updated) goes behind the others."""
    rotate = lambda blocks, new: tuple(blocks[1:]) + (new,)
    q = len(state.basis)
    return StreamState(basis=rotate(state.basis, block.basis),
                       images=rotate(state.images, block.images), shift=shift,
                       cursor=rotate(state.cursor, block.cursor),
                       phase=(state.phase + 1) % q,
                       previous=rotate(state.previous, block.previous))


def _slots(cursor, refresh: int, b: int):
    """The rows imaged at a step: all; or the top row and the next m − 1 of the others in
    turn; or, for m = 1 < b, one row in turn."""
    if refresh == b:
        return jnp.arange(b)
    if refresh == 1:
        return (cursor + jnp.arange(1)) % b
    return jnp.concatenate([jnp.zeros(1, jnp.int32),
                            1 + (cursor + jnp.arange(refresh - 1, dtype=jnp.int32)) % (b - 1)])


def _advance(cursor, refresh: int, b: int):
    """The cursor of the next step (see `_slots`)."""
    if refresh == b:
        return cursor
    if refresh == 1:
        return (cursor + 1) % b
    return (cursor + refresh - 1) % (b - 1)


def stream_pending(state: StreamState, refresh: int) -> jax.Array:
    """(refresh, P): the rows whose images H_t V the caller computes at this step."""
    return block_pending(current_block(state), refresh)


def block_pending(block: StreamBlock, refresh: int) -> jax.Array:
    """`stream_pending` of a block."""
    return block.basis[_slots(block.cursor, refresh, block.basis.shape[0])]


def stream_update(state: StreamState, fresh_images: jax.Array,
                  num_wanted: int | None = None) -> tuple[StreamState, StreamRitz]:
    """Rayleigh–Ritz with the pending rows' fresh images, then the next block.

    Args:
      state: the block whose `stream_pending` rows were multiplied by H_t.
      fresh_images: (m, P) H_t times those rows; m (static) is the refresh count.
      num_wanted: k, the pairs the caller reports (static). With guard rows (k < b) the
        step takes the centred shift; without (k = b, or None) the shift σ itself.
    Returns:
      (the state for step t + 1, the Ritz pairs of H_t on span V at step t, from
      this step's phase's block; the other phases' blocks are untouched).
    """
    block, shift, ritz = update_block(current_block(state), state.shift, fresh_images,
                                      num_wanted)
    return advance(state, block, shift), ritz


def _next_rows(U, G, theta, due, is_due, tau, Y, T):
    """The due rows' next vectors: (H + τI) u_i = G_i + τ u_i, orthonormal and ⟂ the others.

    Block classical Gram–Schmidt, twice, then one QR. X_i = (θ_i + τ) u_i + r_i
    (r_i = G_i − θ_i u_i), so its overlaps with the other Ritz vectors are known
    without touching P-vectors: X Uᵀ = Yᵀ (W Vᵀ) Y + τ I on the due rows, W Vᵀ = Tᵀ.
    The first pass takes them from there (exact while V's rows are orthonormal);
    the second is explicit and removes what rounding and V's drift left. A row
    that vanishes (θ_i + τ ≈ 0 and r_i ≈ 0: u_i is an eigenvector the shift maps
    to 0) keeps u_i, which is already ⟂ the others: the block keeps full rank.
    """
    others = jnp.where(is_due[:, None], 0.0, U)
    overlaps = jnp.where(is_due[None, :], 0.0, dot(dot(Y.T, T.T), Y)[due])     # (m, b)
    X = G[due] + tau * U[due] - dot(overlaps, others)
    X = X - dot(dot(X, others.T), others)
    norms = jnp.linalg.norm(X, axis=1, keepdims=True)
    scale = jnp.max(jnp.abs(theta)) + jnp.abs(tau) + jnp.finfo(X.dtype).tiny
    floor = eps(X.dtype) * scale
    X = jnp.where(norms > 1e3 * floor, X / jnp.maximum(norms, floor), U[due])
    return jnp.linalg.qr(X.T)[0].T


def update_block(block: StreamBlock, shift, fresh_images: jax.Array,
                 num_wanted: int | None = None) -> tuple[StreamBlock, jax.Array, StreamRitz]:
    """`stream_update` on the current block alone: (its next value, σ', the Ritz pairs)."""
    V, cursor = block.basis, block.cursor
    b, m = V.shape[0], fresh_images.shape[0]
    W = fresh_images if m == b else block.images.at[_slots(cursor, m, b)].set(fresh_images)
    T = dot(V, W.T)
    if b == 1:      # the Rayleigh quotient; no rotation
        theta, U, G = T[0], V, W
    else:
        theta, Y = jnp.linalg.eigh(0.5 * (T + T.T))
        theta, Y = theta[::-1], Y[:, ::-1]
        U, G = dot(Y.T, V), dot(Y.T, W)
    residuals = jnp.linalg.norm(G - theta[:, None] * U, axis=1)
    shift = jnp.maximum(shift, -theta[-1])
    cursor = _advance(cursor, m, b)
    previous = block.previous
    if b == 1:      # the momentum power method (module docstring); U is V here, ‖V‖ = 1
        X = G + shift * U - (MOMENTUM * (theta[0] + shift)) ** 2 / 4 * previous
        norm = jnp.linalg.norm(X)
        basis, previous = X / norm, U / norm
    else:           # the centred shift τ = (σ − θ_b)/2 with guard rows (module docstring)
        due = _slots(cursor, m, b)
        is_due = jnp.zeros((b,), bool).at[due].set(True)
        centred = num_wanted is not None and num_wanted < b
        tau = 0.5 * (shift - theta[-1]) if centred else shift
        basis = U.at[due].set(_next_rows(U, G, theta, due, is_due, tau, Y, T))
    new_block = StreamBlock(basis=basis, images=G, cursor=cursor, previous=previous)
    return new_block, shift, StreamRitz(eigenvalues=theta, eigenvectors=U, residuals=residuals)
