"""Flax models behind a registry.

Downstream code sees only `apply(params, x) -> outputs` and a params pytree:

    model = build_model("mlp", input_shape=(40,), num_classes=10, width=256,
                        depth=2, activation="relu", key=jax.random.key(0))
    logits = model.apply(model.params, x)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "gelu": nn.gelu,
    "softplus": nn.softplus,
    "elu": nn.elu,
}


class MLP(nn.Module):
    """`depth` hidden Dense layers of `width` units, then a linear readout."""
    width: int
    depth: int
    num_classes: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        x = x.reshape(x.shape[0], -1)
        for _ in range(self.depth):
            x = act(nn.Dense(self.width)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """`depth` conv blocks (conv → activation → 2× average pool), then a linear readout.

    Rank-2 inputs (n, length) get 1-D convolutions over length (MNIST-1D);
    rank-3 (n, h, w) and rank-4 (n, h, w, c) inputs get 2-D convolutions.
    Average pooling (not max) keeps the only kinks in the network the
    activation's, which matters when looking for singular points.
    """
    width: int
    depth: int
    num_classes: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        if x.ndim == 2:
            x, kernel, window = x[..., None], (5,), (2,)
        else:
            x = x[..., None] if x.ndim == 3 else x
            kernel, window = (3, 3), (2, 2)
        for _ in range(self.depth):
            x = act(nn.Conv(self.width, kernel)(x))
            x = nn.avg_pool(x, window, strides=window)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)


MODELS = {"mlp": MLP, "cnn": CNN}


@dataclasses.dataclass(frozen=True)
class Model:
    """A built model: a pure `apply(params, x)` and its initial params."""
    name: str
    apply: Callable[[Any, jax.Array], jax.Array]
    params: Any

    @property
    def num_params(self) -> int:
        return sum(p.size for p in jax.tree_util.tree_leaves(self.params))


def count_params(name: str, input_shape: Sequence[int], num_classes: int, *, width: int,
                 depth: int, activation: str) -> int:
    """The parameter count P of a registered model, from shapes alone (any dtype).

    `jax.eval_shape` traces the initialization without running or compiling
    it, so settings bounded by P can be checked before any compute.
    """
    module = MODELS[name](width=width, depth=depth, num_classes=num_classes,
                          activation=activation)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, *input_shape)))["params"])
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *, width: int,
                depth: int, activation: str, key: jax.Array, dtype=jnp.float32) -> Model:
    """Builds a registered model and initializes its params with `key`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
    module = MODELS[name](width=width, depth=depth, num_classes=num_classes,
                          activation=activation)
    dummy = jnp.zeros((1, *input_shape), dtype)
    params = module.init(key, dummy)["params"]
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)

    def apply(params, x):
        return module.apply({"params": params}, x)

    return Model(name=name, apply=apply, params=params)
