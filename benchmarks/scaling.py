"""Data-parallel scaling: same results on N devices, and how long each kernel takes.

    python -m benchmarks.scaling                       # CPU: fake devices N = 1, 2, 4, 8
    python -m benchmarks.scaling --platform=gpu        # GPU: absolute times, n = 60000
    python -m benchmarks.scaling --quick               # tiny n: a smoke test

Every device count runs in its own subprocess (on CPU with
XLA_FLAGS=--xla_force_host_platform_device_count=N). Each child, for each
workload (Fashion-MNIST with the MLP 784-512-512-10, and with a CNN), shards
the dataset over its devices and times

  * a full-batch gradient, an HVP and a GN-vector product (median of
    --repeats calls after one compile call),
  * Lanczos for the top k=10 Hessian eigenvalues (--lanczos_iters iterations),
  * a tracked training run through the real runner (GD, tracking every
    --track_every steps): steady-state steps/s from the records' wall times,
    after the second tracked step (both tracker compilations excluded); on by
    default on GPU only (--track_steps);

and saves its results. The parent compares every N with N=1 (relative
error ‖a − b‖∞/‖b‖∞ of the loss, gradient, HVP, GNVP and eigenvalues) and
prints one JSON report. On CPU the fake devices share the same cores, so the
CPU timings show the partitioning overhead, not a speed-up, and the CPU
defaults are small (n=2000, CNN width 8); on GPUs (n=60000, CNN width 32) they
are the absolute numbers to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("loss", "grad", "hvp", "gnvp", "eigenvalues")


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compile, median of `repeats` further calls), in seconds."""
    import jax
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, float(np.median(times))


def _flat64(tree) -> np.ndarray:
    """Every leaf of a (possibly sharded) pytree, on the host, as one float64 vector."""
    import jax

    from lossland import sharding

    leaves = jax.tree_util.tree_leaves(sharding.to_host(tree))
    return np.concatenate([np.ravel(leaf) for leaf in leaves]).astype(np.float64)


