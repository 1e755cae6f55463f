"""Curvature kernels on pytrees and flat vectors.

Public API (a promise to users; keep these names and signatures):

    hvp(loss_fn, params, v)                        Hessian-vector product
    gnvp(model_fn, output_loss_fn, params, v)      Gauss–Newton-vector product
    block_hvp(loss_fn, params, V), block_gnvp(...)  the same for b tangents stacked on axis 0
    grad_and_block_hvp(loss_fn, params, V)         (value, ∇L, H V) from one linearization
    stream_start, stream_pending, stream_update    top-k subspace followed one product a step
    lanczos_top_k(matvec, v0, k, num_iters, *, tol=None, init_vectors=None, which="largest")
                                                   top-k eigenpairs (Lanczos, full reorth.)
    block_top_k(block_matvec, start, k, num_blocks, *, tol=None)
                                                   top-k eigenpairs from block products (block Davidson)
    slq_density(matvec, v0, key, num_probes, num_iters, grid, sigma)
                                                   spectral density (stochastic Lanczos quadrature)
    hutchinson_trace(matvec, v0, key, num_probes)  trace estimate with its standard error

Matvecs act on flat (P,) vectors; `lossland.objective.flat_matvec` wraps a
pytree product such as `Objective.hvp_fn` into one.

Full-batch chunked forms of the products live in `lossland.objective`
(`full_batch_hvp`, `full_batch_gnvp`, `full_batch_block_hvp`, `full_batch_block_gnvp`
and the `Objective` methods of the same names); `flat_block_matvec` wraps a block
product into the (b, P) -> (b, P) form that `block_top_k` takes.

Modules (one idea each):
    products    hvp, gnvp with one vector; block_hvp, block_gnvp with b vectors
    basis       the Krylov basis buffer and twice-repeated Gram–Schmidt
    ritz        Ritz pairs and residual estimates from the Krylov coefficients
    operators   compiled_call: a solver body and its matvec as one jit program
    stream      streaming subspace iteration: Rayleigh–Ritz on each row's latest image
    block       block_top_k: warm-started block solver on (b, P) -> (b, P) products
    lanczos     krylov_decomposition, warm_start_vector, lanczos_top_k
    stochastic  slq_density, hutchinson_trace
"""

from lossland.curvature.block import block_top_k
from lossland.curvature.lanczos import (KrylovState, LanczosResult, krylov_decomposition,
                                        lanczos_top_k, warm_start_vector)
from lossland.curvature.products import block_gnvp, block_hvp, gnvp, grad_and_block_hvp, hvp
from lossland.curvature.ritz import ritz_pairs, ritz_residual_estimates
from lossland.curvature.stream import (StreamRitz, StreamState, stream_pending, stream_start,
                                      stream_update)
from lossland.curvature.stochastic import (HutchinsonResult, SLQResult, hutchinson_trace,
                                           slq_density)

__all__ = [
    "HutchinsonResult", "KrylovState", "LanczosResult", "SLQResult", "block_gnvp", "block_hvp",
    "block_top_k", "gnvp", "grad_and_block_hvp", "hutchinson_trace", "hvp", "krylov_decomposition", "lanczos_top_k",
    "ritz_pairs", "ritz_residual_estimates", "slq_density", "StreamRitz", "StreamState",
    "stream_pending", "stream_start", "stream_update", "warm_start_vector",
]
