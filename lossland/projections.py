"""Dom/Bulk subspace projections of the gradient as optax transformations (claim C4).

With V_k the (k, P) orthonormal top-k Hessian eigenvectors and P = V_kᵀ V_k the
projector onto their span (MISSION.md, "Subspace ablations"):

    Dom:   g ↦ P g              (the update restricted to the dominant subspace)
    Bulk:  g ↦ (I − P) g        (the update with its dominant part removed)

Both are `optax.GradientTransformation`s meant to sit first in a chain, before
the base optimizer (`train.make_optimizer(..., extra=projection)`), so they act
on the raw gradient of GD, SGD, momentum and Adam alike.

An optax `update` sees gradients only, never a Hessian. The eigenvectors are
therefore recomputed outside `update`, by the pure function
`refresh_projections(opt_state, hvp_matvec)`, which the training step
(`train.make_train_step`) calls on the whole (chained) optimizer state before
each update, with the HVP at the current params on the current batch. It finds
every `SubspaceProjectionState` in the state pytree and, when one is due,
replaces its eigenvectors by a warm-started `curvature.lanczos_top_k` (one
`lax.cond`, so the step compiles once). All state is arrays: it checkpoints with
orbax inside `opt_state`, and a resumed run refreshes on the same schedule.

Schedule, with c the number of updates applied so far (the state's `count`):
  * c < switch_step: identity, no refresh (the run is plain training);
  * c ≥ switch_step: project; refresh at c = switch_step + j·R, j = 0, 1, ...
    (with the default switch_step = 0: at c = 0, R, 2R, ...).

k = 0 is allowed: Bulk is then the identity and Dom the zero update. orbax
refuses zero-size arrays, so the state holds a (max(k, 1), P) buffer and a
(max(k, 1),) row mask; only rows with mask 1 enter the projector.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from lossland import curvature

KINDS = ("dom", "bulk")
_HIGHEST = lax.Precision.HIGHEST


@flax.struct.dataclass
class SubspaceProjectionState:
    """State of one Dom/Bulk projection (a pytree of arrays plus static settings).

    Attributes:
      vectors: (max(k,1), P) eigenvectors of the last refresh, rows orthonormal.
      eigenvalues: (max(k,1),) their Ritz values (for inspection).
      mask: (max(k,1),) 1.0 for rows in use (all k rows after the first
        refresh), 0.0 otherwise. All zero means "never refreshed".
      count: int32 scalar, updates applied so far.
      num_refreshes: int32 scalar, eigenvector refreshes so far.
      num_matvecs: int32 scalar, Hessian-vector products spent on refreshes so far.
    """
    vectors: jax.Array
    eigenvalues: jax.Array
    mask: jax.Array
    count: jax.Array
    num_refreshes: jax.Array
    num_matvecs: jax.Array
    kind: str = flax.struct.field(pytree_node=False, default="dom")
    k: int = flax.struct.field(pytree_node=False, default=0)
    refresh_every: int = flax.struct.field(pytree_node=False, default=1)
    switch_step: int = flax.struct.field(pytree_node=False, default=0)
    num_iters: int = flax.struct.field(pytree_node=False, default=1)
    tol: Optional[float] = flax.struct.field(pytree_node=False, default=None)
    seed: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def active(self) -> jax.Array:
        """True once the projection applies (count ≥ switch_step)."""
        return self.count >= self.switch_step

    @property
    def refresh_due(self) -> jax.Array:
        """True when `refresh_projections` recomputes the eigenvectors at this count."""
        since = self.count - self.switch_step
        return (since >= 0) & (since % self.refresh_every == 0)


def _is_state(node) -> bool:
    return isinstance(node, SubspaceProjectionState)


def find_projection_states(opt_state) -> list[SubspaceProjectionState]:
    """Every SubspaceProjectionState inside an (arbitrarily chained) optimizer state."""
    return [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_state) if _is_state(s)]


def apply_projection(flat_g: jax.Array, state: SubspaceProjectionState) -> jax.Array:
    """P g (dom) or (I − P) g (bulk) for a flat (P,) vector, P from the state's masked rows."""
    coefficients = state.mask * jnp.matmul(state.vectors, flat_g, precision=_HIGHEST)
    top = jnp.matmul(coefficients, state.vectors, precision=_HIGHEST)
    return top if state.kind == "dom" else flat_g - top


def _refresh(state: SubspaceProjectionState, hvp_matvec: Callable) -> SubspaceProjectionState:
    """New top-k eigenvectors by Lanczos; warm-started from the current ones once they exist.

    One Lanczos call serves both cases, so it is compiled once: before the
    first refresh the state's vectors are all zero, and `lanczos_top_k` drops
    degenerate (zero) start rows and starts from v0 alone — a cold start.
    """
    key = jax.random.fold_in(jax.random.key(state.seed), state.num_refreshes)
    v0 = jax.random.normal(key, state.vectors.shape[1:], state.vectors.dtype)
    init_vectors = state.mask[:, None] * state.vectors  # zero until the first refresh
    result = curvature.lanczos_top_k(hvp_matvec, v0, state.k, state.num_iters, tol=state.tol,
                                     init_vectors=init_vectors)
    eigenvalues = result.eigenvalues.astype(state.eigenvalues.dtype)
    vectors = result.eigenvectors.astype(state.vectors.dtype)
    return state.replace(vectors=vectors, eigenvalues=eigenvalues,
                         mask=jnp.ones_like(state.mask), num_refreshes=state.num_refreshes + 1,
                         num_matvecs=state.num_matvecs + jnp.asarray(result.num_matvecs, jnp.int32))


