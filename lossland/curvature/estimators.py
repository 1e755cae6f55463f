"""Matrix-free estimators beyond Hutchinson: Hutch++ trace, the diagonal, tr(H²).

Owns estimators built from products with random probe vectors (Rademacher
z, E[zzᵀ] = I):
  * `hutchpp_trace`: Hutch++ (Meyer, Musco, Musco & Woodruff 2021): the trace
    of a low-rank sketch of the top of the spectrum, exactly, plus Hutchinson
    on what is left — far lower variance than Hutchinson when the spectrum
    decays, at the same number of matvecs;
  * `hutchinson_diagonal`: diag(H) ≈ mean of z ⊙ Hz (Bekas, Kokiopoulou & Saad
    2007), with sums over segments of the entries (per-layer traces);
  * `frobenius_norm_sq`: tr(H²) = ‖H‖_F² ≈ mean of ‖Hz‖².
Every estimate carries a standard error from the spread of its probes.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from lossland.curvature import basis
from lossland.curvature.operators import compiled_call
from lossland.curvature.stochastic import HutchinsonResult, probe_samples


class HutchppResult(NamedTuple):
    """Hutch++ trace estimate. A pytree.

    Attributes:
      estimate: tr(QᵀHQ) + the Hutchinson estimate of tr((I−QQᵀ)H(I−QQᵀ)).
      std_error: the standard error of the estimate (see `hutchpp_trace`); 0 when
        the sketch spans the whole space (the estimate is then exact).
      sketch_trace: tr(QᵀHQ), the part carried by the sketched subspace.
      residual_samples: (g,) the probes' gᵀ(I−QQᵀ)H(I−QQᵀ)g.
      num_matvecs: the matvecs made (Python int).
    """
    estimate: jax.Array
    std_error: jax.Array
    sketch_trace: jax.Array
    residual_samples: jax.Array
    num_matvecs: int


def _rademacher(key, shape, dtype):
    return jax.random.rademacher(key, shape, dtype=dtype)


def _mean_and_std_error(samples):
    """Mean over axis 0 and its standard error (sample std, ddof=1, / √count; inf for 1)."""
    count = samples.shape[0]
    mean = jnp.mean(samples, axis=0)
    if count < 2:
        return mean, jnp.full(mean.shape, jnp.inf, samples.dtype)
    return mean, jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(count)


def hutchpp_trace(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, key: jax.Array,
                  num_matvecs: int) -> HutchppResult:
    """trace(H) by Hutch++ with a budget of `num_matvecs` products (≥ 3).

    With s = num_matvecs // 3 and g = num_matvecs − 2s:
      1. Q = an orthonormal basis of H S for an s-column Rademacher sketch S
         (s matvecs): for a decaying spectrum, span Q holds the top eigenvectors;
      2. tr(QᵀHQ) exactly (s matvecs);
      3. Hutchinson with g Rademacher probes on the deflated (I−QQᵀ)H(I−QQᵀ),
         whose trace is the rest (g matvecs).
    For any fixed Q, step 3 is unbiased for the rest, so the estimate is
    unbiased for tr(H), and its variance is E_Q[Var(step 3 | Q)]: the sample
    variance of the g deflated probes / g is an unbiased estimate of it, which
    is the reported std_error². Hutchinson's variance is 2(‖H‖_F² − Σ H_ii²)/m;
    Hutch++'s replaces ‖H‖_F² by that of H outside the top ~s eigenvalues
    (Meyer et al. 2021 bound the error by O(1/m) rather than O(1/√m) for PSD H).
    When s ≥ P the sketch spans everything and the estimate is exact.

    Args:
      matvec: (P,) -> (P,), symmetric.
      v0: (P,) vector fixing size and dtype (its values are not used).
      key: PRNG key for the sketch and the probes.
      num_matvecs: Python int ≥ 3.
    """
    v0 = jnp.asarray(v0)
    (P,) = v0.shape
    dtype = v0.dtype
    if num_matvecs < 3:
        raise ValueError(f"num_matvecs={num_matvecs}; Hutch++ needs >= 3 (sketch, its trace "
                         "and the residual probes take a third each).")
    s = num_matvecs // 3
    g = num_matvecs - 2 * s
    sketch_key, probe_key = jax.random.split(key)

    def body(matvec, sketch_key, probe_key):
        apply = lambda rows: lax.map(matvec, rows)                 # (b, P) -> (b, P)
        Y = apply(_rademacher(sketch_key, (s, P), dtype))          # rows of H S
        Q = jnp.linalg.qr(Y.T, mode="reduced")[0]                  # (P, min(P, s)), orthonormal
        G = _rademacher(probe_key, (g, P), dtype)
        G = G - basis.dot(basis.dot(G, Q), Q.T)                    # (I − QQᵀ) g, per row
        HQ = apply(Q.T)
        sketch_trace = jnp.sum(Q.T * HQ)                           # tr(QᵀHQ)
        HG = apply(G)
        samples = jnp.sum(G * HG, axis=1)                          # gᵀ(I−QQᵀ)H(I−QQᵀ)g
        return sketch_trace, samples

    sketch_trace, samples = compiled_call(body, matvec, v0, sketch_key, probe_key)
    rest, std_error = _mean_and_std_error(samples)
    return HutchppResult(estimate=sketch_trace + rest, std_error=std_error,
                         sketch_trace=sketch_trace, residual_samples=samples,
                         num_matvecs=2 * s + g)


class DiagonalResult(NamedTuple):
    """Hutchinson diagonal estimate. A pytree.

    Attributes:
      estimate: (P,) mean over probes of z ⊙ Hz.
      std_error: (P,) its per-entry standard error.
      segment_sums: (num_segments,) the sum of the estimate over each segment
        (e.g. a layer's entries: that layer's block trace); empty without segments.
      segment_sums_std_error: (num_segments,) their standard errors.
    """
    estimate: jax.Array
    std_error: jax.Array
    segment_sums: jax.Array
    segment_sums_std_error: jax.Array


def hutchinson_diagonal(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array,
                        key: jax.Array, num_probes: int, *, segment_ids=None,
                        num_segments: int = 0) -> DiagonalResult:
    """diag(H) ≈ mean over Rademacher probes z of z ⊙ Hz (one matvec per probe).

    Unbiased: E[z_i (Hz)_i] = Σ_j H_ij E[z_i z_j] = H_ii. Entry i's variance per
    probe is Σ_{j≠i} H_ij². With `segment_ids` ((P,) ints in [0, num_segments)),
    also the per-segment sums of the diagonal — with `blocks.layer_segment_ids`,
    each layer's block trace tr(H_ℓℓ) — whose standard errors come from the
    same probes. Probes run one after another, accumulating sums, so memory is
    O(P + num_probes·num_segments).
    """
    v0 = jnp.asarray(v0)
    (P,) = v0.shape
    dtype = v0.dtype
    if num_probes < 1:
        raise ValueError("num_probes must be >= 1.")
    if segment_ids is None:
        segment_ids, num_segments = jnp.zeros((P,), jnp.int32), 0
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    if segment_ids.shape != (P,):
        raise ValueError(f"segment_ids must have shape ({P},); got {segment_ids.shape}.")

    def body(matvec, keys, segment_ids):
        def one(carry, key):
            total, total_sq = carry
            z = _rademacher(key, (P,), dtype)
            sample = z * matvec(z)
            sums = jax.ops.segment_sum(sample, segment_ids, num_segments)
            return (total + sample, total_sq + sample * sample), sums
        zeros = jnp.zeros((P,), dtype)
        return lax.scan(one, (zeros, zeros), keys)

    (total, total_sq), segment_samples = compiled_call(
        body, matvec, v0, jax.random.split(key, num_probes), segment_ids)
    estimate = total / num_probes
    if num_probes > 1:
        variance = jnp.maximum(total_sq - num_probes * estimate ** 2, 0.0) / (num_probes - 1)
        std_error = jnp.sqrt(variance / num_probes)
    else:
        std_error = jnp.full((P,), jnp.inf, dtype)
    sums, sums_error = _mean_and_std_error(segment_samples)
    return DiagonalResult(estimate=estimate, std_error=std_error, segment_sums=sums,
                          segment_sums_std_error=sums_error)


def frobenius_norm_sq(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, key: jax.Array,
                      num_probes: int) -> HutchinsonResult:
    """tr(H²) = ‖H‖_F² ≈ mean over Rademacher probes z of ‖Hz‖² (one matvec each).

    Unbiased for symmetric H: E‖Hz‖² = tr(Hᵀ H E[zzᵀ]) = tr(H²). Its square root
    is the Frobenius norm; tr(H²)/tr(H)² measures how concentrated the spectrum
    is (1 for rank one, 1/P for H ∝ I).
    """
    samples = probe_samples(matvec, v0, key, num_probes,
                            lambda z, hz: jnp.vdot(hz, hz, precision=basis.HIGHEST))
    estimate, std_error = _mean_and_std_error(samples)
    return HutchinsonResult(estimate=estimate, std_error=std_error, samples=samples)
