"""Curvature tracking along a training trajectory: one jitted function per run.

At a tracked step the tracker computes, at the current params θ_t:
  * the top-k Hessian eigenpairs by Lanczos on full-batch HVPs, warm-started
    from the previous tracked step's eigenvectors;
  * χ_1 and χ_k = ‖V_kᵀ g‖²/‖g‖² (MISSION.md, "Top-subspace gradient fraction");
  * ‖g‖ split into its parts inside and outside span V_k;
  * optionally the top eigenvalues of the Gauss–Newton part G and of the
    residual H − G.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from lossland import curvature, subspace
from lossland.objective import Objective, flat_matvec


def make_tracker(objective: Objective, *, k: int, num_iters: int, tol: Optional[float],
                 track_gn: bool, lr: float):
    """Returns jitted `track(params, data, key, init_vectors) -> (row, eigenvectors)`.

    `init_vectors` is the (k, P) eigenvectors of the previous tracked step, or
    zeros (a cold start from the random `key` vector). The returned `row` is a dict of arrays that the
    driver writes into metrics.jsonl.
    """
    tol = tol or None

    def top_k(matvec, v0, init_vectors=None):
        return curvature.lanczos_top_k(matvec, v0, k, num_iters, tol=tol,
                                       init_vectors=init_vectors)

    def track(params, data, key, init_vectors):
        loss, _, grad = objective.loss_accuracy_grad_fn(params, data)
        g, unravel = ravel_pytree(grad)
        theta = ravel_pytree(params)[0]
        loss_after = lambda step: objective.loss_fn(unravel(theta - lr * step), data) - loss
        v0 = jax.random.normal(key, g.shape, g.dtype)
        hessian = flat_matvec(objective.hvp_fn, params, data)
        result = top_k(hessian, v0, init_vectors)
        V = result.eigenvectors
        g_sq = jnp.vdot(g, g)
        g_top_sq = jnp.sum(jnp.square(V @ g))
        row = {
            "eigenvalues": result.eigenvalues,
            "residuals": result.residuals,
            "num_matvecs": result.num_matvecs,
            "chi_1": subspace.subspace_fraction(g, V[:1]),
            "chi_k": subspace.subspace_fraction(g, V),
            "grad_norm_top": jnp.sqrt(g_top_sq),
            "grad_norm_bulk": jnp.sqrt(jnp.maximum(g_sq - g_top_sq, 0.0)),
            "delta_loss_full": loss_after(g),
            "delta_loss_top": loss_after(subspace.project_onto(g, V)),
            "delta_loss_bulk": loss_after(subspace.project_out(g, V)),
        }
        if track_gn:
            gauss_newton = flat_matvec(objective.gnvp_fn, params, data)
            residual = lambda v: hessian(v) - gauss_newton(v)
            gn = top_k(gauss_newton, v0)
            res = top_k(residual, v0)
            row["gn_eigenvalues"] = gn.eigenvalues
            row["residual_eigenvalues"] = res.eigenvalues
            row["num_matvecs"] = row["num_matvecs"] + gn.num_matvecs + 2 * res.num_matvecs
        return row, V

    return jax.jit(track)


def make_density(objective: Objective, *, num_probes: int, num_iters: int,
                 grid_size: int = 400):
    """Returns jitted `density(params, data, key, scale)`: an SLQ snapshot of the Hessian.

    The grid spans [−0.25·scale, 1.05·scale] with broadening σ = scale/100,
    where `scale` is the current λ1 (the driver passes the tracked value), so
    snapshots along a trajectory share the resolution of the spectrum's edge.
    """

    def density(params, data, key, scale):
        hessian = flat_matvec(objective.hvp_fn, params, data)
        v0 = ravel_pytree(params)[0]
        grid = jnp.linspace(-0.25 * scale, 1.05 * scale, grid_size)
        return curvature.slq_density(hessian, v0, key, num_probes, num_iters, grid, scale / 100.0)

    return jax.jit(density)
