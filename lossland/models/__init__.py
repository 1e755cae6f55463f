"""Flax models: the registry of built-in families and plug-ins, behind one `build_model`.

Downstream code sees only `apply(params, x) -> outputs` and a params pytree:

    model = build_model("mlp", input_shape=(40,), num_classes=10, width=256,
                        depth=2, activation="relu", key=jax.random.key(0))
    logits = model.apply(model.params, x)

A name that holds ':' is a plug-in (`package.module:callable` or
`path/to/file.py:callable`, see `lossland.models.plugin`), built from
`model_kwargs` (a JSON object) instead of width/depth/activation.

Modules: base (Model), families (MLP, CNN and their factories), plugin (the
plug-in loader, its start-up checks, linen and NNX wrappers).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from lossland.models.base import Model
from lossland.models.families import ACTIVATIONS, CNN, MLP, MODELS, make_cnn, make_mlp
from lossland.models.plugin import ModelError, is_plugin, load_factory

__all__ = ["ACTIVATIONS", "CNN", "MLP", "MODELS", "Model", "ModelError", "build_model",
           "count_params", "describe", "is_plugin", "load_factory", "make_cnn", "make_mlp"]


def describe(name: str, input_shape: Sequence[int], num_classes: int, *, width: int,
             depth: int, activation: str, model_kwargs: str = "") -> tuple[int, bool]:
    """(P, has state) from shapes alone: `count_params` and whether the model carries
    non-param variables (BatchNorm statistics; the built-in families never do)."""
    if is_plugin(name):
        from lossland.models import plugin
        return plugin.check(name, model_kwargs, input_shape, num_classes)
    return count_params(name, input_shape, num_classes, width=width, depth=depth,
                        activation=activation), False


def count_params(name: str, input_shape: Sequence[int], num_classes: int, *, width: int,
                 depth: int, activation: str, model_kwargs: str = "") -> int:
    """The parameter count P of a model, from shapes alone (any dtype).

    `jax.eval_shape` traces the initialization without running or compiling
    it, so settings bounded by P can be checked before any compute. For a
    plug-in this also runs every start-up check of `plugin.check` (import,
    Module, --model_kwargs, output shape, randomness): a ModelError if bad.
    """
    if is_plugin(name):
        from lossland.models import plugin
        return plugin.check(name, model_kwargs, input_shape, num_classes)[0]
    module = MODELS[name](width=width, depth=depth, num_classes=num_classes,
                          activation=activation)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, *input_shape)))["params"])
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *, width: int = 256,
                depth: int = 2, activation: str = "relu", key: jax.Array, dtype=jnp.float32,
                model_kwargs: str = "") -> Model:
    """Builds a registered model or a plug-in and initializes its params with `key`."""
    if is_plugin(name):
        from lossland.models import plugin
        return plugin.build(name, model_kwargs, input_shape, num_classes, key=key, dtype=dtype)
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
