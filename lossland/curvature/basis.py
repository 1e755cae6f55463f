"""The Krylov basis: a fixed buffer of orthonormal rows and Gram–Schmidt against it.

Owns how basis rows are stored (one masked block, or a few blocks that the
passes skip until used), classical Gram–Schmidt applied twice, the test
that accepts a new direction, and the deterministic restart vectors. It
holds no iteration: `lanczos.krylov_decomposition` drives it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = jax.lax.Precision.HIGHEST
_RESTART_SEED = 0x1A2C05  # fixed: restart vectors are a deterministic function of the step


def dot(a, b):
    return jnp.matmul(a, b, precision=HIGHEST)


_SINGLE_BLOCK_ELEMENTS = 1 << 22   # bases smaller than this are one masked block
_MAX_BLOCKS = 4


def layout(num_slots: int, P: int) -> tuple[int, int]:
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


def coefficients(blocks, w, n):
    """Q w over the first n basis rows (rows past n are zero; blocks past n are skipped)."""
    if len(blocks) == 1:
        return dot(blocks[0], w)
    bs = blocks[0].shape[0]
    parts = [lax.cond(b * bs < n, lambda blk: dot(blk, w),
                      lambda blk: jnp.zeros((bs,), w.dtype), blk)
             for b, blk in enumerate(blocks)]
    return jnp.concatenate(parts)


def subtract(blocks, h, w, n):
    """w − Qᵀ h over the first n rows of the basis."""
    if len(blocks) == 1:
        return w - dot(h, blocks[0])
    bs = blocks[0].shape[0]
    for b, blk in enumerate(blocks):
        hb = h[b * bs:(b + 1) * bs]
        w = lax.cond(b * bs < n, lambda blk, w, hb=hb: w - dot(hb, blk),
                     lambda blk, w: w, blk, w)
    return w


def cgs2(blocks, w, n):
    """Classical Gram–Schmidt, twice, against the first n basis rows.

    Returns (h, w2, ‖w1‖, ‖w2‖) with w = Qᵀh + w2 and w1 the remainder after
    the first pass. `w2` is orthogonal to the basis to working precision when
    ‖w2‖ > ‖w1‖/2 ("twice is enough", Kahan–Parlett); otherwise w lies in
    span(Q) to working precision.
    """
    h1 = coefficients(blocks, w, n)
    w1 = subtract(blocks, h1, w, n)
    h2 = coefficients(blocks, w1, n)
    w2 = subtract(blocks, h2, w1, n)
    return h1 + h2, w2, jnp.linalg.norm(w1), jnp.linalg.norm(w2)


def write_row(blocks, v, i):
    """Stores v as basis row i (0 ≤ i < rows), in place.

    No `lax.cond` returns a block: inside the Lanczos `while_loop` a
    conditional that outputs the basis makes XLA copy it every step, which on
    a large model cost more than the matvec. Every block instead gets an
    in-place row update that rewrites its own row unchanged unless it holds i.
    """
    if len(blocks) == 1:
        return (lax.dynamic_update_index_in_dim(blocks[0], v, i, 0),)
    bs = blocks[0].shape[0]
    block, row = i // bs, i % bs
    out = []
    for b, blk in enumerate(blocks):
        current = lax.dynamic_index_in_dim(blk, row, 0, keepdims=False)
        out.append(lax.dynamic_update_index_in_dim(blk, jnp.where(block == b, v, current),
                                                   row, 0))
    return tuple(out)


def read_row(blocks, i):
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


def combine(blocks, Y):
    """Yᵀ Q for Y (S, k): the Ritz vectors as (k, P) rows."""
    bs = blocks[0].shape[0]
    return sum(dot(Y[b * bs:(b + 1) * bs].T, blk) for b, blk in enumerate(blocks))


def append_row(blocks, n, v, norm, ok):
    """Stores v/norm as row n when ok (and a row is free); returns (blocks, n').

    Unconditional in form (see `write_row`): when not ok, row n is rewritten
    with its own (unused, zero) contents.
    """
    rows = blocks[0].shape[0] * len(blocks)
    ok = ok & (n < rows)
    index = jnp.minimum(n, rows - 1)
    safe = jnp.where(ok, norm, 1.0)
    blocks = write_row(blocks, jnp.where(ok, v / safe, read_row(blocks, index)), index)
    return blocks, n + ok.astype(n.dtype)


def accept(norm_in, norm1, norm2, floor):
    """Whether a twice-orthogonalized remainder is a new direction (see `cgs2`)."""
    return (norm2 > 0.5 * norm1) & (norm2 > floor) & (norm2 > 1e3 * tiny(norm_in.dtype)) & \
        jnp.isfinite(norm2)


def hash_vector(P: int, salt, dtype) -> jax.Array:
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


def tiny(dtype):
    return jnp.finfo(dtype).tiny


def eps(dtype):
    return jnp.finfo(dtype).eps
