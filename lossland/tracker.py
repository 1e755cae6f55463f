"""`Tracker`: the top Hessian eigenpairs of your own loss, along your own training loop.

    tracker = Tracker(loss_fn, k=10, num_iters=60, tol=1e-3)
    state = tracker.init(params, key)
    result, state = tracker.update(params, state, *args)   # jitted, warm-started

`loss_fn(params, *args)` returns a scalar: any pure loss (a minibatch, a full
batch), or `objective.loss_fn` of an `Objective` over chunked data, whose
HVPs are then chunked too (memory of one chunk): `update(params, state, data)`.

Each update runs Lanczos on HVPs (`lossland.curvature.lanczos_top_k`, full
reorthogonalization, stopping once every top-k residual ≤ tol·|λ|), started
from the previous update's eigenvectors, and returns a `TrackerResult`:
eigenvalues (descending), residuals ‖Hv − λv‖, eigenvectors (k, P) in
`ravel_pytree(params)` order, χ_1 and χ_k (the fraction of ‖∇L‖² inside the
top-1 and top-k eigenspaces, `lossland.subspace`) and num_matvecs.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from lossland import curvature, subspace
from lossland.objective import Objective, flat_matvec


class TrackerResult(NamedTuple):
    eigenvalues: jax.Array    # (k,) descending
    residuals: jax.Array      # (k,) ‖H v_i − λ_i v_i‖
    eigenvectors: jax.Array   # (k, P) orthonormal rows
    chi_1: jax.Array          # ‖v_1ᵀ g‖² / ‖g‖²
    chi_k: jax.Array          # ‖V_k g‖² / ‖g‖²
    num_matvecs: jax.Array    # HVPs this update made


class TrackerState(NamedTuple):
    eigenvectors: jax.Array   # (k, P): the warm start; zeros before the first update
    key: jax.Array            # for the random part of each start vector
    num_updates: jax.Array


def _objective_of(loss_fn) -> Objective | None:
    """The Objective when loss_fn is `objective.loss_fn` (its chunked kernels are then used)."""
    owner = getattr(loss_fn, "__self__", None)
    if isinstance(owner, Objective) and getattr(loss_fn, "__func__", None) is Objective.loss_fn:
        return owner
    return None


class Tracker:
    """Warm-started top-k Hessian eigenpairs of `loss_fn(params, *args)`; see the module doc."""

    def __init__(self, loss_fn: Callable[..., jax.Array], k: int = 10, num_iters: int = 60,
                 tol: float = 1e-3):
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"k={k!r}: must be an integer >= 1.")
        if not (isinstance(num_iters, int) and num_iters >= k):
            raise ValueError(f"num_iters={num_iters!r}: must be an integer >= k={k}.")
        if tol < 0:
            raise ValueError(f"tol={tol!r}: must be >= 0 (0 = run all num_iters).")
        self.loss_fn, self.k, self.num_iters, self.tol = loss_fn, k, num_iters, tol
        self._objective = _objective_of(loss_fn)
        self._update = jax.jit(self._update_fn)

    def init(self, params: Any, key: jax.Array) -> TrackerState:
        """A cold state: the first update starts Lanczos from a random vector."""
        flat = ravel_pytree(params)[0]
        if self.k > flat.shape[0]:
            raise ValueError(f"k={self.k}: the params have only {flat.shape[0]} entries.")
        return TrackerState(eigenvectors=jnp.zeros((self.k, flat.shape[0]), flat.dtype),
                            key=key, num_updates=jnp.zeros((), jnp.int32))

    def update(self, params: Any, state: TrackerState, *args) -> tuple[TrackerResult,
                                                                       TrackerState]:
        """(result, next state) at `params`; jitted, warm-started from `state`."""
        return self._update(params, state, *args)

    def _grad_and_hessian(self, params, args):
        """(flat gradient, flat HVP matvec) of loss_fn at params."""
        if self._objective is not None:   # chunked: per-chunk gradients and HVPs
            grad = self._objective.loss_accuracy_grad_fn(params, *args)[2]
            return ravel_pytree(grad)[0], flat_matvec(self._objective.hvp_fn, params, *args)
        loss = lambda p: self.loss_fn(p, *args)
        hessian = flat_matvec(lambda p, v: curvature.hvp(loss, p, v), params)
        return ravel_pytree(jax.grad(loss)(params))[0], hessian

    def _update_fn(self, params, state: TrackerState, *args):
        g, hessian = self._grad_and_hessian(params, args)
        key, start_key = jax.random.split(state.key)
        v0 = jax.random.normal(start_key, g.shape, g.dtype)
        top = curvature.lanczos_top_k(hessian, v0, self.k, self.num_iters,
                                      tol=self.tol or None, init_vectors=state.eigenvectors)
        V = top.eigenvectors
        result = TrackerResult(eigenvalues=top.eigenvalues, residuals=top.residuals,
                               eigenvectors=V, chi_1=subspace.subspace_fraction(g, V[:1]),
                               chi_k=subspace.subspace_fraction(g, V),
                               num_matvecs=top.num_matvecs)
        return result, TrackerState(eigenvectors=V, key=key, num_updates=state.num_updates + 1)
