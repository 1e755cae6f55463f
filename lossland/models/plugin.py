"""Plug-in models: `--model=package.module:callable` or `--model=path/to/file.py:callable`.

The callable is called as `factory(input_shape=..., num_classes=..., **model_kwargs)`
(and with `rngs=nnx.Rngs(key)` when it takes `rngs`, which NNX modules need to
initialize). It returns a Flax linen Module or a Flax NNX Module; either becomes a
`Model` with a pure training-mode `apply(params, x)`:

  * linen: `module.apply({"params": params, **state}, x[, train=True])`;
  * NNX: `nnx.split(module, nnx.Param, ...)` into graph, params and state, and
    `nnx.merge` of them inside the pure apply.

Following the Flax examples, a module whose `__call__` takes `train` gets
`train=True` in the training loss and in every curvature product, and
`train=False` in evaluation; other modules are called as `module(x)`.

Everything a bad plug-in can get wrong is checked by `check` with
`jax.eval_shape` (traced, never compiled or run), so it is refused at start-up.
Randomness in the training-mode forward (Dropout) is refused: the full-batch
loss must be a deterministic function of params.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from lossland.models.base import Model


class ModelError(ValueError):
    """A plug-in model that cannot be used; the message names the flag and the value."""


def is_plugin(spec: str) -> bool:
    """True for `module:callable` and `file.py:callable` specs (registry names hold no ':')."""
    return ":" in spec


def parse_kwargs(text: str) -> dict:
    """--model_kwargs as a dict: a JSON object, or {} for the empty string."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelError(f"--model_kwargs={text!r} is not JSON ({e}); give a JSON object, "
                         """e.g. --model_kwargs='{"width": 64}'.""") from None
    if not isinstance(kwargs, dict):
        raise ModelError(f"--model_kwargs={text!r} is not a JSON object; give one, e.g. "
                         """--model_kwargs='{"width": 64}'.""")
    return kwargs


def _file_sha256(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _import_file(path: Path, spec: str):
    """Imports a .py file as a module of its own, writing no __pycache__ next to it."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"lossland_plugin_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module       # dataclasses (linen Modules) look their module up here
    dont_write = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.dont_write_bytecode = dont_write
    return module


def load_factory(spec: str, flag: str = "model"):
    """(callable, source) for a spec; source = {spec, file, sha256} for config.json."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ModelError(f"--{flag}={spec} is not allowed: give package.module:callable or "
                         "path/to/file.py:callable.")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ModelError(f"--{flag}={spec}: the file {target} does not exist.")
            module = _import_file(path, spec)
        else:
            module = importlib.import_module(target)
    except ModelError:
        raise
    except Exception as e:  # the user's code may raise anything while importing
        raise ModelError(f"--{flag}={spec}: {target} does not import: {type(e).__name__}: {e}"
                         ) from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelError(f"--{flag}={spec}: {target} has no callable {attr!r}"
                         + ("" if factory is None else f" (it is a {type(factory).__name__})")
                         + ".")
    file = _defining_file(factory) or getattr(module, "__file__", None)
    return factory, {"spec": spec, "file": file, "sha256": _file_sha256(file)}


def _defining_file(factory) -> str | None:
    """The file that defines the callable (not a package that re-exports it)."""
    try:
        return inspect.getsourcefile(factory)
    except TypeError:
        return None


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _construct(spec: str, kwargs_text: str, input_shape: Sequence[int], num_classes: int,
               key):
    """Calls the factory; returns (module, source). NNX construction runs eagerly: call it
    under `nnx.eval_shape` where nothing may be computed."""
    factory, source = load_factory(spec)
    kwargs = parse_kwargs(kwargs_text)
    call_kwargs = dict(input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)
    if _takes(factory, "rngs"):
        call_kwargs["rngs"] = nnx.Rngs(0 if key is None else key)   # None: under eval_shape
    try:
        inspect.signature(factory).bind(**call_kwargs)
    except TypeError as e:
        raise ModelError(f"--model_kwargs={kwargs_text!r} does not fit --model={spec}: {e}. "
                         "The callable is called as f(input_shape=..., num_classes=..., "
                         "**model_kwargs).") from None
    except ValueError:
        pass  # no signature to check (a builtin); the call below says what is wrong
    try:
        module = factory(**call_kwargs)
    except Exception as e:
        raise ModelError(f"--model={spec}: calling it raised {type(e).__name__}: {e}") from None
    if not isinstance(module, (nn.Module, nnx.Module)):
        raise ModelError(f"--model={spec} returned a {type(module).__name__}, not a Flax "
                         "Module: return a flax.linen.Module or a flax.nnx.Module.")
    return module, source


