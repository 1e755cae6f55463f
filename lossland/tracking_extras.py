"""What a tracked row measures beyond the top-k: per-layer sharpness, λ_min and tr(H).

At a tracked step, with the flags that ask for them:
  * --track_layers: for each layer ℓ (a top-level module of the params, e.g.
    `Dense_0`), the top --track_layers_k eigenvalues of the diagonal Hessian
    block H_ℓℓ, by Lanczos on block products that differentiate θ_ℓ only
    (`layer_eigenvalues`, `layer_residuals`: dicts keyed by layer name). By
    Cauchy interlacing λ1(H_ℓℓ) ≤ λ1(H) and λ_min(H_ℓℓ) ≥ λ_min(H);
  * --track_min: the smallest Hessian eigenvalue by Lanczos (which="smallest")
    and its residual ‖Hv − λv‖ (`min_eigenvalue`, `min_eigenvalue_residual`):
    curvature of both signs marks a saddle or a singular point;
  * --trace_every: tr(H) by Hutch++ with TRACE_MATVECS HVPs, and its standard
    error (`hessian_trace`, `hessian_trace_stderr`).
Each run is a cold start from the step's key, so a resumed run measures the
same numbers. The Lanczos runs stop by the --lanczos_tol rule, capped at
--lanczos_iters (or the block's size).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from lossland import curvature
from lossland.objective import Objective, flat_matvec

TRACE_MATVECS = 90   # Hutch++ budget per --trace_every measurement (a sketch of 30 vectors)


def make_layer_and_min(objective: Objective, params, *, layers_k: int, track_layers: bool,
                       track_min: bool, num_iters: int, tol: Optional[float]) -> Callable:
    """Jitted `fn(params, data, key) -> dict of arrays` for --track_layers and --track_min.

    `params` (any params of the run) fixes the layers; `layers_k` must not exceed
    any layer's size (config.validate_layers checks it at start-up).
    """
    tol = tol or None
    subsets = curvature.layer_subsets(params) if track_layers else {}

    def measure(params, data, key):
        row = {}
        if subsets:
            results = curvature.block_spectra(
                lambda S, v: objective.subset_hvp_fn(params, S, v, data), params, subsets, key,
                k=layers_k, num_iters=num_iters, tol=tol)
            row["layer_eigenvalues"] = {n: r.eigenvalues for n, r in results.items()}
            row["layer_residuals"] = {n: r.residuals for n, r in results.items()}
        if track_min:
            flat = ravel_pytree(params)[0]
            v0 = jax.random.normal(jax.random.fold_in(key, len(subsets)), flat.shape, flat.dtype)
            hessian = flat_matvec(objective.hvp_fn, params, data)
            bottom = curvature.lanczos_top_k(hessian, v0, 1, min(num_iters, flat.shape[0]),
                                             tol=tol, which="smallest")
            row["min_eigenvalue"] = bottom.eigenvalues[0]
            row["min_eigenvalue_residual"] = bottom.residuals[0]
        return row

    return jax.jit(measure)


def make_trace(objective: Objective, num_matvecs: int = TRACE_MATVECS) -> Callable:
    """Jitted `fn(params, data, key) -> dict`: tr(H) by Hutch++ and its standard error."""

    def trace(params, data, key):
        hessian = flat_matvec(objective.hvp_fn, params, data)
        result = curvature.hutchpp_trace(hessian, ravel_pytree(params)[0], key, num_matvecs)
        return {"hessian_trace": result.estimate, "hessian_trace_stderr": result.std_error}

    return jax.jit(trace)


class Extras:
    """The extra measurements of a run's tracked steps, as JSON-ready row entries."""

    def __init__(self, objective: Objective, params, cfg):
        self.trace_every = cfg.trace_every
        self.layer_and_min = (make_layer_and_min(
            objective, params, layers_k=cfg.track_layers_k, track_layers=cfg.track_layers,
            track_min=cfg.track_min, num_iters=cfg.lanczos_iters, tol=cfg.lanczos_tol)
            if cfg.track_layers or cfg.track_min else None)
        self.trace = make_trace(objective) if cfg.trace_every else None

    def __call__(self, params, data, key, step: int) -> dict:
        row = {}
        if self.layer_and_min is not None:
            row.update(self.layer_and_min(params, data, jax.random.fold_in(key, 0)))
        if self.trace is not None and step % self.trace_every == 0:
            row.update(self.trace(params, data, jax.random.fold_in(key, 1)))
        return jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), jax.device_get(row))


def make_extras(objective: Objective, params, cfg) -> Optional[Extras]:
    """The run's Extras, or None when no flag asks for one."""
    if cfg.track_every and (cfg.track_layers or cfg.track_min or cfg.trace_every):
        return Extras(objective, params, cfg)
    return None

