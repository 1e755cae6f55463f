"""Peak memory of a full-batch gradient and of an HVP as n grows: bounded in n?

    python -m benchmarks.memory                      # n = 5000, 20000, 60000 (Fashion-MNIST)
    python -m benchmarks.memory --n=500,1000 --width=64 --chunk_size=256   # quick

Every (n, kernel) is measured in a fresh subprocess, which

  1. imports JAX, builds the model (MLP 784-512-512-10) and loads the first n
     Fashion-MNIST examples into host memory;
  2. resets the kernel's peak-RSS counter (`/proc/self/clear_refs`, "5") and
     reads the *baseline* RSS: the host dataset is part of the baseline;
  3. places the dataset on the device (`sharding.shard_chunked`, fixed chunk
     size) and records the peak of that phase (`placement_peak_bytes`);
  4. resets the peak again, runs the jitted kernel (compile + one call) and
     records its peak (`kernel_peak_bytes`).

All peaks are reported relative to the baseline, so they hold the device copy
of the dataset (one copy, `device_dataset_bytes`, padding included) plus
whatever the kernel needs. The full-batch reducer scans fixed-size chunks, so
the kernel's own working memory must not grow with n:

    kernel_peak(n_max) − kernel_peak(n_min) ≤ 1.1 · (device_dataset_bytes(n_max) −
                                                     device_dataset_bytes(n_min))

is the target (`checks` in the JSON). A kernel that materialized per-example
activations for all n, or copied the dataset inside jit, fails it by far.
On CPU "device" memory is host RSS; on a GPU the device's own
`peak_bytes_in_use` is reported as well (not resettable, so it is the peak of
the whole child process). `ru_maxrss` is reported raw as a cross-check (it is
reset by clear_refs as well).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("grad", "hvp")


def _proc_status() -> dict:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values


def _reset_peak() -> bool:
    """Resets the peak-RSS counter (Linux ≥ 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(args) -> dict:
    """One measurement; runs in its own process."""
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from lossland import data, losses, models, objective, sharding

    dtype = jnp.float64 if args.dtype == "float64" else jnp.float32
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    info = data.dataset_info(args.dataset)
    model = models.build_model(args.model, info.input_shape, info.num_classes, width=args.width,
                               depth=args.depth, activation="relu", key=jax.random.key(0),
                               dtype=dtype)
    flat, unravel = ravel_pytree(model.params)
    v = unravel(jax.random.normal(jax.random.key(1), flat.shape, flat.dtype))
    jax.block_until_ready(v)
    x, y = data.load(args.dataset, args.n, seed=0, data_dir=args.data_dir)
    gc.collect()

    resettable = _reset_peak()
    baseline = _proc_status()["VmRSS"]

    start = time.perf_counter()
    if args.placement == "shard_chunked":
        chunked = sharding.shard_chunked(x, y, args.chunk_size, None, dtype=dtype)
    else:  # the two-step path: pad on the host, then one device copy
        chunked = sharding.shard_data(objective.chunk_data(x, y, args.chunk_size, dtype=dtype),
                                      None)
    jax.block_until_ready((chunked.x, chunked.y, chunked.mask))
    placement = _proc_status()
    placement_seconds = time.perf_counter() - start
    device = jax.devices()[0]
    placement_device = device.memory_stats() if hasattr(device, "memory_stats") else None

    _reset_peak()
    obj = objective.Objective(model.apply, losses.per_example_loss(args.loss), chunked)
    start = time.perf_counter()
    if args.kernel == "grad":
        out = obj.loss_accuracy_grad(model.params)
    else:
        out = obj.hvp(model.params, v)
    jax.block_until_ready(out)
    kernel_seconds = time.perf_counter() - start
    after = _proc_status()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None

    # XLA's own buffer assignment for the kernel: its scratch ("temp") bytes must
    # not grow with n (only the dataset argument does).
    pure = obj.loss_accuracy_grad_fn if args.kernel == "grad" else obj.hvp_fn
    kernel_args = (model.params, chunked) if args.kernel == "grad" else (model.params, v, chunked)
    analysis = jax.jit(pure).lower(*kernel_args).compile().memory_analysis()
    device_dataset = sum(a.size * a.dtype.itemsize for a in (chunked.x, chunked.y, chunked.mask))
    result = {
        "n": args.n, "kernel": args.kernel, "chunk_size": args.chunk_size,
        "num_chunks": chunked.num_chunks, "padded_n": chunked.num_chunks * chunked.chunk_size,
        "host_dataset_bytes": int(x.nbytes + y.nbytes),
        "device_dataset_bytes": int(device_dataset),
        "baseline_rss_bytes": baseline,
        "placement_peak_bytes": placement["VmHWM"] - baseline,
        "kernel_peak_bytes": after["VmHWM"] - baseline,
        "rss_after_kernel_bytes": after["VmRSS"] - baseline,
        "raw_peak_rss_bytes": after["VmHWM"], "raw_ru_maxrss_bytes": maxrss,
        "peak_resettable": resettable,
        "placement_seconds": placement_seconds, "kernel_seconds_incl_compile": kernel_seconds,
        "backend": jax.default_backend(),
        "finite": bool(all(np.isfinite(np.asarray(leaf)).all()
                           for leaf in jax.tree_util.tree_leaves(out))),
    }
    if analysis is not None:
        result["compiled_temp_bytes"] = int(analysis.temp_size_in_bytes)
        result["compiled_argument_bytes"] = int(analysis.argument_size_in_bytes)
    if stats and "peak_bytes_in_use" in stats:
        result["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    if placement_device and "peak_bytes_in_use" in placement_device:
        result["device_peak_bytes_after_placement"] = int(placement_device["peak_bytes_in_use"])
        result["device_bytes_in_use_after_placement"] = int(placement_device["bytes_in_use"])
    return result


def _checks(results: list[dict]) -> list[dict]:
    checks = []
    for kernel in sorted({r["kernel"] for r in results}):
        rows = sorted((r for r in results if r["kernel"] == kernel), key=lambda r: r["n"])
        if len(rows) < 2:
            continue
        small, large = rows[0], rows[-1]
        extra_data = large["device_dataset_bytes"] - small["device_dataset_bytes"]
        extra_peak = large["kernel_peak_bytes"] - small["kernel_peak_bytes"]
        extra_total = (max(large["kernel_peak_bytes"], large["placement_peak_bytes"])
                       - max(small["kernel_peak_bytes"], small["placement_peak_bytes"]))
        checks.append({
            "kernel": kernel, "n_small": small["n"], "n_large": large["n"],
            "extra_dataset_bytes": extra_data,
            "extra_host_dataset_bytes": large["host_dataset_bytes"] - small["host_dataset_bytes"],
            "extra_kernel_peak_bytes": extra_peak,
            "extra_peak_incl_placement_bytes": extra_total,
            "ratio": extra_peak / extra_data if extra_data else None,
            "ratio_incl_placement": extra_total / extra_data if extra_data else None,
            "within_10_percent": bool(extra_peak <= 1.1 * extra_data),
            "within_10_percent_incl_placement": bool(extra_total <= 1.1 * extra_data),
        })
        if all("compiled_temp_bytes" in r for r in (small, large)):
            checks[-1]["extra_compiled_temp_bytes"] = (large["compiled_temp_bytes"]
                                                       - small["compiled_temp_bytes"])
        if all("device_peak_bytes_in_use" in r for r in (small, large)):
            # On an accelerator the dataset and the kernel live in device memory:
            # the same check on the device allocator's peak (host RSS stays flat there).
            extra_device = (large["device_peak_bytes_in_use"]
                            - small["device_peak_bytes_in_use"])
            checks[-1].update(
                extra_device_peak_bytes=extra_device,
                device_ratio=extra_device / extra_data if extra_data else None,
                device_within_10_percent=bool(extra_device <= 1.1 * extra_data))
    return checks


def _parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="5000,20000,60000", help="comma-separated n values")
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data_dir", default=None,
                        help="folder with the dataset files (default: the loader's own)")
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--loss", default="cross_entropy")
    parser.add_argument("--chunk_size", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--placement", default="shard_chunked",
                        choices=("shard_chunked", "chunk_data"),
                        help="how the dataset reaches the device (sharding.shard_chunked, or "
                        "objective.chunk_data + sharding.shard_data)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kernel", default="grad", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.child:
        args.n = int(args.n)
        print(json.dumps(_child(args)))
        return {}
    sizes = [int(n) for n in args.n.split(",")]
    kernels = [k for k in args.kernels.split(",") if k]
    unknown = set(kernels) - set(KERNELS)
    if unknown:
        raise SystemExit(f"--kernels: unknown {sorted(unknown)}; choose from {KERNELS}")
    common = [f"--dataset={args.dataset}", f"--model={args.model}", f"--width={args.width}",
              f"--depth={args.depth}", f"--loss={args.loss}", f"--chunk_size={args.chunk_size}",
              f"--dtype={args.dtype}", f"--placement={args.placement}",
              *([f"--data_dir={args.data_dir}"] if args.data_dir else [])]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    results = []
    for n in sizes:
        for kernel in kernels:
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.memory", "--child", f"--n={n}",
                 f"--kernel={kernel}", *common], cwd=REPO, env=env, capture_output=True,
                text=True)
            if proc.returncode != 0:
                raise SystemExit(f"n={n} {kernel} failed:\n{proc.stderr[-4000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    report = {
        "benchmark": "memory", "dataset": args.dataset,
        "model": f"{args.model} width={args.width} depth={args.depth}", "loss": args.loss,
        "chunk_size": args.chunk_size, "dtype": args.dtype, "placement": args.placement,
        "results": results,
        "checks": _checks(results),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
