"""Curvature kernels on pytrees and flat vectors.

Public API (a promise to users; keep these names and signatures):

    hvp(loss_fn, params, v)                        Hessian-vector product
    gnvp(model_fn, output_loss_fn, params, v)      Gauss–Newton-vector product
    block_hvp(loss_fn, params, V), block_gnvp(...)  the same for b tangents stacked on axis 0
    grad_and_block_hvp(loss_fn, params, V)         (value, ∇L, H V) from one linearization
    stream_start, stream_pending, stream_update    top-k subspace followed one product a step
    current_block, block_pending, update_block, advance
                                                   the same, one phase's block at a time
    lanczos_top_k(matvec, v0, k, num_iters, *, tol=None, init_vectors=None, which="largest")
                                                   top-k eigenpairs (Lanczos, full reorth.);
                                                   which="smallest" gives λ_min first
    block_top_k(block_matvec, start, k, num_blocks, *, tol=None)
                                                   top-k eigenpairs from block products (block Davidson)
    slq_density(matvec, v0, key, num_probes, num_iters, grid, sigma)
                                                   spectral density (stochastic Lanczos quadrature)
    hutchinson_trace(matvec, v0, key, num_probes)  trace estimate with its standard error
    hutchpp_trace(matvec, v0, key, num_matvecs)    Hutch++ trace, with its standard error
    hutchinson_diagonal(matvec, v0, key, num_probes, *, segment_ids, num_segments)
                                                   diag(H) and its per-segment (per-layer) sums
    frobenius_norm_sq(matvec, v0, key, num_probes) tr(H²) = ‖H‖_F², with its standard error
    empirical_fisher_vp(per_example_loss_fn, params, v, weights=None)
                                                   F v = Σ w_i g_i (g_iᵀ v), per-example gradients
    select_params(params, *, layer|glob|regex|predicate)
                                                   a ParamSubset S of whole leaves (layer_names,
                                                   layer_subsets, layer_segment_ids)
    subset_hvp(loss_fn, params, S, v_S), subset_gnvp(model_fn, output_loss_fn, params, S, v_S)
                                                   products with the diagonal blocks H_SS, G_SS
    block_spectra(subset_product, params, subsets, key, *, k, num_iters, tol, trace_matvecs)
                                                   top-k and Hutch++ trace of each block

Matvecs act on flat (P,) vectors; `lossland.objective.flat_matvec` wraps a
pytree product such as `Objective.hvp_fn` into one.

Full-batch chunked forms of the products live in `lossland.objective`
(`full_batch_hvp`, `full_batch_gnvp`, `full_batch_block_hvp`, `full_batch_block_gnvp`,
`full_batch_subset_hvp`, `full_batch_subset_gnvp`, `full_batch_empirical_fisher_vp`
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
    estimators  hutchpp_trace, hutchinson_diagonal, frobenius_norm_sq
    blocks      parameter subsets (layers, name filters, predicates) and their block products
"""

from lossland.curvature.block import block_top_k
from lossland.curvature.blocks import (BlockSpectrum, NoLayerStructure, ParamSubset,
                                       block_spectra, layer_names,
                                       layer_segment_ids, layer_subsets, leaf_names,
                                       select_params, subset_gnvp, subset_hvp)
from lossland.curvature.estimators import (DiagonalResult, HutchppResult, frobenius_norm_sq,
                                           hutchinson_diagonal, hutchpp_trace)
from lossland.curvature.lanczos import (KrylovState, LanczosResult, krylov_decomposition,
                                        lanczos_top_k, warm_start_vector)
from lossland.curvature.products import (block_gnvp, block_hvp, empirical_fisher_vp, gnvp,
                                         grad_and_block_hvp, hvp)
from lossland.curvature.ritz import ritz_pairs, ritz_residual_estimates
from lossland.curvature.stream import (StreamBlock, StreamRitz, StreamState, advance,
                                      block_pending, current_block, stream_pending,
                                      stream_start, stream_update, update_block)
from lossland.curvature.stochastic import (HutchinsonResult, SLQResult, hutchinson_trace,
                                           slq_density)

__all__ = [
    "BlockSpectrum", "DiagonalResult", "HutchinsonResult", "HutchppResult", "KrylovState",
    "LanczosResult", "NoLayerStructure", "ParamSubset", "SLQResult", "StreamBlock", "StreamRitz",
    "StreamState", "advance", "block_pending", "current_block",
    "block_gnvp", "block_hvp", "block_spectra", "block_top_k", "empirical_fisher_vp",
    "frobenius_norm_sq", "gnvp", "grad_and_block_hvp", "hutchinson_diagonal", "hutchinson_trace",
    "hutchpp_trace", "hvp", "krylov_decomposition", "lanczos_top_k", "layer_names",
    "layer_segment_ids", "layer_subsets", "leaf_names", "ritz_pairs", "ritz_residual_estimates",
    "select_params", "slq_density", "stream_pending", "stream_start", "stream_update",
    "subset_gnvp", "subset_hvp", "update_block", "warm_start_vector",
]
