"""The stream tracker (--tracker=stream): a GD step that also returns H·V, and the top-k it follows.

`make_fused_step` builds the step

    (params, opt_state, data, stream, displacement)
        -> (params', opt_state', metrics, row, V_k, stream')

that takes the full-batch gradient and H_t X for the m pending rows X of the
stream block from one linearization of the gradient per chunk
(`objective.loss_accuracy_grad_block_hvp`), applies the optimizer to that
gradient exactly as `train.make_train_step` does, and advances the stream
(`curvature.stream_update`). Its row holds, at θ_t: the top-k Ritz values and
residuals of H_t on the block, χ_1, χ_k and ‖g‖ split inside/outside span V_k,
from the gradient at hand. `make_stream_start` builds the cold start: a
Lanczos for the top b pairs and a short one for a lower bound of the
spectrum, which sets the shift σ.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from lossland import curvature, subspace
from lossland import train as train_lib
from lossland.objective import Objective, flat_matvec

SHIFT_ITERS = 20   # Lanczos steps of the cold start's lower spectral bound
PHASES = 2         # blocks of the stream, one per step parity (curvature/stream.py, "Phases")


def default_refresh(k: int, block_size: int) -> int:
    """Rows imaged per step when --stream_refresh is 0: all of a block of ≤ 2, else ⌈0.4 b⌉.

    k = 1 with b = 1 is shifted momentum power iteration with an exact Rayleigh quotient
    and residual (one tangent a step); k = 10 with b = 14 images 6 rows a step (the
    cheapest setting measured to meet the k = 10 accuracy target; BUILD_NOTES.md).
    """
    return block_size if block_size <= 2 else -(-2 * block_size // 5)


def step_curvature(grad, displacement, lr):
    """The curvature along the last GD step, from two consecutive gradients at no extra cost.

    GD moved θ_{t−1} → θ_t by d = −η g_{t−1}, so g_{t−1} = −d/η and

        c_t = (g_t − g_{t−1})·d / ‖d‖² = g_t·d / ‖d‖² + 1/η = d̂ᵀ H̄ d̂,

    with H̄ the Hessian averaged over the segment (mean value theorem): the curvature at
    the segment's midpoint up to terms of second order in ‖d‖. It is a Rayleigh quotient,
    so c_t ≤ λ1(H̄), with equality when d lies along the top eigenvector (χ_1 = 1). NaN
    before the first step (d = 0).
    """
    d_sq = jnp.vdot(displacement, displacement)
    return jnp.where(d_sq > 0, jnp.vdot(grad, displacement) / jnp.where(d_sq > 0, d_sq, 1.0)
                     + 1.0 / lr, jnp.nan)


def _ravel(tree):
    return ravel_pytree(tree)[0]


def make_fused_step(objective: Objective, optimizer: optax.GradientTransformation, *, k: int,
                    refresh: int, lr: float):
    """The fused GD step of the stream tracker (see the module docstring).

    `step(params, opt_state, data, stream, displacement)` returns (params', opt_state',
    metrics, row, V_k, stream'). `displacement` is θ_t − θ_{t−1} (zeros at the first
    step), for `step_curvature`; `lr` is the GD step η of `optimizer` (the stream tracker
    runs plain GD only). The jitted part sees only the block imaged at this step
    (`curvature.current_block`); the other phases' blocks stay where they are, never
    copied (a (b, P) block each: copying them cost more than the products they save).
    """

    def products(params, opt_state, data, block: curvature.StreamBlock):
        """The GD step and H_t times the block's pending rows, from one linearization."""
        _, unravel = ravel_pytree(params)
        pending = jax.vmap(unravel)(curvature.block_pending(block, refresh))
        loss, accuracy, grad, images = objective.loss_accuracy_grad_block_hvp_fn(
            params, pending, data)
        updates, opt_state = optimizer.update(grad, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = train_lib.StepMetrics(
            loss=loss, accuracy=accuracy, grad_norm=train_lib.tree_norm(grad),
            param_norm=train_lib.tree_norm(params), update_norm=train_lib.tree_norm(updates),
            params_finite=jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf))
                                             for leaf in jax.tree_util.tree_leaves(new_params)])))
        return new_params, opt_state, metrics, _ravel(grad), jax.vmap(_ravel)(images)

    def track(block: curvature.StreamBlock, shift, images, g, displacement):
        """Rayleigh–Ritz and the next block (`curvature.update_block`), and the row."""
        block, shift, ritz = curvature.update_block(block, shift, images, num_wanted=k)
        V = ritz.eigenvectors[:k]
        coefficients = jnp.matmul(V, g, precision=jax.lax.Precision.HIGHEST)   # one pass
        g_sq, g_top_sq = jnp.vdot(g, g), jnp.sum(jnp.square(coefficients))
        row = {
            "eigenvalues": ritz.eigenvalues[:k],
            "residuals": ritz.residuals[:k],
            "num_matvecs": jnp.int32(refresh),
            "chi_1": subspace.fraction_of(jnp.square(coefficients[0]), g_sq),
            "chi_k": subspace.fraction_of(g_top_sq, g_sq),
            "grad_norm_top": jnp.sqrt(g_top_sq),
            "grad_norm_bulk": jnp.sqrt(jnp.maximum(g_sq - g_top_sq, 0.0)),
            "stream_shift": shift,
            "step_curvature": step_curvature(g, displacement, lr),
        }
        # One row (b = 1): the Ritz vector is the block's own vector; `step` passes that
        # array on rather than a copy of it.
        return row, (V if block.basis.shape[0] > 1 else None), block, shift

    def fused(params, opt_state, data, block, shift, displacement):
        new_params, opt_state, metrics, g, images = products(params, opt_state, data, block)
        return new_params, opt_state, metrics, *track(block, shift, images, g, displacement)

    # One program for one row, two (products, then tracking) for more: on XLA:CPU one
    # program ran 20–35% slower than the two at k = 10 (b = 14, m = 6) on the tracking
    # benchmark's workload, and 3–5% faster at k = 1 (BUILD_NOTES.md).
    if refresh == 1:
        fused = jax.jit(fused)
    else:
        products, track = jax.jit(products), jax.jit(track)

    def step(params, opt_state, data, stream: curvature.StreamState, displacement):
        current = curvature.current_block(stream)
        new_params, opt_state, metrics, row, V, block, shift = fused(
            params, opt_state, data, current, stream.shift, displacement)
        V = current.basis if V is None else V
        return new_params, opt_state, metrics, row, V, curvature.advance(stream, block, shift)

    return step