def refresh_projection(state: SubspaceProjectionState,
                       hvp_matvec: Callable[[jax.Array], jax.Array]) -> SubspaceProjectionState:
    """Refreshes one projection state if it is due at its count (see module docstring)."""
    if state.k == 0:
        return state  # nothing to compute: the projector is 0
    return lax.cond(state.refresh_due, lambda s: _refresh(s, hvp_matvec), lambda s: s, state)


def refresh_projections(opt_state, hvp_matvec: Callable[[jax.Array], jax.Array]):
    """Refreshes every due SubspaceProjectionState inside `opt_state`; pure.

    Args:
      opt_state: an optax state pytree (e.g. of `optax.chain(projection, base)`).
      hvp_matvec: (P,) -> (P,) Hessian-vector product at the current params on
        the current batch (full batch for GD), in the flat order of `ravel_pytree`.
    Returns:
      opt_state with the same structure; call it before `optimizer.update`.
    """
    return jax.tree_util.tree_map(
        lambda node: refresh_projection(node, hvp_matvec) if _is_state(node) else node,
        opt_state, is_leaf=_is_state)


def _subspace_projection(kind: str, k: int, refresh_every: int, *, switch_step: int = 0,
                         num_iters: Optional[int] = None, tol: Optional[float] = None,
                         seed: int = 0) -> optax.GradientTransformation:
    if kind not in KINDS:
        raise ValueError(f"unknown projection {kind!r}; choose one of {list(KINDS)}.")
    if k < 0:
        raise ValueError(f"k={k} must be >= 0.")
    if refresh_every < 1:
        raise ValueError(f"refresh_every={refresh_every} must be >= 1.")
    if switch_step < 0:
        raise ValueError(f"switch_step={switch_step} must be >= 0.")
    num_iters = max(2 * k, 20) if num_iters is None else num_iters
    if k and num_iters < k:
        raise ValueError(f"Lanczos needs at least k={k} iterations to find k eigenvectors; "
                         f"got num_iters={num_iters} (--lanczos_iters).")

    def init_fn(params):
        flat = ravel_pytree(params)[0]
        if k > flat.shape[0]:
            raise ValueError(f"k={k} exceeds the number of parameters P={flat.shape[0]}.")
        rows = max(k, 1)
        return SubspaceProjectionState(
            vectors=jnp.zeros((rows, flat.shape[0]), flat.dtype),
            eigenvalues=jnp.zeros((rows,), flat.dtype), mask=jnp.zeros((rows,), flat.dtype),
            count=jnp.zeros((), jnp.int32), num_refreshes=jnp.zeros((), jnp.int32),
            num_matvecs=jnp.zeros((), jnp.int32), kind=kind, k=k, refresh_every=refresh_every, switch_step=switch_step,
            num_iters=min(num_iters, flat.shape[0]) if k else num_iters, tol=tol, seed=seed)

    def update_fn(updates, state: SubspaceProjectionState, params=None):
        del params
        if k == 0:  # the projector is 0: bulk is the identity, dom the zero update
            out = updates if kind == "bulk" else jax.tree_util.tree_map(
                lambda u: jnp.where(state.active, jnp.zeros_like(u), u), updates)
            return out, state.replace(count=state.count + 1)
        flat, unravel = ravel_pytree(updates)
        projected = jnp.where(state.active, apply_projection(flat, state), flat)
        return unravel(projected), state.replace(count=state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def project_onto_top_subspace(k: int, refresh_every: int, **kwargs) -> optax.GradientTransformation:
    """Dom: g ↦ V_kᵀV_k g, V_k refreshed every `refresh_every` steps.

    Keyword args: switch_step (identity before it; default 0), num_iters (Lanczos
    iterations per refresh; default max(2k, 20)), tol (Lanczos early stop, relative
    residual; default None = all iterations), seed (Lanczos start vectors).
    The eigenvectors come from `refresh_projections`, which `train.make_train_step`
    calls; in a hand-written loop call it before each `update`.
    """
    return _subspace_projection("dom", k, refresh_every, **kwargs)


def project_out_top_subspace(k: int, refresh_every: int, **kwargs) -> optax.GradientTransformation:
    """Bulk: g ↦ (I − V_kᵀV_k) g; see `project_onto_top_subspace` for the arguments."""
    return _subspace_projection("bulk", k, refresh_every, **kwargs)


def make_projection(kind: str, *, k: int, refresh_every: int, switch_step: int = 0,
                    num_iters: Optional[int] = None, seed: int = 0,
                    tol: Optional[float] = None) -> optax.GradientTransformation:
    """The projection named by --projection: "dom" or "bulk"."""
    builders = {"dom": project_onto_top_subspace, "bulk": project_out_top_subspace}
    if kind not in builders:
        raise ValueError(f"unknown projection {kind!r}; choose one of {list(builders)}.")
    return builders[kind](k, refresh_every, switch_step=switch_step, num_iters=num_iters,
                          tol=tol, seed=seed)


def projection_summary(opt_state) -> dict[str, Any]:
    """Counts of every projection state in opt_state (for logs and tests)."""
    return {f"projection_{i}": {"kind": s.kind, "k": s.k, "count": int(s.count),
                                "num_refreshes": int(s.num_refreshes),
                                "num_matvecs": int(s.num_matvecs)}
            for i, s in enumerate(find_projection_states(opt_state))}
