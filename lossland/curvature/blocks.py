"""Parameter subsets and the diagonal blocks H_SS and G_SS of the curvature they select.

Owns the selection of a set S of parameter leaves — a layer (a top-level
module of the params pytree, e.g. `Dense_0`), a name filter (glob or regex on
the '/'-joined path, e.g. `Dense_0/kernel`), or a predicate on the path — and
the products with the diagonal block of the Hessian or of the Gauss–Newton
matrix for S:

    H_SS v_S = ∇²_S L(θ_S, θ_rest) v_S,   θ_rest held fixed.

A block product differentiates with respect to θ_S only (`restrict`), so the
weight cotangents of the other leaves are never formed: cheaper than a full
HVP whose result is then cut down to S (benchmarks/curvature.py --toolkit
measures how much). Selections are whole leaves.

Sub-pytrees (`ParamSubset.take`) are dicts keyed by the '/'-joined path, so
every solver on flat vectors (`lanczos_top_k`, `hutchpp_trace`, …) works on
a block through `ravel_pytree` as it does on the whole Hessian.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from lossland.curvature.estimators import hutchpp_trace
from lossland.curvature.lanczos import lanczos_top_k
from lossland.curvature.products import gnvp, hvp

PyTree = Any


def path_name(path) -> str:
    """The '/'-joined name of a pytree key path, e.g. ('Dense_0', 'kernel') -> 'Dense_0/kernel'."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def leaf_names(params: PyTree) -> list[str]:
    """Every leaf's '/'-joined path, in `ravel_pytree` order."""
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


class NoLayerStructure(ValueError):
    """The params pytree has no top-level modules to call layers."""


def layer_names(params: PyTree) -> tuple[str, ...]:
    """The top-level module names of a params pytree, e.g. ('Dense_0', 'Dense_1').

    A layer is a top-level entry of a mapping whose value is itself a subtree
    (a Flax module's params). Raises NoLayerStructure when params is not a
    mapping or has a bare array at its top level (nothing to group by).
    """
    if not isinstance(params, Mapping) or not params:
        raise NoLayerStructure(f"the params are a {type(params).__name__}, not a mapping of "
                               "layer names to their parameters")
    bare = [str(k) for k, v in params.items() if not isinstance(v, Mapping)]
    if bare:
        raise NoLayerStructure(f"the params have bare arrays at their top level ({bare}), not "
                               "only modules")
    return tuple(str(k) for k in params)


@dataclasses.dataclass(frozen=True)
class ParamSubset:
    """A set S of whole parameter leaves, named by their '/'-joined paths.

    Attributes:
      description: how S was selected (for messages), e.g. "layer='Dense_0'".
      names: the selected leaves' paths, in `ravel_pytree` order of the full params.
      mask: one bool per leaf of the full params, in `tree_leaves` order.
      size: P_S, the number of scalar parameters in S.
    """
    description: str
    names: tuple[str, ...]
    mask: tuple[bool, ...]
    size: int

    def take(self, tree: PyTree) -> dict:
        """The selected leaves of a params-shaped tree, as {path: leaf}."""
        leaves = jax.tree_util.tree_leaves(tree)
        chosen = [leaf for leaf, keep in zip(leaves, self.mask) if keep]
        return dict(zip(self.names, chosen))

    def put(self, tree: PyTree, sub: dict) -> PyTree:
        """`tree` with the selected leaves replaced by those of `sub`."""
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        names = iter(self.names)
        leaves = [sub[next(names)] if keep else leaf for leaf, keep in zip(leaves, self.mask)]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def embed(self, tree: PyTree, sub: dict) -> PyTree:
        """A params-shaped tree holding `sub` on S and zeros elsewhere (`tree` gives shapes)."""
        zeros = jax.tree_util.tree_map(lambda t: jax.numpy.zeros(t.shape, t.dtype), tree)
        return self.put(zeros, sub)


def select_params(params: PyTree, *, layer: str | None = None, glob: str | None = None,
                  regex: str | None = None,
                  predicate: Callable[[str], bool] | None = None) -> ParamSubset:
    """The leaves of `params` picked by exactly one of the four rules.

    Args:
      params: a params pytree (arrays or shape structs).
      layer: a top-level module name (`layer_names`), e.g. "Dense_0".
      glob: a shell pattern matched against the whole path, e.g. "Dense_*/kernel".
      regex: a regular expression searched in the path (`re.search`), e.g. r"kernel$".
      predicate: a function of the path string, True to keep the leaf.
    Raises:
      ValueError when not exactly one rule is given, or when the rule matches
      no leaf (the message names the rule and lists the available names).
    """
    rules = {"layer": layer, "glob": glob, "regex": regex, "predicate": predicate}
    given = {k: v for k, v in rules.items() if v is not None}
    if len(given) != 1:
        raise ValueError(f"select_params takes exactly one of layer=, glob=, regex=, "
                         f"predicate=; got {sorted(given) or 'none'}.")
    (kind, rule), = given.items()
    if kind == "layer":
        keep = lambda name: name.split("/", 1)[0] == rule
    elif kind == "glob":
        keep = lambda name: fnmatch.fnmatchcase(name, rule)
    elif kind == "regex":
        pattern = re.compile(rule)
        keep = lambda name: pattern.search(name) is not None
    else:
        keep = lambda name: bool(rule(name))
    names = leaf_names(params)
    mask = tuple(keep(name) for name in names)
    description = f"{kind}={rule!r}"
    if not any(mask):
        available = (f"layers {list(layer_names(params))}" if kind == "layer"
                     and isinstance(params, Mapping) else f"leaves {names}")
        raise ValueError(f"select_params({description}) matches no parameter; available "
                         f"{available}.")
    leaves = jax.tree_util.tree_leaves(params)
    size = int(sum(int(np.prod(leaf.shape)) for leaf, k in zip(leaves, mask) if k))
    return ParamSubset(description=description,
                       names=tuple(n for n, k in zip(names, mask) if k), mask=mask, size=size)