def _time_kernels(obj, params, v, v0, full, args, lanczos: bool = True) -> tuple[dict, dict]:
    """Median times of gradient, HVP, GNVP (and Lanczos k=lanczos_k); their results."""
    import jax
    from jax.flatten_util import ravel_pytree

    from lossland import curvature

    entry, out = {}, {}
    first, med = _median_time(lambda: obj.loss_accuracy_grad(params), args.repeats)
    entry["grad_s"], entry["grad_first_call_s"] = med, first
    out["loss"], _, out["grad"] = obj.loss_accuracy_grad(params)
    first, med = _median_time(lambda: obj.hvp(params, v), args.repeats)
    entry["hvp_s"], entry["hvp_first_call_s"] = med, first
    out["hvp"] = obj.hvp(params, v)
    first, med = _median_time(lambda: obj.gnvp(params, v), args.repeats)
    entry["gnvp_s"], entry["gnvp_first_call_s"] = med, first
    out["gnvp"] = obj.gnvp(params, v)
    if not lanczos:
        return entry, out

    def top(params, data, v0):
        _, unravel_p = ravel_pytree(params)
        matvec = lambda u: ravel_pytree(obj.hvp_fn(params, unravel_p(u), data))[0]
        result = curvature.lanczos_top_k(matvec, v0, args.lanczos_k, args.lanczos_iters)
        return result.eigenvalues, result.num_matvecs
    top_k = jax.jit(top)
    first, med = _median_time(lambda: top_k(params, full, v0), max(1, args.repeats // 3))
    eigenvalues, matvecs = top_k(params, full, v0)
    out["eigenvalues"] = eigenvalues
    entry.update(lanczos_s=med, lanczos_first_call_s=first, lanczos_k=args.lanczos_k,
                 lanczos_matvecs=int(matvecs),
                 top_eigenvalues=np.asarray(eigenvalues)[:3].tolist())
    return entry, out


def _child(args) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from lossland import config, data, losses, models, objective, runner, sharding

    runner.set_matmul_precision(args.matmul_precision)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    mesh = sharding.make_mesh(args.num_devices)
    x, y = data.load(args.dataset, args.n, seed=0, data_dir=args.data_dir)
    info = data.dataset_info(args.dataset)
    report = {"num_devices": sharding.mesh_size(mesh), "backend": jax.default_backend(),
              "device_kind": jax.devices()[0].device_kind, "workloads": {}}
    arrays = {}
    for model_name in args.models.split(","):
        width = args.mlp_width if model_name == "mlp" else args.cnn_width
        model = models.build_model(model_name, info.input_shape, info.num_classes, width=width,
                                   depth=2, activation="relu", key=jax.random.key(0),
                                   dtype=dtype)
        flat, unravel = ravel_pytree(model.params)
        rng = np.random.default_rng(1)
        v_host = unravel(jnp.asarray(rng.standard_normal(flat.shape), dtype))
        params = sharding.replicate(model.params, mesh)
        v = sharding.replicate(v_host, mesh)
        v0 = sharding.replicate(np.asarray(rng.standard_normal(flat.shape), dtype), mesh)
        full = sharding.shard_chunked(x, y, args.chunk_size, mesh, dtype=dtype)
        obj = objective.Objective(model.apply, losses.per_example_loss("cross_entropy"), full)
        entry = {"num_params": int(flat.size), "n": args.n, "chunk_size": args.chunk_size}
        out = {}

        timings, out = _time_kernels(obj, params, v, v0, full, args)
        entry.update(timings)
        if args.compare_default_precision:
            # The same kernels in the backend's fast float32 mode (TF32 on NVIDIA
            # Ampere+), timed and compared with the --matmul_precision results.
            with jax.default_matmul_precision(None):
                fast, fast_out = _time_kernels(obj, params, v, v0, full, args, lanczos=False)
            entry["default_precision"] = {
                **{k: fast[k] for k in ("grad_s", "hvp_s", "gnvp_s")},
                "relative_error": {name: _rel_err(_flat64(fast_out[name]), _flat64(out[name]))
                                   for name in fast_out}}

        if args.track_steps:
            with tempfile.TemporaryDirectory() as workdir:
                cfg = config.RunConfig(
                    dataset=args.dataset, data_dir=args.data_dir, n_train=args.n,
                    model=model_name, width=width, depth=2, loss="cross_entropy", lr=0.05,
                    steps=args.track_steps, seed=0,
                    chunk_size=args.chunk_size, dtype=args.dtype, num_devices=args.num_devices,
                    matmul_precision=args.matmul_precision,
                    workdir=workdir, log_every=1, checkpoint_every=0, plots=False,
                    track_every=args.track_every, track_k=args.lanczos_k,
                    lanczos_iters=args.lanczos_iters, overwrite=True)
                try:
                    start = time.perf_counter()
                    result = runner.run(cfg, progress=False)
                    total = time.perf_counter() - start
                    rows = [json.loads(line) for line in
                            (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
                    # Steady state: after the second tracked step (the tracker compiles
                    # twice: cold start, then warm start from the previous eigenvectors).
                    timed = [r for r in rows if "status" not in r
                             and r["step"] >= 2 * args.track_every]
                    span = (timed[-1]["wall_time"] - timed[0]["wall_time"]
                            if len(timed) > 1 else 0.0)
                    entry.update(
                        tracked_run_status=result.status, tracked_run_total_s=total,
                        tracked_steps_per_s=(timed[-1]["step"] - timed[0]["step"]) / span
                        if span > 0 else None, track_every=args.track_every,
                        tracked_steps_timed=timed[-1]["step"] - timed[0]["step"] if timed else 0)
                except Exception as e:  # noqa: BLE001 -- report, do not hide the kernels
                    entry["tracked_run_error"] = f"{type(e).__name__}: {e}"
        report["workloads"][model_name] = entry
        for name, value in out.items():
            arrays[f"{model_name}/{name}"] = _flat64(value)
    np.savez(args.arrays, **arrays)
    return report


def _probe(env) -> dict:
    code = ("import jax, json; print(json.dumps({'backend': jax.default_backend(), "
            "'devices': [str(d) for d in jax.devices()], "
            "'device_kind': jax.devices()[0].device_kind}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"cannot start JAX:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--platform", default="cpu", choices=("cpu", "gpu", "auto"),
                        help="cpu: fake devices per --devices; gpu/auto: the real devices")
    parser.add_argument("--devices", default=None,
                        help="device counts (CPU default 1,2,4,8; GPU default 1 and all)")
    parser.add_argument("--n", type=int, default=None,
                        help="examples (default: 60000 on GPU, 2000 on CPU)")
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--mlp_width", type=int, default=512)
    parser.add_argument("--cnn_width", type=int, default=None,
                        help="CNN channels (default: 32 on GPU, 8 on CPU)")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data_dir", default=None,
                        help="folder with the dataset files (default: the loader's own)")
    parser.add_argument("--chunk_size", type=int, default=None,
                        help="default: 4096 on GPU, 1000 on CPU")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--matmul_precision", default="highest",
                        choices=("highest", "default"),  # config.MATMUL_PRECISIONS
                        help="float32 matrix products: full (highest, the driver's default) "
                        "or the backend's fast mode (default: TF32 on NVIDIA Ampere+)")
    parser.add_argument("--compare_default_precision", default=None,
                        action=argparse.BooleanOptionalAction,
                        help="also time the kernels at the backend's default precision and "
                        "report their error (default: on for GPUs, off on CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lanczos_k", type=int, default=10)
    parser.add_argument("--lanczos_iters", type=int, default=None,
                        help="default: 40 on GPU, 20 on CPU")
    parser.add_argument("--track_steps", type=int, default=None,
                        help="steps of the tracked run (0 = skip; default 60 on GPU, 0 on "
                        "CPU); steps/s is timed after the second tracked step")
    parser.add_argument("--track_every", type=int, default=None,
                        help="default: 10 on GPU, 2 on CPU")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (n=512, widths 32/8, devices 1,2,3), for a smoke test")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num_devices", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--arrays", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _defaults(args, gpu: bool):
    if args.quick:
        args.n = args.n or 512
        args.mlp_width, args.cnn_width = 32, 8
        args.devices = args.devices or ("1" if gpu else "1,2,3")
        args.repeats = min(args.repeats, 2)
        args.lanczos_iters = args.lanczos_iters or 12
        args.track_steps = 7 if args.track_steps is None else args.track_steps
        args.track_every = args.track_every or 2
    args.n = args.n or (60000 if gpu else 2000)
    args.cnn_width = args.cnn_width or (32 if gpu else 8)
    args.chunk_size = args.chunk_size or (4096 if gpu else 1000)
    args.lanczos_iters = args.lanczos_iters or (40 if gpu else 20)
    args.track_steps = (60 if gpu else 0) if args.track_steps is None else args.track_steps
    args.track_every = args.track_every or (10 if gpu else 2)
    if args.compare_default_precision is None:
        args.compare_default_precision = gpu and args.matmul_precision != "default"
    return args


def _rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return {}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # children run one at a time
    if args.platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    probe = _probe(env)
    gpu = probe["backend"] != "cpu"
    args = _defaults(args, gpu)
    if args.devices:
        counts = [int(c) for c in args.devices.split(",")]
    else:
        counts = [1, 2, 4, 8] if not gpu else sorted({1, len(probe["devices"])})
    common = [f"--n={args.n}", f"--models={args.models}", f"--mlp_width={args.mlp_width}",
              f"--cnn_width={args.cnn_width}", f"--dataset={args.dataset}",
              *([f"--data_dir={args.data_dir}"] if args.data_dir else []),
              f"--chunk_size={args.chunk_size}", f"--dtype={args.dtype}",
              f"--repeats={args.repeats}", f"--lanczos_k={args.lanczos_k}",
              f"--lanczos_iters={args.lanczos_iters}", f"--track_steps={args.track_steps}",
              f"--track_every={args.track_every}", f"--matmul_precision={args.matmul_precision}",
              "--compare_default_precision" if args.compare_default_precision
              else "--no-compare_default_precision"]
    runs, arrays = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            child_env = dict(env)
            if not gpu:
                child_env["XLA_FLAGS"] = " ".join(filter(None, [
                    env.get("XLA_FLAGS", ""),
                    f"--xla_force_host_platform_device_count={count}"]))
            path = Path(tmp) / f"{count}.npz"
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--child",
                                   f"--num_devices={count}", f"--arrays={path}", *common],
                                  cwd=REPO, env=child_env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{count} device(s) failed:\n{proc.stderr[-4000:]}")
            runs[count] = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[count]["process_s"] = time.perf_counter() - start
            arrays[count] = dict(np.load(path))
    reference = counts[0]
    agreement = {}
    for count in counts[1:]:
        agreement[str(count)] = {
            key: _rel_err(arrays[count][key], arrays[reference][key])
            for key in arrays[reference] if key in arrays[count]}
    tolerance = 1e-5 if args.dtype == "float32" else 1e-10
    worst = {key: max(errors[key] for errors in agreement.values())
             for key in next(iter(agreement.values()), {})} if agreement else {}
    eig_keys = [k for k in worst if k.endswith("/eigenvalues")]
    report = {
        "benchmark": "scaling", "platform": probe["backend"], "device_kind": probe["device_kind"],
        "dataset": args.dataset, "n": args.n, "dtype": args.dtype,
        "settings": {k: getattr(args, k) for k in (
            "chunk_size", "mlp_width", "cnn_width", "repeats", "lanczos_k", "lanczos_iters",
            "track_steps", "track_every", "matmul_precision", "compare_default_precision")},
        "runs": {str(c): runs[c] for c in counts},
        "relative_error_vs_%d_device" % reference: agreement,
        "max_relative_error": worst,
        # Kernels must agree to float tolerance; Lanczos Ritz values inherit the
        # kernels' rounding through a Krylov recursion, so they get 10x slack.
        "results_match": bool(all(err <= (10 * tolerance if key in eig_keys else tolerance)
                                  for key, err in worst.items())),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