def make_stream_start(objective: Objective, *, block_size: int, num_iters: int, tol,
                      phases: int = PHASES):
    """Jitted `start(params, data, key) -> StreamState`: the cold start at the first step.

    The block is Lanczos's top-b Ritz pairs (tol as the Lanczos tracker's); σ
    is minus the smallest Ritz value of a short Lanczos, a cheap bound of
    −λ_min from above-ish (extreme Ritz values converge first), raised later
    by `stream_update` if the block finds lower values.
    """
    def start(params, data, key):
        hessian = flat_matvec(objective.hvp_fn, params, data)
        theta = ravel_pytree(params)[0]
        v0 = jax.random.normal(key, theta.shape, theta.dtype)
        top = curvature.lanczos_top_k(hessian, v0, block_size, max(num_iters, block_size),
                                      tol=tol or None)
        lowest = curvature.lanczos_top_k(lambda v: -hessian(v), v0, 1,
                                         min(SHIFT_ITERS, theta.shape[0]))
        # −λ_min ≤ θ + ‖r‖ for the lowest pair: the residual is the margin.
        return curvature.stream_start(top.eigenvectors, top.eigenvalues,
                                      lowest.eigenvalues[0] + lowest.residuals[0], phases)

    return jax.jit(start)


def placeholder_state(block_size: int, num_params: int, dtype,
                      phases: int = PHASES) -> curvature.StreamState:
    """A not-yet-started stream (phase −1) of the right shapes: the checkpoint template."""
    zeros = jnp.zeros((block_size, num_params), dtype)
    return curvature.StreamState(basis=(zeros,) * phases, images=(zeros,) * phases,
                                 shift=jnp.zeros((), dtype), cursor=(jnp.int32(0),) * phases,
                                 phase=jnp.int32(-1),
                                 previous=(jnp.zeros((1, num_params), dtype),) * phases)


def block_rows(cfg) -> int:
    """Rows of the checkpointed stream block for a RunConfig (1, a placeholder, when off)."""
    from lossland import config as config_lib
    return config_lib.block_size(cfg) if cfg.tracker == "stream" and cfg.track_every else 1


class StreamDriver:
    """The stream tracker inside a run (`lossland.loop`): the fused step at every step.

    Holds the jitted fused step and cold start, and the last step's output
    (its row arrays, top-k vectors and wall seconds) for the loop's tracked row.
    """

    def __init__(self, objective: Objective, optimizer: optax.GradientTransformation, cfg):
        from lossland import config as config_lib
        self.fused = make_fused_step(objective, optimizer, k=cfg.track_k,
                                     refresh=config_lib.stream_refresh(cfg), lr=cfg.lr)
        self.start = make_stream_start(objective, block_size=config_lib.block_size(cfg),
                                       num_iters=cfg.lanczos_iters, tol=cfg.lanczos_tol)
        self.last = None    # (step, row arrays, (k, P) Ritz vectors, seconds of the fused step)

    def step(self, step: int, params, opt_state, data, stream, displacement, key):
        """The fused step at θ_step: (params', opt_state', metrics, stream'). `displacement`
        is θ_step − θ_{step−1} (the checkpointed `TrainState.displacement`)."""
        if int(stream.phase) < 0:      # a fresh run; a resumed one restores its block
            stream = self.start(params, data, key)
        start = time.perf_counter()
        params, opt_state, metrics, row, vectors, stream = self.fused(params, opt_state, data,
                                                                      stream, displacement)
        jax.block_until_ready(row)
        self.last = (step, row, vectors, time.perf_counter() - start)
        return params, opt_state, metrics, stream


def audit_row(stream_eigenvalues, check_eigenvalues) -> dict:
    """The accuracy audit's part of a row: the converged values and |θ − λ|/|λ| per pair."""
    theta, lam = np.asarray(stream_eigenvalues), np.asarray(check_eigenvalues)
    rel = np.abs(theta - lam) / np.maximum(np.abs(lam), np.finfo(lam.dtype).tiny)
    return {"check_eigenvalues": lam.tolist(), "stream_check_rel_err": rel.tolist()}


def shortest_floats(row_arrays: dict) -> dict:
    """The row's float32 arrays as lists of the shortest decimals that round-trip in float32.

    A float32 value written through Python's float repr takes 17 digits
    (0.10000000149011612); its float32 repr ('0.1') holds the same number.
    With a row every step this keeps metrics.jsonl about a third smaller.
    Other dtypes pass through unchanged.
    """
    def short(value):
        array = np.asarray(value)
        if array.dtype != np.float32:
            return value
        shortest = [float(str(x)) for x in array.ravel()]     # str(np.float32) is shortest
        return shortest[0] if array.ndim == 0 else np.reshape(
            np.asarray(shortest, object), array.shape).tolist()
    return {name: short(value) for name, value in row_arrays.items()}
