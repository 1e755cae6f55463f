"""Curvature products on pytrees: H v and the Gauss–Newton product G v.

Owns the per-batch products of the Hessian and of its Gauss–Newton part with
one vector. It knows nothing of chunks, devices or eigensolvers: the chunked
full-batch forms live in `lossland.objective`, the solvers in `lanczos`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

PyTree = Any


def hvp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
    """H v, where H = ∇² loss_fn(params); forward-over-reverse (jvp of grad).

    Args:
      loss_fn: params -> scalar.
      params, v: pytrees of the same structure.
    Returns:
      A pytree like `params`. Cost: about one gradient plus one forward-mode
      pass through it (≈ 1.5–2 gradients).
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def gnvp(model_fn: Callable[[PyTree], jax.Array], output_loss_fn: Callable[[jax.Array], jax.Array],
         params: PyTree, v: PyTree) -> PyTree:
    """G v = Jᵀ H_out J v, the Gauss–Newton part of the Hessian of output_loss_fn∘model_fn.

    J is the Jacobian of the network outputs z = model_fn(params), and
    H_out = ∇²_z output_loss_fn(z). The full Hessian splits as
        ∇²(ℓ∘f) = Jᵀ H_out J + Σ_i (∂ℓ/∂z_i) ∇² z_i,
    so the residual part is `hvp(loss, params, v) − gnvp(...)`.

    Args:
      model_fn: params -> outputs z (any shape), e.g. `lambda p: apply(p, x)`.
      output_loss_fn: z -> scalar loss, e.g. `lambda z: losses.mse(z, y)`.
      params, v: pytrees of the same structure.

    Example, with a user's own Flax model:

        model_fn = lambda p: model.apply({"params": p}, x)
        output_loss_fn = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
        Gv = gnvp(model_fn, output_loss_fn, params, v)
    """
    z, jv = jax.jvp(model_fn, (params,), (v,))           # J v, in output space
    h_out_jv = jax.jvp(jax.grad(output_loss_fn), (z,), (jv,))[1]   # H_out (J v)
    _, vjp_fn = jax.vjp(model_fn, params)
    return vjp_fn(h_out_jv)[0]                            # Jᵀ (H_out J v)
