"""Benchmark of curvature tracking along a GD trajectory: Lanczos against block products.

    .venv/bin/python -m benchmarks.tracking                       # n=5000, 200 steps
    .venv/bin/python -m benchmarks.tracking --quick               # n=1000, width 128, 10 steps
    .venv/bin/python -m benchmarks.tracking --steps=30 --out=runs/bench/tracking30.json

Workload: Fashion-MNIST (a Gaussian mixture in 784 dimensions of the same shape when
the files are absent), MLP 784-512-512-10 ReLU (--width), cross-entropy, float32, full-batch GD
at --lr. The trajectory θ_0 … θ_T is computed once, and every contender tracks the
same points with k = --k at tol = --tol, each warm from its own previous answer:

  lanczos_cold   lanczos_top_k from a fresh random vector at every step
  lanczos_warm   lanczos_top_k warm-started from the previous eigenvectors
  block          block_top_k (block Davidson on block HVPs of b = --block_size vectors),
                 warm-started from the previous eigenvectors plus b − k random rows
  eigsh          scipy ARPACK eigsh(which="LA") on the jitted single HVP, v0 = previous v1
  lobpcg         jax.experimental.sparse.linalg.lobpcg_standard on the block HVP,
                 warm from the previous eigenvectors (fixed --lobpcg_iters iterations)

Keys (all measured in this one process; ratios are of medians):
  hvp_seconds, block_hvp_seconds (b = k), block_hvp_ratio, grad_seconds,
  untracked_step_seconds; per contender: hvp_seconds_at_run and
  untracked_step_seconds_at_run (retimed just before its tracked run, since the load on a
  shared machine drifts), tracked_step_seconds (that untracked step plus the median
  solve), hvp_equivalents_per_tracked_step (median solve seconds / hvp_seconds_at_run),
  matvecs_per_tracked_step (vectors multiplied by H, median), cold_k10_tol1e-3_seconds
  (a cold solve at θ_0, tol 1e-3), eig_max_rel_err (that cold solve's top-k against a
  float64 Lanczos reference at tol 1e-6); tracked_every_step_ratio (best contender's
  tracked / untracked) and targets (issue 13's, each true or false).
  stream_step_ratio, stream_eig_rel_err, stream_eig_rel_err_max, stream_details: the stream
  tracker's figures at k in --stream_ks on its own GD trajectory into the edge of stability
  (benchmarks/stream_figures.py); targets gain issue 24's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from benchmarks.stream_figures import stream_figures
from lossland import curvature, data, losses, models, objective

CONTENDERS = ("lanczos_cold", "lanczos_warm", "block", "eigsh", "lobpcg")


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="n=1000, 10 steps, hidden width 128 "
                   "(a CPU smoke run of the harness; its figures are not the workload's).")
    p.add_argument("--n", type=int, default=5000, help="Training examples.")
    p.add_argument("--steps", type=int, default=200, help="Tracked GD steps (track_every=1).")
    p.add_argument("--width", type=int, default=512, help="Hidden width of the 2-layer MLP.")
    p.add_argument("--k", type=int, default=10, help="Eigenpairs tracked.")
    p.add_argument("--tol", type=float, default=1e-2, help="Tracking tolerance (Ritz rule).")
    p.add_argument("--block_size", type=int, default=12, help="b for the block solver (>= k).")
    p.add_argument("--lr", type=float, default=0.05, help="GD learning rate.")
    p.add_argument("--lobpcg_iters", type=int, default=4, help="LOBPCG iterations per step.")
    p.add_argument("--chunk_size", type=int, default=1000)
    p.add_argument("--data_dir", default=None, help="Fashion-MNIST files (default: the "
                   "Debian package's folder).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--out", default="runs/bench/tracking.json", help="JSON output path.")
    p.add_argument("--stream_ks", default="1,10", help="k values of the stream tracker's "
                   "figures (benchmarks/stream_figures.py); empty = skip.")
    p.add_argument("--stream_steps", type=int, default=300, help="GD steps of the stream run.")
    p.add_argument("--stream_burn_in", type=int, default=50)
    p.add_argument("--stream_ref_every", type=int, default=5, help="Reference Lanczos every "
                   "this many steps after the burn-in.")
    p.add_argument("--stream_lr", type=float, default=0.0, help="lr of the stream run "
                   "(0 = 1/λ1(θ_0): the run reaches the edge of stability).")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.steps, args.width = 1000, 10, 128
        args.stream_steps, args.stream_ref_every = 120, 5
    for name in ("n", "steps", "width", "k", "block_size", "lobpcg_iters", "chunk_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name}={getattr(args, name)} must be > 0")
    if args.block_size < args.k:
        p.error(f"--block_size={args.block_size} must be >= --k={args.k}")
    unknown = set(args.contenders.split(",")) - set(CONTENDERS)
    if unknown:
        p.error(f"--contenders: unknown {sorted(unknown)}; choose from {list(CONTENDERS)}")
    return args


def median_seconds(fn, *args, reps=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def build(args, dtype=jnp.float32):
    """The workload's data, model and objective, and the dataset actually used."""
    try:
        x, y = data.load("fashion_mnist", args.n, args.seed, data_dir=args.data_dir)
        x = x.reshape(x.shape[0], -1)
        dataset = "fashion_mnist"
    except Exception as error:        # absent files: a stand-in of the same shape
        log(f"fashion_mnist unavailable ({str(error)[:80]}…); using gaussian_mixture 784-d")
        x, y = data.load("gaussian_mixture", args.n, args.seed, input_dim=784)
        dataset = "gaussian_mixture_784"
    model = models.build_model("mlp", (784,), 10, width=args.width, depth=2, activation="relu",
                               key=jax.random.key(args.seed))
    params = jax.tree_util.tree_map(lambda p: p.astype(dtype), model.params)
    obj = objective.Objective(model.apply, losses.per_example_loss("cross_entropy"),
                              objective.chunk_data(x, y, args.chunk_size, dtype=dtype))
    return dataset, params, obj


