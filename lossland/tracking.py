"""Curvature tracking along a training trajectory: one jitted function per run.

At a tracked step the tracker computes, at the current params θ_t:
  * the top-k Hessian eigenpairs, warm-started from the previous tracked
    step's eigenvectors: by Lanczos on full-batch HVPs (tracker="lanczos"), or
    by the block solver on full-batch block HVPs of b vectors (tracker="block");
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
from lossland.objective import Objective, flat_block_matvec, flat_matvec


def make_tracker(objective: Objective, *, k: int, num_iters: int, tol: Optional[float],
                 track_gn: bool, lr: float, tracker: str = "lanczos", block_size: int = 0):
    """Returns jitted `track(params, data, key, init_vectors) -> (row, eigenvectors)`.

    `init_vectors` is the (k, P) eigenvectors of the previous tracked step, or
    zeros (a cold start from the random `key` vector). The returned `row` is a dict of arrays that the
    driver writes into metrics.jsonl; `num_matvecs` counts vectors multiplied
    by H (b per block product), `num_block_products` the block products.
    """
    tol = tol or None
    block_size = block_size or k + 2
    num_blocks = -(-num_iters // block_size)     # about the same matvec budget as Lanczos

    def block_top_k(params, data, key, init_vectors, P, dtype):
        """Top-k by the block solver; the start block is the previous V_k plus random rows."""
        start = jax.random.normal(key, (block_size, P), dtype)
        if init_vectors is not None:
            is_warm = jnp.any(init_vectors != 0)
            start = start.at[:k].set(jnp.where(is_warm, init_vectors, start[:k]))
        block_hessian = flat_block_matvec(objective.block_hvp_fn, params, data)
        return curvature.block_top_k(block_hessian, start, k, num_blocks, tol=tol)

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
        if tracker == "block":
            result = block_top_k(params, data, key, init_vectors, g.shape[0], g.dtype)
            block_products = result.num_matvecs // block_size
        else:
            result = top_k(hessian, v0, init_vectors)
            block_products = None
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
        if tracker == "block":
            row["num_block_products"] = block_products
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
