"""Optimizers and the pure training step.

    step(params, opt_state, batch) -> (params, opt_state, metrics)

`batch` is a `ChunkedData`: the whole training set for `gd`, one minibatch
(a single chunk) for the stochastic optimizers. The loss and gradient come
through the chunked reducer, so GD on a large n needs memory for one chunk.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lossland import objective as objective_lib
from lossland import projections

PyTree = Any
OPTIMIZERS = ("gd", "sgd", "momentum", "adam")
FULL_BATCH_OPTIMIZERS = ("gd",)


def make_optimizer(name: str, lr: float, *, momentum: float = 0.9,
                   extra: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """The optax transformation behind each optimizer name.

    gd and sgd are the same update, θ ← θ − η g (gd on the full batch, sgd on
    minibatches); momentum is heavy-ball, v ← μ v + g, θ ← θ − η v.
    `extra` (e.g. a subspace projection) is applied to the raw gradient first.
    """
    if name in ("gd", "sgd"):
        base = optax.sgd(lr)
    elif name == "momentum":
        base = optax.sgd(lr, momentum=momentum)
    elif name == "adam":
        base = optax.adam(lr)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")
    return optax.chain(extra, base) if extra is not None else base


def tree_norm(tree) -> jax.Array:
    """Euclidean norm of a pytree viewed as one flat vector."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(t)) for t in jax.tree_util.tree_leaves(tree)))


class StepMetrics(NamedTuple):
    loss: jax.Array          # mean loss of the batch at the pre-step params
    accuracy: jax.Array
    grad_norm: jax.Array     # ‖g‖ of the batch gradient at the pre-step params
    param_norm: jax.Array    # ‖θ_t‖ (pre-step)
    update_norm: jax.Array   # ‖θ_{t+1} − θ_t‖
    params_finite: jax.Array  # bool: every entry of θ_{t+1} is finite (divergence check)


def make_train_step(objective: objective_lib.Objective,
                    optimizer: optax.GradientTransformation,
                    update_state: Callable | None = None) -> Callable:
    """A jitted pure step `(params, opt_state, batch) -> (params, opt_state, metrics)`.

    When `opt_state` holds Dom/Bulk projection states (`lossland.projections`),
    the step first refreshes those that are due, by Lanczos on the HVP at
    `params` on `batch` (the full batch for GD, the minibatch otherwise). The
    check is static (the state's structure), so a step without projections
    compiles no HVP.

    A model with batch statistics passes its `update_state` (`Model.update_state`);
    the step then also carries the model state (the running statistics):

        (params, opt_state, batch, model_state) -> (params, opt_state, metrics, model_state)

    The new running statistics come from the same ghost batches (chunks of
    `batch`) as the loss, in the same pass (`objective.loss_accuracy_grad_model_state`):
    one update per step with the mean of the chunks' statistics. They are a side
    output only: the loss, its gradient and every curvature product are those of
    the training-mode loss, which normalizes with each chunk's own statistics.
    """

    def apply_gradient(params, opt_state, batch, loss, accuracy, grad):
        if projections.find_projection_states(opt_state):
            opt_state = projections.refresh_projections(
                opt_state, objective_lib.flat_matvec(objective.hvp_fn, params, batch))
        updates, opt_state = optimizer.update(grad, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        metrics = StepMetrics(loss=loss, accuracy=accuracy, grad_norm=tree_norm(grad),
                              param_norm=tree_norm(params), update_norm=tree_norm(updates),
                              params_finite=jnp.all(jnp.stack([
                                  jnp.all(jnp.isfinite(leaf))
                                  for leaf in jax.tree_util.tree_leaves(new_params)])))
        return new_params, opt_state, metrics

    def step(params, opt_state, batch: objective_lib.ChunkedData):
        loss, accuracy, grad = objective.loss_accuracy_grad_fn(params, batch)
        return apply_gradient(params, opt_state, batch, loss, accuracy, grad)

    def stateful_step(params, opt_state, batch: objective_lib.ChunkedData, model_state):
        loss, accuracy, grad, model_state = objective_lib.loss_accuracy_grad_model_state(
            objective.apply_fn, objective.per_example_loss, update_state, params, model_state,
            batch)
        return (*apply_gradient(params, opt_state, batch, loss, accuracy, grad), model_state)

    return jax.jit(step if update_state is None else stateful_step)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The example order of one SGD epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def minibatch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """Indices of the minibatch used at `step` for SGD-style optimizers.

    Each epoch is a fresh permutation (a function of seed and epoch only, so a
    resumed run sees the same batches); the last partial batch is dropped.
    """
    batches_per_epoch = max(1, n // batch_size)
    epoch, position = divmod(step, batches_per_epoch)
    order = epoch_permutation(seed, epoch, n)
    return order[position * batch_size:(position + 1) * batch_size]
