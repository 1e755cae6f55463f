"""Flax models: the registry of built-in families and plug-ins, behind one `build_model`.

Downstream code sees only `apply(params, x) -> outputs` and a params pytree:

    model = build_model("mlp", input_shape=(40,), num_classes=10, width=256,
                        depth=2, activation="relu", key=jax.random.key(0))
    logits = model.apply(model.params, x)

A name that holds ':' is a plug-in (`package.module:callable` or
`path/to/file.py:callable`, see `lossland.models.plugin`), built from
`model_kwargs` (a JSON object) instead of width/depth/activation.

The `resnet` family also takes `norm` (none | batch | layer) and `vit` takes
`patch_size`; `check_family` refuses settings a family cannot take, naming the
flag, before anything is traced.

Modules: base (Model), families (MLP, CNN and their factories), resnet, vit,
plugin (the plug-in loader, its start-up checks, linen and NNX wrappers).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from lossland.models import plugin as _plugin, resnet as _resnet, vit as _vit
from lossland.models.base import Model
from lossland.models.families import ACTIVATIONS, CNN, MLP, make_cnn, make_mlp
from lossland.models.plugin import ModelError, is_plugin, load_factory
from lossland.models.resnet import NORMS, ResNet, make_resnet
from lossland.models.vit import ViT, make_vit

MODELS = {"mlp": MLP, "cnn": CNN, "resnet": ResNet, "vit": ViT}

__all__ = ["ACTIVATIONS", "CNN", "MLP", "MODELS", "Model", "ModelError", "NORMS", "ResNet",
           "ViT", "build_model", "check_family", "count_params", "describe", "is_plugin",
           "load_factory", "make_cnn", "make_mlp", "make_resnet", "make_vit"]


def check_family(name: str, input_shape: Sequence[int], *, width: int, depth: int,
                 norm: str = "none", patch_size: int = 4) -> None:
    """Refuses (ModelError naming the flag and value) what a built-in family cannot take."""
    def refuse(flag, value, allowed, fix=""):
        raise ModelError(f"--{flag}={value!r} is not allowed with --model={name}: {allowed}."
                         + (f" {fix}" if fix else ""))
    if norm not in NORMS:
        refuse("norm", norm, f"choose one of {list(NORMS)}")
    if norm != "none" and name != "resnet":
        refuse("norm", norm, "only --model=resnet takes a normalization (vit always uses "
               "LayerNorm)", "Drop --norm.")
    if name == "resnet":
        if _resnet.depth_problem(depth):
            refuse("depth", depth, _resnet.depth_problem(depth), "For example --depth=8.")
        if not 1 <= width <= _resnet.MAX_WIDTH:
            refuse("width", width, f"the first stage's channels lie in 1..{_resnet.MAX_WIDTH}")
    if name == "vit":
        if not 1 <= depth <= _vit.MAX_DEPTH:
            refuse("depth", depth, f"a ViT here has 1..{_vit.MAX_DEPTH} blocks")
        if width % _vit.HEADS or not 1 <= width <= _vit.MAX_WIDTH:
            refuse("width", width, f"the embedding width must be a multiple of the "
                   f"{_vit.HEADS} attention heads, at most {_vit.MAX_WIDTH}",
                   f"For example --width={max(_vit.HEADS, width - width % _vit.HEADS)}.")
        if _vit.patch_problem(input_shape, patch_size):
            refuse("patch_size", patch_size, _vit.patch_problem(input_shape, patch_size))


def _family_module(name: str, num_classes: int, *, width: int, depth: int, activation: str,
                   norm: str = "none", patch_size: int = 4):
    extra = {"resnet": {"norm": norm}, "vit": {"patch_size": patch_size}}.get(name, {})
    return MODELS[name](width=width, depth=depth, num_classes=num_classes,
                        activation=activation, **extra)


def describe(name: str, input_shape: Sequence[int], num_classes: int, *, width: int,
             depth: int, activation: str, model_kwargs: str = "", norm: str = "none",
             patch_size: int = 4) -> tuple[int, bool]:
    """(P, has state) from shapes alone: the parameter count and whether the model carries
    non-param variables (BatchNorm statistics: resnet with norm=batch, or a plug-in).

    Runs every start-up check first (`check_family`, or for a plug-in those of
    `plugin.check`): a ModelError if bad. Traced with `jax.eval_shape`, never run.
    """
    if is_plugin(name):
        return _plugin.check(name, model_kwargs, input_shape, num_classes)
    check_family(name, input_shape, width=width, depth=depth, norm=norm, patch_size=patch_size)
    module = _family_module(name, num_classes, width=width, depth=depth, activation=activation,
                            norm=norm, patch_size=patch_size)
    params, state = _plugin.abstract_init(module, input_shape)
    return _plugin._count(params), bool(jax.tree_util.tree_leaves(state))


def count_params(name: str, input_shape: Sequence[int], num_classes: int, *, width: int,
                 depth: int, activation: str, model_kwargs: str = "", norm: str = "none",
                 patch_size: int = 4) -> int:
    """The parameter count P of a model, from shapes alone (any dtype); see `describe`."""
    return describe(name, input_shape, num_classes, width=width, depth=depth,
                    activation=activation, model_kwargs=model_kwargs, norm=norm,
                    patch_size=patch_size)[0]


def build_model(name: str, input_shape: Sequence[int], num_classes: int, *, width: int = 256,
                depth: int = 2, activation: str = "relu", key: jax.Array, dtype=jnp.float32,
                model_kwargs: str = "", norm: str = "none", patch_size: int = 4) -> Model:
    """Builds a registered model or a plug-in and initializes its params with `key`.

    A family with BatchNorm (resnet, norm=batch) gets the training-mode `apply`
    and the running statistics on the side, exactly like a BatchNorm plug-in.
    """
    if is_plugin(name):
        return _plugin.build(name, model_kwargs, input_shape, num_classes, key=key, dtype=dtype)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
    check_family(name, input_shape, width=width, depth=depth, norm=norm, patch_size=patch_size)
    module = _family_module(name, num_classes, width=width, depth=depth, activation=activation,
                            norm=norm, patch_size=patch_size)
    return _plugin.from_module(module, name, input_shape, key=key, dtype=dtype)
