"""The chunked full-batch reducer, and the full-batch loss, gradient, HVP, GNVP, their
diagonal blocks for a parameter subset, and the empirical Fisher product.

All full-batch quantities are *means over examples* computed as

    (1/n) Σ_chunks Σ_{i in chunk} mask_i · f_i

with `lax.scan` over fixed-size chunks, so peak memory grows with the chunk
size, not with n. Padding rows (when n is not a multiple of the chunk) carry
mask 0 and contribute exactly nothing. `reduce_chunks` is the one place where
every full-batch kernel (loss, gradient, HVP, Gauss–Newton product) reduces.

Data are arguments of the jitted functions, never closed-over constants, so
that large datasets are not baked into the compiled program and so that a
sharded `ChunkedData` (examples split over the `data` mesh axis) propagates
its sharding through jit; XLA inserts the cross-device sums.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from lossland import curvature

PyTree = Any


@flax.struct.dataclass
class ChunkedData:
    """A dataset laid out as (num_chunks, chunk_size, ...) with a padding mask.

    Attributes:
      x: (C, B, *input_shape) inputs.
      y: (C, B) int labels.
      mask: (C, B) 1.0 for real examples, 0.0 for padding.
      n: number of real examples (static).
    """
    x: jax.Array
    y: jax.Array
    mask: jax.Array
    n: int = flax.struct.field(pytree_node=False)

    @property
    def num_chunks(self) -> int:
        return self.x.shape[0]

    @property
    def chunk_size(self) -> int:
        return self.x.shape[1]


def chunk_data(x, y, chunk_size: int, *, multiple_of: int = 1, dtype=jnp.float32) -> ChunkedData:
    """Pads (x, y) and reshapes them into chunks of `chunk_size` examples.

    The chunk is shrunk to n when n is smaller, and rounded up to a multiple of
    `multiple_of` (the number of devices the chunk axis is sharded over).
    """
    x, y = np.asarray(x), np.asarray(y)
    n = x.shape[0]
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive.")
    chunk = min(chunk_size, n)
    chunk = multiple_of * math.ceil(chunk / multiple_of)
    num_chunks = math.ceil(n / chunk)
    padded = num_chunks * chunk
    pad = padded - n
    x_pad = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    y_pad = np.concatenate([y, np.zeros((pad,), y.dtype)]) if pad else y
    mask = np.concatenate([np.ones(n), np.zeros(pad)])
    return ChunkedData(
        x=jnp.asarray(x_pad.reshape((num_chunks, chunk) + x.shape[1:]), dtype),
        y=jnp.asarray(y_pad.reshape(num_chunks, chunk), jnp.int32),
        mask=jnp.asarray(mask.reshape(num_chunks, chunk), dtype),
        n=n)


def reduce_chunks(fn: Callable, data: ChunkedData) -> PyTree:
    """Σ over chunks of fn(x_chunk, y_chunk, mask_chunk), via one lax.scan.

    `fn` must return a pytree of *sums* over its chunk (already masked); the
    caller divides by n. The carry holds one chunk's worth of outputs, so
    memory does not grow with the number of chunks.
    """
    if data.num_chunks == 1:
        return fn(data.x[0], data.y[0], data.mask[0])
    out_shape = jax.eval_shape(fn, data.x[0], data.y[0], data.mask[0])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)

    def body(total, chunk):
        return jax.tree_util.tree_map(jnp.add, total, fn(*chunk)), None

    total, _ = jax.lax.scan(body, zeros, (data.x, data.y, data.mask))
    return total


def _scale(tree, factor):
    return jax.tree_util.tree_map(lambda t: t * factor, tree)


def masked_loss_sum(apply_fn, per_example_loss, params, x, y, mask):
    """Σ_i mask_i ℓ(f(params, x_i), y_i) over one chunk, and the number correct."""
    outputs = apply_fn(params, x)
    loss_sum = jnp.sum(mask * per_example_loss(outputs, y))
    correct = jnp.sum(mask * (jnp.argmax(outputs, -1) == y))
    return loss_sum, correct


def loss_and_accuracy(apply_fn, per_example_loss, params, data: ChunkedData):
    """Full-batch mean loss and accuracy."""
    def chunk_fn(x, y, mask):
        return masked_loss_sum(apply_fn, per_example_loss, params, x, y, mask)
    loss_sum, correct = reduce_chunks(chunk_fn, data)
    return loss_sum / data.n, correct / data.n


def loss_accuracy_grad(apply_fn, per_example_loss, params, data: ChunkedData):
    """Full-batch mean loss, accuracy and gradient (a params pytree)."""
    def chunk_fn(x, y, mask):
        value_and_grad = jax.value_and_grad(
            lambda p: masked_loss_sum(apply_fn, per_example_loss, p, x, y, mask), has_aux=True)
        (loss_sum, correct), grad_sum = value_and_grad(params)
        return loss_sum, correct, grad_sum
    loss_sum, correct, grad_sum = reduce_chunks(chunk_fn, data)
    return loss_sum / data.n, correct / data.n, _scale(grad_sum, 1.0 / data.n)


def full_batch_hvp(apply_fn, per_example_loss, params, v, data: ChunkedData):
    """H v for the full-batch mean loss; forward-over-reverse per chunk."""
    def chunk_fn(x, y, mask):
        chunk_loss = lambda p: masked_loss_sum(apply_fn, per_example_loss, p, x, y, mask)[0]
        return curvature.hvp(chunk_loss, params, v)
    return _scale(reduce_chunks(chunk_fn, data), 1.0 / data.n)


def full_batch_block_hvp(apply_fn, per_example_loss, params, vectors, data: ChunkedData):
    """H V for a block of b tangents (a params pytree whose leaves lead with b), in one data pass.

    Per chunk, `curvature.block_hvp` linearizes the gradient once (the forward
    and reverse passes at θ are shared by the block) and applies it to each
    tangent. Equals b calls of `full_batch_hvp` up to rounding.
    """
    def chunk_fn(x, y, mask):
        chunk_loss = lambda p: masked_loss_sum(apply_fn, per_example_loss, p, x, y, mask)[0]
        return curvature.block_hvp(chunk_loss, params, vectors)
    return _scale(reduce_chunks(chunk_fn, data), 1.0 / data.n)


def loss_accuracy_grad_block_hvp(apply_fn, per_example_loss, params, vectors, data: ChunkedData):
    """Full-batch loss, accuracy, gradient and H V for b tangents, in one data pass (the fused step).

    Per chunk, `curvature.grad_and_block_hvp` linearizes the gradient once: its
    primal output is the chunk's gradient sum and its tangent map gives the
    chunk's H V; both are summed over chunks like every other kernel here.
    The gradient equals `loss_accuracy_grad`'s up to float rounding (the same
    sums, compiled in a different program; see tests/test_stream.py).
    """
    def chunk_fn(x, y, mask):
        chunk_loss = lambda p: masked_loss_sum(apply_fn, per_example_loss, p, x, y, mask)
        (loss_sum, correct), grad_sum, hv_sum = curvature.grad_and_block_hvp(
            chunk_loss, params, vectors, has_aux=True)
        return loss_sum, correct, grad_sum, hv_sum
    loss_sum, correct, grad_sum, hv_sum = reduce_chunks(chunk_fn, data)
    return (loss_sum / data.n, correct / data.n, _scale(grad_sum, 1.0 / data.n),
            _scale(hv_sum, 1.0 / data.n))


def full_batch_gnvp(apply_fn, per_example_loss, params, v, data: ChunkedData):
    """G v = Jᵀ H_out J v for the full-batch mean loss, chunked like the HVP."""
    def chunk_fn(x, y, mask):
        model_fn = lambda p: apply_fn(p, x)
        output_loss = lambda z: jnp.sum(mask * per_example_loss(z, y))
        return curvature.gnvp(model_fn, output_loss, params, v)
    return _scale(reduce_chunks(chunk_fn, data), 1.0 / data.n)


def full_batch_block_gnvp(apply_fn, per_example_loss, params, vectors, data: ChunkedData):
    """G V for a block of b tangents (leading axis b), chunked like `full_batch_block_hvp`."""
    def chunk_fn(x, y, mask):
        model_fn = lambda p: apply_fn(p, x)
        output_loss = lambda z: jnp.sum(mask * per_example_loss(z, y))
        return curvature.block_gnvp(model_fn, output_loss, params, vectors)
    return _scale(reduce_chunks(chunk_fn, data), 1.0 / data.n)


def _ghost_batch_share(update_state, params, model_state, x, mask, n):
    """Chunk c's share of the step's new running statistics: (B_c / n) · update_state(θ, s, x_c).

    Leaves keep their dtype (the weights are in the data's float dtype)."""
    new = update_state(params, model_state, x)
    weight = jnp.sum(mask) / n
    return jax.tree_util.tree_map(lambda s: (s * weight).astype(s.dtype), new)


def full_batch_model_state(update_state, params, model_state, data: ChunkedData):
    """A training step's side output for a model with batch statistics: the new running stats.

    Each chunk is one ghost batch: `update_state(params, s, x_c)` moves the
    running statistics towards chunk c's, m·s + (1 − m)·stat_c (BatchNorm's
    momentum m; for the variance Flax's biased batch variance). Their mean over
    chunks, weighted by real examples (all chunks are whole for a BatchNorm
    model, `experiment.check_whole_chunks`), is

        s' = m·s + (1 − m)·(1/C) Σ_c stat_c,

    one update per step with the mean of the ghost-batch statistics the
    step's loss used (not C sequential updates, which would weigh the chunks
    by m^(C−1−c) and depend on the chunk order). With one chunk it is exactly
    Flax's train-mode update on the whole batch.
    """
    def chunk_fn(x, y, mask):
        return _ghost_batch_share(update_state, params, model_state, x, mask, data.n)
    return reduce_chunks(chunk_fn, data)


def loss_accuracy_grad_model_state(apply_fn, per_example_loss, update_state, params,
                                   model_state, data: ChunkedData):
    """`loss_accuracy_grad` and `full_batch_model_state` in one pass over the chunks.

    The training step of a model with batch statistics: both come from the
    same ghost batches, in one scan body, so XLA can share the forward pass.
    The running statistics do not enter the loss or the gradient: `apply_fn`
    is the training-mode forward, which normalizes with each chunk's own
    statistics.
    """
    def chunk_fn(x, y, mask):
        value_and_grad = jax.value_and_grad(
            lambda p: masked_loss_sum(apply_fn, per_example_loss, p, x, y, mask), has_aux=True)
        (loss_sum, correct), grad_sum = value_and_grad(params)
        share = _ghost_batch_share(update_state, params, model_state, x, mask, data.n)
        return loss_sum, correct, grad_sum, share
    loss_sum, correct, grad_sum, new_model_state = reduce_chunks(chunk_fn, data)
    return (loss_sum / data.n, correct / data.n, _scale(grad_sum, 1.0 / data.n),
            new_model_state)


def full_batch_subset_hvp(apply_fn, per_example_loss, params, subset, v_sub, data: ChunkedData):
    """H_SS v_S for the full-batch mean loss: the diagonal Hessian block of a ParamSubset.

    v_sub and the result are {path: leaf} dicts (`subset.take`). Per chunk, only
    θ_S is differentiated (`curvature.subset_hvp`).
    """
    def chunk_fn(x, y, mask):
        chunk_loss = lambda p: masked_loss_sum(apply_fn, per_example_loss, p, x, y, mask)[0]
        return curvature.subset_hvp(chunk_loss, params, subset, v_sub)
    return _scale(reduce_chunks(chunk_fn, data), 1.0 / data.n)


def full_batch_subset_gnvp(apply_fn, per_example_loss, params, subset, v_sub,
                           data: ChunkedData):
    """G_SS v_S for the full-batch mean loss, chunked like `full_batch_subset_hvp`."""
    def chunk_fn(x, y, mask):
        model_fn = lambda p: apply_fn(p, x)
        output_loss = lambda z: jnp.sum(mask * per_example_loss(z, y))
        return curvature.subset_gnvp(model_fn, output_loss, params, subset, v_sub)
    return _scale(reduce_chunks(chunk_fn, data), 1.0 / data.n)


def full_batch_empirical_fisher_vp(apply_fn, per_example_loss, params, v, data: ChunkedData):
    """F v = (1/n) Σ_i g_i (g_iᵀ v) over the chunked data (see `curvature.empirical_fisher_vp`).

    Padding rows carry weight 0; a chunk contributes Σ_i mask_i g_i (g_iᵀ v).
    """
    def chunk_fn(x, y, mask):
        losses = lambda p: per_example_loss(apply_fn(p, x), y)
        return curvature.empirical_fisher_vp(losses, params, v, weights=mask)
    return _scale(reduce_chunks(chunk_fn, data), 1.0 / data.n)


class Objective:
    """A model, a loss and a chunked dataset, with jitted full-batch kernels.

    Every method takes params (a pytree); `flat_*` methods work on the flat
    (P,) view given by `ravel_pytree`, which is what eigensolvers consume.
    The data travel as jit arguments (see module docstring).
    """

    def __init__(self, apply_fn: Callable, per_example_loss: Callable, data: ChunkedData):
        self.apply_fn = apply_fn
        self.per_example_loss = per_example_loss
        self.data = data
        bind = lambda f: jax.jit(functools.partial(f, apply_fn, per_example_loss))
        self._loss_and_accuracy = bind(loss_and_accuracy)
        self._loss_accuracy_grad = bind(loss_accuracy_grad)
        self._hvp = bind(full_batch_hvp)
        self._gnvp = bind(full_batch_gnvp)
        self._block_hvp = bind(full_batch_block_hvp)
        self._block_gnvp = bind(full_batch_block_gnvp)
        self._empirical_fisher_vp = bind(full_batch_empirical_fisher_vp)

    @property
    def n(self) -> int:
        return self.data.n

    def loss_and_accuracy(self, params):
        return self._loss_and_accuracy(params, self.data)

    def loss_accuracy_grad(self, params):
        return self._loss_accuracy_grad(params, self.data)

    def loss(self, params):
        return self.loss_and_accuracy(params)[0]

    def grad(self, params):
        return self.loss_accuracy_grad(params)[2]

    def hvp(self, params, v):
        return self._hvp(params, v, self.data)

    def gnvp(self, params, v):
        return self._gnvp(params, v, self.data)

    def block_hvp(self, params, vectors):
        """H V for a pytree of b tangents stacked on a leading axis."""
        return self._block_hvp(params, vectors, self.data)

    def block_gnvp(self, params, vectors):
        """G V for a pytree of b tangents stacked on a leading axis."""
        return self._block_gnvp(params, vectors, self.data)

    def empirical_fisher_vp(self, params, v):
        """F v = (1/n) Σ_i g_i (g_iᵀ v), the empirical Fisher product."""
        return self._empirical_fisher_vp(params, v, self.data)

    # Unjitted pure forms, for use inside a caller's own jit (e.g. Lanczos
    # tracking), where `data` is an argument of that outer jit.
    def hvp_fn(self, params, v, data):
        return full_batch_hvp(self.apply_fn, self.per_example_loss, params, v, data)

    def block_hvp_fn(self, params, vectors, data):
        return full_batch_block_hvp(self.apply_fn, self.per_example_loss, params, vectors, data)

    def gnvp_fn(self, params, v, data):
        return full_batch_gnvp(self.apply_fn, self.per_example_loss, params, v, data)

    def block_gnvp_fn(self, params, vectors, data):
        return full_batch_block_gnvp(self.apply_fn, self.per_example_loss, params, vectors, data)

    def subset_hvp_fn(self, params, subset, v_sub, data):
        return full_batch_subset_hvp(self.apply_fn, self.per_example_loss, params, subset,
                                     v_sub, data)

    def subset_gnvp_fn(self, params, subset, v_sub, data):
        return full_batch_subset_gnvp(self.apply_fn, self.per_example_loss, params, subset,
                                      v_sub, data)

    def empirical_fisher_vp_fn(self, params, v, data):
        return full_batch_empirical_fisher_vp(self.apply_fn, self.per_example_loss, params, v,
                                              data)

    def loss_accuracy_grad_block_hvp_fn(self, params, vectors, data):
        return loss_accuracy_grad_block_hvp(self.apply_fn, self.per_example_loss, params,
                                            vectors, data)

    def loss_accuracy_grad_fn(self, params, data):
        return loss_accuracy_grad(self.apply_fn, self.per_example_loss, params, data)

    def loss_fn(self, params, data):
        return loss_and_accuracy(self.apply_fn, self.per_example_loss, params, data)[0]


def flat_matvec(product: Callable, params: PyTree, *args) -> Callable:
    """Wraps a pytree product `product(params, v_tree, *args)` as a (P,) -> (P,) matvec.

    The flat order is `ravel_pytree(params)`'s; eigensolvers consume this form,
    e.g. `flat_matvec(objective.hvp_fn, params, data)`.
    """
    _, unravel = ravel_pytree(params)

    def matvec(v_flat):
        return ravel_pytree(product(params, unravel(v_flat), *args))[0]

    return matvec


def flat_block_matvec(block_product: Callable, params: PyTree, *args) -> Callable:
    """Wraps `block_product(params, V_tree, *args)` as a (b, P) -> (b, P) block matvec.

    Rows are flat vectors in `ravel_pytree(params)` order, as in `flat_matvec`.
    """
    _, unravel = ravel_pytree(params)
    ravel = lambda tree: ravel_pytree(tree)[0]

    def block_matvec(vectors):
        return jax.vmap(ravel)(block_product(params, jax.vmap(unravel)(vectors), *args))

    return block_matvec
