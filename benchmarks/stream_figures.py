"""The stream tracker's figures for benchmarks/tracking.py (issue 24).

For each k in --stream_ks, on one GD trajectory of the tracking benchmark's
workload at --stream_lr (default 1/λ1(θ_0): λ1·lr/2 starts at 0.5 and
progressive sharpening takes it to the edge of stability, λ1·lr/2 ≈ 1, within
about 15 steps on the --quick workload; at 1.9/λ1(θ_0) the run catapults,
λ1·lr/2 up to 1.9):

  stream_step_ratio       median wall time of the fused, stream-tracked GD step
                          (`streaming.make_fused_step`, b = config default for k,
                          m = streaming.default_refresh) over the median of the
                          untracked step (`train.make_train_step`), both timed at
                          every θ_t of the same run, in this process;
  stream_eig_rel_err      median over steps ≥ --stream_burn_in (every
                          --stream_ref_every-th step) of max_i |θ_i − λ_i|/|λ_i|,
                          λ from a converged Lanczos (tol 1e-5, warm from the
                          previous reference) at the same θ;
  stream_eig_rel_err_max  the maximum of the same.

Each dict is keyed "1", "10", ...; `stream_details` holds b, m, the steps, the
largest λ1·lr/2 of the trajectory and the lr, and `products_ratio`: the median time of
the gradient with H times m tangents alone (`loss_accuracy_grad_block_hvp_fn`, timed
at the same θ_t) over the untracked step's, the floor under `stream_step_ratio`.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from lossland import config as config_lib, curvature, streaming
from lossland import train as train_lib
from lossland.objective import flat_matvec


def _reference(obj, k):
    def top(params, data, v0, init):
        return curvature.lanczos_top_k(flat_matvec(obj.hvp_fn, params, data), v0, k, 120,
                                       tol=1e-5, init_vectors=init)
    return jax.jit(top)


def step_curvature_agreement(lambda1, chi_1, secant, *, aligned: float = 0.9) -> dict:
    """How the free step curvature c_t (along θ_{t−1} → θ_t, `streaming.step_curvature`)
    compares with λ1 where the step is along v1: over the steps whose previous gradient
    had χ_1 ≥ `aligned`, the median and range of c_t / λ̄1, λ̄1 the mean of the stream's λ1
    at the segment's two ends."""
    ratios = [c / (0.5 * (lambda1[t - 1] + lambda1[t])) for t, c in enumerate(secant)
              if t and chi_1[t - 1] >= aligned and np.isfinite(c)]
    return {"step_curvature_steps_aligned": len(ratios),
            "step_curvature_over_lambda1_median": float(np.median(ratios)) if ratios else None,
            "step_curvature_over_lambda1_range": ([float(np.min(ratios)), float(np.max(ratios))]
                                                  if ratios else None)}


def stream_figures(obj, params, args, lambda1_at_start: float, log) -> dict:
    lr = args.stream_lr or 1.0 / lambda1_at_start
    optimizer = optax.sgd(lr)
    plain = train_lib.make_train_step(obj, optimizer)
    out = {"stream_step_ratio": {}, "stream_eig_rel_err": {}, "stream_eig_rel_err_max": {},
           "stream_details": {}}
    for k in (int(v) for v in args.stream_ks.split(",") if v):
        cfg = config_lib.RunConfig(tracker="stream", track_k=k, track_every=1)
        b = config_lib.block_size(cfg)
        m = config_lib.stream_refresh(cfg)
        fused = streaming.make_fused_step(obj, optimizer, k=k, refresh=m, lr=lr)
        start = streaming.make_stream_start(obj, block_size=b, num_iters=80, tol=1e-3)
        reference = _reference(obj, k)
        p, s = params, optimizer.init(params)
        stream = start(p, obj.data, jax.random.key(args.seed))
        P = ravel_pytree(p)[0].shape[0]
        v0 = jax.random.normal(jax.random.key(args.seed + 1), (P,), jnp.float32)
        ref_vectors = jnp.zeros((k, P), jnp.float32)
        displacement = jnp.zeros((P,), jnp.float32)
        # The floor: the gradient and H times m tangents, nothing else (no optimizer, no
        # Rayleigh–Ritz): what the tracker adds is the fused step's time beyond it.
        _, unravel = ravel_pytree(p)
        tangents = jax.vmap(unravel)(jax.random.normal(jax.random.key(args.seed + 2), (m, P),
                                                       jnp.float32))
        products = jax.jit(obj.loss_accuracy_grad_block_hvp_fn)
        jax.block_until_ready(fused(p, s, obj.data, stream, displacement))   # compile all
        jax.block_until_ready(plain(p, s, obj.data))
        jax.block_until_ready(products(p, tangents, obj.data))
        fused_s, plain_s, products_s, errors, ratio_max = [], [], [], [], 0.0
        lambda1, chi_1, secant = [], [], []
        for t in range(args.stream_steps):
            t0 = time.perf_counter()
            jax.block_until_ready(plain(p, s, obj.data))
            plain_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(products(p, tangents, obj.data))
            products_s.append(time.perf_counter() - t0)
            theta_t = p
            t0 = time.perf_counter()
            p, s, _, row, _, stream = fused(p, s, obj.data, stream, displacement)
            jax.block_until_ready(row)
            fused_s.append(time.perf_counter() - t0)
            displacement = ravel_pytree(p)[0] - ravel_pytree(theta_t)[0]
            theta = np.asarray(row["eigenvalues"], np.float64)
            lambda1.append(float(theta[0]))
            chi_1.append(float(row["chi_1"]))
            secant.append(float(row["step_curvature"]))
            ratio_max = max(ratio_max, float(theta[0]) * lr / 2)
            if t >= args.stream_burn_in and (t - args.stream_burn_in) % args.stream_ref_every == 0:
                ref = reference(theta_t, obj.data, v0, ref_vectors)
                ref_vectors = ref.eigenvectors
                lam = np.asarray(ref.eigenvalues, np.float64)
                errors.append(float(np.max(np.abs(theta - lam) / np.abs(lam))))
        key = str(k)
        out["stream_step_ratio"][key] = float(np.median(fused_s) / np.median(plain_s))
        out["stream_eig_rel_err"][key] = float(np.median(errors)) if errors else None
        out["stream_eig_rel_err_max"][key] = float(np.max(errors)) if errors else None
        out["stream_details"][key] = {
            "block_size": b, "refresh": m, "lr": lr, "steps": args.stream_steps,
            "burn_in": args.stream_burn_in, "ref_every": args.stream_ref_every,
            "num_references": len(errors), "max_stability_ratio": ratio_max,
            **step_curvature_agreement(lambda1, chi_1, secant),
            "fused_step_seconds": float(np.median(fused_s)),
            "products_seconds": float(np.median(products_s)),
            "products_ratio": float(np.median(products_s) / np.median(plain_s)),
            "untracked_step_seconds": float(np.median(plain_s))}
        log("stream", key, out["stream_step_ratio"][key], out["stream_eig_rel_err"][key],
            out["stream_eig_rel_err_max"][key], out["stream_details"][key])
    return out
