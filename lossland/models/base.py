"""`Model`: what the rest of lossland sees of a network.

Downstream code (objective, curvature, train step) sees only the pure
`apply(params, x) -> outputs` and the params pytree. A model with state
(BatchNorm running statistics) adds three things on the side, none of which
the curvature code needs:

  * `apply` is the *training-mode* forward: BatchNorm normalizes with the
    statistics of the batch it is given, so `apply(params, x)` is a pure
    function of params and x alone (the running statistics do not enter it);
  * `update_state(params, state, x)` returns the running statistics after one
    training-mode pass over x (a side output of the training step);
  * `eval_apply(params, state, x)` is the evaluation-mode forward, which uses
    the running statistics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax


def _stateless_eval(apply):
    return lambda params, state, x: apply(params, x)


@dataclasses.dataclass(frozen=True)
class Model:
    """A built model: a pure training-mode `apply(params, x)` and its initial params."""
    name: str
    apply: Callable[[Any, jax.Array], jax.Array]
    params: Any
    state: Any = dataclasses.field(default_factory=dict)   # non-param variables (batch_stats)
    eval_apply: Optional[Callable] = None      # (params, state, x) -> outputs; None: apply
    update_state: Optional[Callable] = None    # (params, state, x) -> state; None: stateless
    source: Optional[dict] = None              # a plug-in's provenance (spec, file, sha256)

    @property
    def num_params(self) -> int:
        return sum(p.size for p in jax.tree_util.tree_leaves(self.params))

    @property
    def has_state(self) -> bool:
        return bool(jax.tree_util.tree_leaves(self.state))

    def evaluate(self, params, state, x):
        """Evaluation-mode outputs (running statistics for BatchNorm)."""
        return (self.eval_apply or _stateless_eval(self.apply))(params, state, x)