# ----------------------------------------------------------------------------
# Pure functions of a module: init, training-mode and evaluation-mode forwards
# ----------------------------------------------------------------------------

class _Linen:
    def __init__(self, module: nn.Module):
        self.module = module
        self.has_train = _takes(type(module).__call__, "train")

    def _mode(self, train: bool) -> dict:
        return {"train": train} if self.has_train else {}

    def init(self, key, dummy):
        variables = dict(self.module.init(key, dummy, **self._mode(False)))
        return variables.pop("params", {}), variables

    def train_call(self, params, state, x):
        """Training-mode outputs and the non-param state it updates (BatchNorm stats)."""
        if not state:
            return self.module.apply({"params": params}, x, **self._mode(True)), state
        out, new_state = self.module.apply({"params": params, **state}, x,
                                           mutable=list(state), **self._mode(True))
        return out, dict(new_state)

    def eval_call(self, params, state, x):
        if state and not self.has_train:  # no evaluation mode: as in training
            return self.train_call(params, state, x)[0]
        return self.module.apply({"params": params, **state}, x, **self._mode(False))


class _Nnx:
    """An NNX module split into graph definitions (one per mode), params and state.

    Params and state travel as plain nested dicts (`nnx.to_pure_dict`), so
    optax, orbax and `ravel_pytree` see ordinary pytrees.
    """

    def __init__(self, module: nnx.Module):
        self.has_train = _takes(type(module).__call__, "train")
        module.train()
        self.graph_train, params, rest = nnx.split(module, nnx.Param, ...)
        module.eval()
        self.graph_eval = nnx.split(module, nnx.Param, ...)[0]
        self.params, self.state = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        self.params_def = jax.tree_util.tree_structure(params)
        self.state_def = jax.tree_util.tree_structure(rest)
        # `_merge` rebuilds States from the dicts' leaves: both must flatten in one order.
        for pure, treedef in ((self.params, self.params_def), (self.state, self.state_def)):
            leaves = jax.tree_util.tree_leaves(pure)
            rebuilt = jax.tree_util.tree_leaves(nnx.to_pure_dict(
                jax.tree_util.tree_unflatten(treedef, leaves)))
            if any(a is not b for a, b in zip(rebuilt, leaves)):
                raise ModelError("an NNX State and its pure dict flatten in different orders; "
                                 "please report this with your model.")

    def init(self, key, dummy):
        return self.params, self.state

    def _merge(self, graph, params, state):
        unflatten = jax.tree_util.tree_unflatten
        return nnx.merge(graph, unflatten(self.params_def, jax.tree_util.tree_leaves(params)),
                         unflatten(self.state_def, jax.tree_util.tree_leaves(state)))

    def _call(self, module, x, train: bool):
        return module(x, train=train) if self.has_train else module(x)

    def train_call(self, params, state, x):
        module = self._merge(self.graph_train, params, state)
        out = self._call(module, x, True)
        return out, nnx.to_pure_dict(nnx.split(module, nnx.Param, ...)[2])

    def eval_call(self, params, state, x):
        return self._call(self._merge(self.graph_eval, params, state), x, False)


def _has_nnx_randomness(module: nnx.Module) -> bool:
    if jax.tree_util.tree_leaves(nnx.state(module, nnx.RngState)):
        return True
    return any(isinstance(m, nnx.Dropout) for _, m in nnx.iter_modules(module))


