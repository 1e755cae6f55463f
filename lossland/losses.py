"""Losses, exactly as defined in MISSION.md.

Each loss has a per-example form `(outputs_BxC, labels_B) -> (B,)`; the
training loss is always the *mean* over examples, never the sum.

  cross_entropy: −log softmax(z)_y
  mse:           ½ Σ_c (z_c − onehot(y)_c)²
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def cross_entropy_per_example(outputs, labels):
    log_probs = jax.nn.log_softmax(outputs, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]


def mse_per_example(outputs, labels):
    targets = jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype)
    return 0.5 * jnp.sum((outputs - targets) ** 2, axis=-1)


def cross_entropy(outputs, labels):
    """Mean softmax cross-entropy over examples."""
    return jnp.mean(cross_entropy_per_example(outputs, labels))


def mse(outputs, labels):
    """Mean over examples of ½‖z − onehot(y)‖²."""
    return jnp.mean(mse_per_example(outputs, labels))


PER_EXAMPLE_LOSSES: dict[str, Callable] = {
    "cross_entropy": cross_entropy_per_example,
    "mse": mse_per_example,
}


def per_example_loss(name: str) -> Callable:
    if name not in PER_EXAMPLE_LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(PER_EXAMPLE_LOSSES)}.")
    return PER_EXAMPLE_LOSSES[name]