def layer_subsets(params: PyTree) -> dict[str, ParamSubset]:
    """{layer name: its ParamSubset} for every top-level module (`layer_names`)."""
    return {name: select_params(params, layer=name) for name in layer_names(params)}


def layer_segment_ids(params: PyTree) -> tuple[tuple[str, ...], np.ndarray]:
    """(layer names, (P,) int32 ids): entry j of `ravel_pytree(params)` lies in layer ids[j].

    The segments for `hutchinson_diagonal`'s per-layer sums of the diagonal.
    """
    names = layer_names(params)
    index = {name: i for i, name in enumerate(names)}
    ids = [np.full(int(np.prod(leaf.shape)), index[path_name(path[:1])], np.int32)
           for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]
    return names, np.concatenate(ids) if ids else np.zeros(0, np.int32)


def restrict(fn: Callable[[PyTree], Any], params: PyTree,
             subset: ParamSubset) -> tuple[Callable[[dict], Any], dict]:
    """fn as a function of θ_S alone (the rest held at params), and θ_S.

    Derivatives of the restricted function are the S-blocks of fn's: its
    Hessian is H_SS, its Jacobian J_S.
    """
    return (lambda sub: fn(subset.put(params, sub))), subset.take(params)


def subset_hvp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, subset: ParamSubset,
               v_sub: dict) -> dict:
    """H_SS v_S: the product with the diagonal Hessian block of the leaves in `subset`.

    v_sub and the result are {path: leaf} dicts like `subset.take(params)`.
    Equals `subset.take(hvp(loss_fn, params, subset.embed(params, v_sub)))`.
    """
    sub_loss, sub_params = restrict(loss_fn, params, subset)
    return hvp(sub_loss, sub_params, v_sub)


def subset_gnvp(model_fn: Callable[[PyTree], jax.Array],
                output_loss_fn: Callable[[jax.Array], jax.Array], params: PyTree,
                subset: ParamSubset, v_sub: dict) -> dict:
    """G_SS v_S = J_Sᵀ H_out J_S v_S: the diagonal Gauss–Newton block of `subset`."""
    sub_model, sub_params = restrict(model_fn, params, subset)
    return gnvp(sub_model, output_loss_fn, sub_params, v_sub)


class BlockSpectrum(NamedTuple):
    """Top-k eigenpairs' values and residuals, and the Hutch++ trace, of one diagonal block."""
    eigenvalues: jax.Array
    residuals: jax.Array
    trace: jax.Array
    trace_std_error: jax.Array


def block_spectra(subset_product: Callable[[ParamSubset, dict], dict], params: PyTree,
                  subsets: dict[str, ParamSubset], key: jax.Array, *, k: int, num_iters: int,
                  tol: float | None = None, trace_matvecs: int = 0) -> dict[str, BlockSpectrum]:
    """Top-k eigenvalues (Lanczos) and, with trace_matvecs ≥ 3, the Hutch++ trace of each block.

    `subset_product(S, v_S)` is a block product, e.g.
    `lambda S, v: subset_hvp(loss_fn, params, S, v)` or, over the chunked full batch,
    `lambda S, v: objective.subset_hvp_fn(params, S, v, data)`. Each block's
    Lanczos makes at most min(num_iters, P_S) matvecs (k ≤ P_S is required); the
    trace is NaN without trace_matvecs. Jit-compatible; blocks run one after another.
    """
    out = {}
    for i, (name, subset) in enumerate(subsets.items()):
        sub = subset.take(params)
        flat, unravel = ravel_pytree(sub)
        matvec = lambda v, s=subset: ravel_pytree(subset_product(s, unravel(v)))[0]
        top_key, trace_key = jax.random.split(jax.random.fold_in(key, i))
        v0 = jax.random.normal(top_key, flat.shape, flat.dtype)
        top = lanczos_top_k(matvec, v0, k, min(num_iters, subset.size), tol=tol)
        if trace_matvecs >= 3:
            trace = hutchpp_trace(matvec, v0, trace_key, trace_matvecs)
            trace, trace_error = trace.estimate, trace.std_error
        else:
            trace = trace_error = jax.numpy.full((), jax.numpy.nan, flat.dtype)
        out[name] = BlockSpectrum(eigenvalues=top.eigenvalues, residuals=top.residuals,
                                  trace=trace, trace_std_error=trace_error)
    return out