class Kernels:
    """Jitted flat products and solvers over one objective; params are jit arguments."""

    def __init__(self, obj, params, args):
        self.unravel = ravel_pytree(params)[1]
        k, b, tol = args.k, args.block_size, args.tol
        hvp = lambda theta, v: ravel_pytree(obj.hvp_fn(self.unravel(theta), self.unravel(v),
                                                       obj.data))[0]
        block = lambda theta, V: objective.flat_block_matvec(
            obj.block_hvp_fn, self.unravel(theta), obj.data)(V)
        self.hvp = jax.jit(hvp)
        self.block_hvp = jax.jit(block)
        self.grad = jax.jit(lambda theta: ravel_pytree(obj.loss_accuracy_grad_fn(
            self.unravel(theta), obj.data)[2])[0])
        self.step = jax.jit(lambda theta: theta - args.lr * self.grad(theta))

        def lanczos(theta, v0, init, tol=tol, num_iters=80):
            return curvature.lanczos_top_k(lambda v: hvp(theta, v), v0, k, num_iters, tol=tol,
                                           init_vectors=init)
        self.lanczos = jax.jit(lanczos, static_argnames=("tol", "num_iters"))

        def block_solve(theta, start, tol=tol, num_blocks=-(-80 // b)):
            return curvature.block_top_k(lambda V: block(theta, V), start, k, num_blocks,
                                         tol=tol)
        self.block_solve = jax.jit(block_solve, static_argnames=("tol", "num_blocks"))

        def lobpcg(theta, X, m, tol):
            from jax.experimental.sparse.linalg import lobpcg_standard
            matmat = lambda X_cols: block(theta, X_cols.T).T
            # lobpcg_standard stops when ‖Av − λv‖ < tol·10·P·(λ + ‖Av‖) ≈ tol·20·P·λ;
            # dividing by 20·P gives lanczos_top_k's rule ‖Av − λv‖ ≤ tol·|λ|.
            P = X.shape[1]
            theta_values, U, iters = lobpcg_standard(matmat, X.T, m=m, tol=tol / (20 * P))
            return theta_values, U.T, iters
        self.lobpcg = jax.jit(lobpcg, static_argnames=("m", "tol"))


def eigsh_solve(kern, theta, v0, k, tol):
    count = [0]

    def matvec(x):
        count[0] += 1
        return np.asarray(kern.hvp(theta, jnp.asarray(np.ravel(x), jnp.float32)))

    P = theta.shape[0]
    op = LinearOperator((P, P), matvec=matvec, dtype=np.float32)
    try:
        w, U = eigsh(op, k=k, which="LA", tol=tol, v0=np.asarray(v0, np.float32), maxiter=200)
    except ArpackNoConvergence as error:
        w, U = error.eigenvalues, error.eigenvectors
    order = np.argsort(w)[::-1]
    return np.asarray(w)[order], np.asarray(U)[:, order].T, count[0]


def solve(name, kern, theta, state, args, key, tol):
    """One solve: (eigenvalues, eigenvectors, matvecs); `state` is the last vectors.

    A cold solve (state None) gets the budget to converge: 80 Lanczos steps,
    ⌈240/b⌉ blocks, 100 LOBPCG iterations. A warm one is a tracked step:
    ⌈80/b⌉ blocks, --lobpcg_iters LOBPCG iterations.
    """
    P = theta.shape[0]
    v0 = jax.random.normal(key, (P,), theta.dtype)
    rows = jax.random.normal(key, (args.block_size, P), theta.dtype)
    warm = state is not None
    if name in ("lanczos_cold", "lanczos_warm"):
        init = state if (warm and name == "lanczos_warm") else jnp.zeros((args.k, P), theta.dtype)
        r = kern.lanczos(theta, v0, init, tol=tol)
        return r.eigenvalues, r.eigenvectors, int(r.num_matvecs)
    if name == "block":
        start = rows.at[:args.k].set(state) if warm else rows
        r = kern.block_solve(theta, start, tol=tol,
                             num_blocks=-(-(80 if warm else 240) // args.block_size))
        return r.eigenvalues, r.eigenvectors, int(r.num_matvecs)
    if name == "eigsh":
        w, U, count = eigsh_solve(kern, theta, state[0] if warm else v0, args.k, tol)
        return jnp.asarray(w), jnp.asarray(U), count
    if name == "lobpcg":
        X = state if warm else rows[:args.k]
        w, U, iters = kern.lobpcg(theta, X, args.lobpcg_iters if warm else 100, tol)
        return w, U, int(iters) * args.k
    raise ValueError(name)


def reference_top_k(obj, params, args):
    """float64 Lanczos at tol 1e-6 at θ_0: the accuracy reference."""
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
        theta, unravel = ravel_pytree(p64)
        data64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64)
                                        if a.dtype == jnp.float32 else a, obj.data)
        def top(p64, data64, v0):      # params and data as arguments: no constant folding
            hvp = lambda v: ravel_pytree(obj.hvp_fn(p64, unravel(v), data64))[0]
            return curvature.lanczos_top_k(hvp, v0, args.k, 200, tol=1e-6)
        v0 = jax.random.normal(jax.random.key(123), theta.shape, jnp.float64)
        r = jax.jit(top)(p64, data64, v0)
        return np.asarray(r.eigenvalues, np.float64), float(jnp.max(r.residuals
                                                                   / jnp.abs(r.eigenvalues)))


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    dataset, params, obj = build(args)
    theta0, _ = ravel_pytree(params)
    P = int(theta0.shape[0])
    kern = Kernels(obj, params, args)
    log(f"workload {dataset} n={args.n} P={P}; timing kernels")
    key = jax.random.key(args.seed)
    V = jax.random.normal(key, (args.k, P), jnp.float32)
    out = {"workload": {"dataset": dataset, "n": args.n, "width": args.width, "params": P,
                        "k": args.k, "tol": args.tol, "block_size": args.block_size, "steps": args.steps,
                        "lr": args.lr, "backend": jax.default_backend(),
                        "load_before": os.getloadavg()[0]}}
    out["grad_seconds"] = median_seconds(kern.grad, theta0)
    out["untracked_step_seconds"] = median_seconds(kern.step, theta0)
    out["hvp_seconds"] = median_seconds(kern.hvp, theta0, V[0])
    out["block_hvp_seconds"] = median_seconds(kern.block_hvp, theta0, V)
    out["block_hvp_ratio"] = out["block_hvp_seconds"] / out["hvp_seconds"]
    out["hvp_grad_ratio"] = out["hvp_seconds"] / out["grad_seconds"]
    log(json.dumps({k: out[k] for k in ("hvp_seconds", "block_hvp_seconds", "block_hvp_ratio")}))

    reference, ref_residual = reference_top_k(obj, params, args)
    out["reference"] = {"eigenvalues": reference.tolist(), "max_rel_residual": ref_residual}

    trajectory = [theta0]
    for _ in range(args.steps - 1):
        trajectory.append(kern.step(trajectory[-1]))
    names = args.contenders.split(",")
    per = {name: {} for name in names}
    for name in names:
        cold_key = jax.random.fold_in(key, 7)
        try:
            solve(name, kern, theta0, None, args, cold_key, 1e-3)    # compile / warm up
            start = time.perf_counter()
            w, _, count = solve(name, kern, theta0, None, args, cold_key, 1e-3)
            jax.block_until_ready(w)
            per[name]["cold_k10_tol1e-3_seconds"] = time.perf_counter() - start
            per[name]["cold_k10_tol1e-3_matvecs"] = count
            per[name]["eig_max_rel_err"] = float(np.max(np.abs(np.asarray(w, np.float64)
                                                               - reference) / np.abs(reference)))
            state, seconds, matvecs = None, [], []
            solve(name, kern, theta0, None, args, cold_key, args.tol)     # compile at tracking tol
            # This machine's load drifts over a run, so each contender's HVP-equivalents and
            # step ratio use one HVP and one GD step timed just before its own tracked run.
            hvp_here = median_seconds(kern.hvp, theta0, V[0])
            step_here = median_seconds(kern.step, theta0)
            for step, theta in enumerate(trajectory):
                start = time.perf_counter()
                w, state, count = solve(name, kern, theta, state, args,
                                        jax.random.fold_in(key, step), args.tol)
                jax.block_until_ready(state)
                seconds.append(time.perf_counter() - start)
                matvecs.append(count)
            # The first tracked step is cold for every contender; medians are over the rest.
            steady = slice(1, None) if len(seconds) > 1 else slice(None)
            solve_s = float(np.median(seconds[steady]))
            per[name].update(
                hvp_seconds_at_run=hvp_here, untracked_step_seconds_at_run=step_here,
                tracked_step_seconds=step_here + solve_s,
                tracked_every_step_ratio=(step_here + solve_s) / step_here,
                solve_seconds_median=solve_s,
                hvp_equivalents_per_tracked_step=solve_s / hvp_here,
                matvecs_per_tracked_step=float(np.median(matvecs[steady])),
                final_top_eigenvalue=float(w[0]))
        except Exception as error:     # a contender that fails is reported, not fatal
            per[name]["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        log(name, json.dumps(per[name]))
    out["contenders"] = per
    out.update(stream_figures(obj, params, args, float(reference[0]), log))
    ok = {n: r for n, r in per.items() if "tracked_step_seconds" in r}
    best = min(ok, key=lambda n: ok[n]["tracked_step_seconds"]) if ok else None
    for key_name in ("tracked_step_seconds", "hvp_equivalents_per_tracked_step",
                     "matvecs_per_tracked_step", "cold_k10_tol1e-3_seconds", "eig_max_rel_err"):
        out[key_name] = {n: r.get(key_name) for n, r in per.items()}
    out["best_contender"] = best
    out["tracked_every_step_ratio"] = ok[best]["tracked_every_step_ratio"] if best else None
    out["targets"] = {
        "block_hvp_ratio<=4": out["block_hvp_ratio"] <= 4,
        "warm_hvp_equivalents<=15": bool(best) and min(
            r["hvp_equivalents_per_tracked_step"] for r in ok.values()) <= 15,
        "tracked_every_step_ratio<=3": bool(best) and out["tracked_every_step_ratio"] <= 3,
        "cold_k10_under_10s": any((r.get("cold_k10_tol1e-3_seconds") or 1e9) < 10
                                  for r in per.values()),
        "every_eig_max_rel_err<=1e-3": all((r.get("eig_max_rel_err") or 1.0) <= 1e-3
                                           for r in per.values()),
    }
    figure = lambda name, k: out[name].get(k) if out[name].get(k) is not None else float("inf")
    if "1" in out["stream_step_ratio"]:
        out["targets"].update({
            "stream_step_ratio[1]<=2": figure("stream_step_ratio", "1") <= 2.0,
            "stream_eig_rel_err[1]<=2e-3": figure("stream_eig_rel_err", "1") <= 2e-3,
            "stream_eig_rel_err_max[1]<=2e-2": figure("stream_eig_rel_err_max", "1") <= 2e-2})
    if "10" in out["stream_step_ratio"]:
        out["targets"].update({
            "stream_step_ratio[10]<=12": figure("stream_step_ratio", "10") <= 12.0,
            "stream_eig_rel_err[10]<=2e-2": figure("stream_eig_rel_err", "10") <= 2e-2})
    out["workload"]["load_after"] = os.getloadavg()[0]
    out["wall_seconds"] = time.time() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