def _wrap(module):
    return _Nnx(module) if isinstance(module, nnx.Module) else _Linen(module)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def check(spec: str, kwargs_text: str, input_shape: Sequence[int], num_classes: int
          ) -> tuple[int, bool]:
    """Every start-up check of a plug-in, traced only; returns (P, has state).

    "Has state": non-param variables such as BatchNorm's running statistics.

    Refuses (ModelError): an import error, a missing callable, a result that is
    not a Module, --model_kwargs that are not JSON or name no argument, outputs
    whose shape is not (batch, num_classes), randomness in training mode.
    """
    wrapped, params, state = _abstract_model(spec, kwargs_text, input_shape, num_classes)
    dummy = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    try:
        out, _ = jax.eval_shape(wrapped.train_call, params, state, dummy)
        eval_out = jax.eval_shape(wrapped.eval_call, params, state, dummy)
    except flax.errors.InvalidRngError:
        raise ModelError(_randomness_message(spec)) from None
    except Exception as e:
        raise ModelError(f"--model={spec}: the forward pass on inputs of shape "
                         f"(batch, {', '.join(map(str, input_shape))}) failed: "
                         f"{type(e).__name__}: {e}") from None
    for name, o in (("training", out), ("evaluation", eval_out)):
        shape = getattr(o, "shape", None)
        if shape != (2, num_classes):
            raise ModelError(f"--model={spec}: its {name}-mode outputs have shape {shape} for "
                             f"a batch of 2; expected (2, {num_classes}), one output per class "
                             f"of the dataset ({num_classes} classes).")
    return _count(params), bool(jax.tree_util.tree_leaves(state))


def abstract_params(spec: str, kwargs_text: str, input_shape: Sequence[int],
                    num_classes: int):
    """A plug-in's params as shapes (jax.ShapeDtypeStruct leaves): traced, never compiled."""
    return _abstract_model(spec, kwargs_text, input_shape, num_classes)[1]


def _abstract_model(spec: str, kwargs_text: str, input_shape: Sequence[int], num_classes: int):
    """(wrapped module, params, state) of a plug-in, the arrays as shapes only."""
    key = jax.eval_shape(lambda: jax.random.key(0))   # abstract: creating a key compiles

    def construct():
        return _construct(spec, kwargs_text, input_shape, num_classes, None)[0]

    module = nnx.eval_shape(construct) if _factory_wants_rngs(spec) else construct()
    if isinstance(module, nnx.Module) and _has_nnx_randomness(module):
        raise ModelError(_randomness_message(spec))
    wrapped = _wrap(module)
    dummy = jax.ShapeDtypeStruct((2, *input_shape), jnp.float32)
    params, state = (wrapped.init(key, dummy) if isinstance(wrapped, _Nnx)   # already abstract
                     else jax.eval_shape(wrapped.init, key, dummy))
    return wrapped, params, state


def _factory_wants_rngs(spec: str) -> bool:
    factory, _ = load_factory(spec)
    return _takes(factory, "rngs")


def _randomness_message(spec: str) -> str:
    return (f"--model={spec} draws random numbers in training mode (Dropout or another "
            "random layer): the full-batch GD loss and its Hessian must be deterministic "
            "functions of the params, so randomness is refused. Remove the random layer, or "
            "make it deterministic when train=True (e.g. Dropout(deterministic=True)).")


def build(spec: str, kwargs_text: str, input_shape: Sequence[int], num_classes: int, *,
          key, dtype=jnp.float32) -> Model:
    """Builds a plug-in and initializes it with `key` (after `check` passed)."""
    module, source = _construct(spec, kwargs_text, input_shape, num_classes, key)
    return from_module(module, spec, input_shape, key=key, dtype=dtype, source=source)


def abstract_init(module, input_shape: Sequence[int]) -> tuple[Any, Any]:
    """(params, state) of a linen or NNX module as shapes: traced, never compiled or run."""
    wrapped = _wrap(module)
    if isinstance(wrapped, _Nnx):
        return wrapped.init(None, None)
    return jax.eval_shape(lambda: wrapped.init(jax.random.key(0), jnp.zeros((1, *input_shape))))


def from_module(module, name: str, input_shape: Sequence[int], *, key, dtype=jnp.float32,
                source: dict | None = None) -> Model:
    """A `Model` of a constructed linen or NNX module, its params initialized with `key`."""
    wrapped = _wrap(module)
    params, state = wrapped.init(key, jnp.zeros((1, *input_shape), dtype))
    cast = lambda tree: jax.tree_util.tree_map(
        lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, tree)
    params, state = cast(params), cast(state)
    stateful = bool(jax.tree_util.tree_leaves(state))

    def apply(params, x):
        return wrapped.train_call(params, state, x)[0]

    return Model(name=name, apply=apply, params=params, state=state,
                 eval_apply=wrapped.eval_call,
                 update_state=(lambda p, s, x: wrapped.train_call(p, s, x)[1]) if stateful
                 else None,
                 source=source)
