"""Data parallelism: sharded kernels, training steps and driver records equal one device's.

The checks need several devices, so they run in subprocesses with fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=N): 4 devices, and
3 devices to exercise the masked padding (n=230 and chunk 64 are not
multiples of 3). A third run uses two *processes* of two devices each, joined
by `jax.distributed` (gloo collectives over localhost), which is the
multi-host code path; those multi-process checks (kernels, driver with resume,
a signal to one process) are marked slow and run in `make test-slow` (issue 22).
This file is also the script those subprocesses run:

    python tests/test_sharding.py OUT.npz [MESH_SIZES [DTYPES [KERNELS]]]   # e.g. OUT.npz 4,3 float32

KERNELS is "all" (default) or "core": the kernels `make test` compares, one of each
family (the objective's loss, gradient, HVP and GN products, the placement, the GD
step, the Lanczos tracker, train-mode BatchNorm). Compilation is most of the
subprocess's time, so `make test` compiles the core only; `make test-slow` compares
every kernel, in float64 on meshes of 4 and 3 and in float32 (issue 22).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Under pytest-xdist (`--dist loadscope`) a test class is one unit of work, run by one
# worker. The tests sharing a module fixture are grouped in a class, so that each
# fixture's subprocesses start once, and the kernel and driver groups run at once.
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}   # normwise relative, ‖a − b‖∞ / ‖b‖∞
N, CHUNK, BATCH = 230, 64, 50
BN_N, BN_CHUNK = 180, 60    # BatchNorm needs whole chunks: 60 is a multiple of 4 and of 3


def make_batchnorm_net(input_shape, num_classes):
    """A plug-in (built from this file's path) with train-mode BatchNorm: ghost batches."""
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x))
            return nn.Dense(num_classes)(nn.tanh(x))

    return Net()


# ---------------------------------------------------------------------------
# The check itself (runs in a subprocess)
# ---------------------------------------------------------------------------

def _batchnorm_kernels(bn_model, x, y, mesh, put, dtype, v_host) -> dict:
    """Loss, gradient, HVP and running statistics of a train-mode BatchNorm plug-in, and
    two steps of the train step that carries them."""
    import jax
    from lossland import losses, objective, sharding, train

    data = sharding.shard_chunked(x[:BN_N], y[:BN_N], BN_CHUNK, mesh, dtype=dtype)
    obj = objective.Objective(bn_model.apply, losses.per_example_loss("cross_entropy"), data)
    params, out = put(bn_model.params), {}
    out["bn_loss"], _, out["bn_grad"] = obj.loss_accuracy_grad(params)
    out["bn_hvp"] = obj.hvp(params, put(v_host))
    stats = jax.jit(lambda p, s, d: objective.full_batch_model_state(bn_model.update_state,
                                                                      p, s, d))
    out["bn_running_stats"] = stats(params, put(bn_model.state), data)
    # The driver's step of a BatchNorm model carries the running statistics: two GD steps.
    gd = train.make_optimizer("gd", 0.1)
    step = train.make_train_step(obj, gd, update_state=bn_model.update_state)
    p, s, model_state = params, put(gd.init(bn_model.params)), put(bn_model.state)
    for _ in range(2):
        p, s, _, model_state = step(p, s, data, model_state)
    out["bn_step_params"], out["bn_step_running_stats"] = p, model_state
    return out


def _compute(out_path: str, mesh_sizes: str = "0", dtypes: str = "float32,float64",
             kernels: str = "all") -> None:
    """Saves every kernel's result, per dtype, for one device ("ref") and per mesh size.

    Layouts are named "ref" and "d{N}" (N devices, 0 = all). With several
    processes there is no single-device reference, only the "d0" layout.
    kernels="core" computes CORE_KERNELS only (`make test`), "all" every kernel.
    """
    assert kernels in ("core", "all"), kernels
    every = kernels == "all"
    from lossland import distributed
    multiprocess = distributed.maybe_initialize()

    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from lossland import config, curvature, data, losses, models, objective, sharding, train
    from lossland import tracking_extras

    try:
        from lossland import tracking
    except ImportError:  # the tracker's dependencies are not written yet
        tracking = None

    results = {"num_devices": np.asarray(jax.device_count()),
               "num_processes": np.asarray(jax.process_count())}
    for dtype_name in dtypes.split(","):
        if dtype_name == "float64":
            jax.config.update("jax_enable_x64", True)
        dtype = jnp.float32 if dtype_name == "float32" else jnp.float64
        x, y = data.load("mnist1d", N, seed=0)
        model = models.build_model("mlp", (40,), 10, width=16, depth=2, activation="tanh",
                                   key=jax.random.key(0), dtype=dtype)
        flat0, unravel = ravel_pytree(model.params)
        rng = np.random.default_rng(1)
        v_host = unravel(jnp.asarray(rng.standard_normal(flat0.shape), dtype))
        v0_host = np.asarray(rng.standard_normal(flat0.shape), dtype)
        bn_model = models.build_model(f"{Path(__file__).resolve()}:make_batchnorm_net", (40,),
                                      10, key=jax.random.key(0), dtype=dtype)
        bn_v_host = jax.tree_util.tree_map(lambda p: jnp.asarray(
            rng.standard_normal(p.shape), dtype), bn_model.params)
        layouts = {} if multiprocess else {"ref": None}
        layouts.update({f"d{size}": sharding.make_mesh(int(size))
                        for size in mesh_sizes.split(",")})
        for layout, mesh in layouts.items():
            key = f"{dtype_name}/{layout}/"
            put = lambda tree: sharding.replicate(tree, mesh)
            params, v = put(model.params), put(v_host)
            full = sharding.shard_chunked(x, y, CHUNK, mesh, dtype=dtype)
            obj = objective.Objective(model.apply, losses.per_example_loss("cross_entropy"),
                                      full)
            out = {}
            out["loss"], out["accuracy"], out["grad"] = obj.loss_accuracy_grad(params)
            out["hvp"] = obj.hvp(params, v)
            out["gnvp"] = obj.gnvp(params, v)
            if every:
                # Block products (3 tangents: v, 2v − 1, v²) in one data pass.
                block = jax.tree_util.tree_map(lambda t: jnp.stack([t, 2 * t - 1, t * t]), v)
                out["block_hvp"] = obj.block_hvp(params, block)
                out["block_gnvp"] = obj.block_gnvp(params, block)
                # The curvature toolkit (issue 23): a layer's block products, the empirical
                # Fisher and the Hutch++ trace. (Per-layer and smallest eigenvalues run the
                # Lanczos checked below on these products: not compiled again here, to keep
                # this subprocess inside its time limit on a loaded machine.)
                subset = curvature.select_params(model.params, layer="Dense_0")
                for product in ("subset_hvp", "subset_gnvp"):
                    fn = getattr(obj, product + "_fn")
                    out[product] = jax.jit(lambda p, v, d: fn(p, subset, v, d))(
                        params, subset.take(v), full)
                out["empirical_fisher_vp"] = obj.empirical_fisher_vp(params, v)
                out["hessian_trace"] = tracking_extras.make_trace(obj, 12)(
                    params, full, jax.random.key(6))["hessian_trace"]
            # The two-step placement (chunk on one device, then shard) gives the same loss.
            two_step = sharding.shard_data(objective.chunk_data(
                x, y, CHUNK, multiple_of=sharding.mesh_size(mesh), dtype=dtype), mesh)
            out["loss_two_step"] = obj._loss_and_accuracy(params, two_step)[0]

            def top(params, data, v0):
                _, unravel = ravel_pytree(params)
                matvec = lambda u: ravel_pytree(obj.hvp_fn(params, unravel(u), data))[0]
                return curvature.lanczos_top_k(matvec, v0, 3, 30).eigenvalues
            if tracking is None and hasattr(curvature, "lanczos_top_k"):
                out["lanczos"] = jax.jit(top)(params, full, put(v0_host))

            gd = train.make_optimizer("gd", 0.1)
            gd_step = train.make_train_step(obj, gd)
            out["gd_params"], _, gd_metrics = gd_step(params, put(gd.init(model.params)), full)
            out["gd_metrics"] = jnp.stack(list(gd_metrics))

            if every:
                adam = train.make_optimizer("adam", 1e-3)
                adam_step = train.make_train_step(obj, adam)
                source = sharding.MinibatchSource(
                    x, y, config.RunConfig(batch_size=BATCH, seed=0), dtype, mesh)
                p, s = params, put(adam.init(model.params))
                for step in range(3):
                    p, s, adam_metrics = adam_step(p, s, source.batch(step))
                out["adam_params"], out["adam_metrics"] = p, jnp.stack(list(adam_metrics))

            if tracking is not None:  # Lanczos on the HVP, as the runner tracks it
                tracker = tracking.make_tracker(obj, k=3, num_iters=30, tol=None, track_gn=False,
                                                lr=0.1)
                row, _ = tracker(params, full, jax.random.key(3), None)
                for name in ("eigenvalues", "chi_1", "chi_k"):
                    out["lanczos_" + name] = row[name]
                # ΔL is a difference of two close losses: compare L + ΔL, on the loss's scale.
                out["lanczos_loss_after_top"] = row["delta_loss_top"] + out["loss"]
            if tracking is not None and every:
                block_tracker = tracking.make_tracker(obj, k=3, num_iters=30, tol=None,
                                                      track_gn=False, lr=0.1, tracker="block")
                row, _ = block_tracker(params, full, jax.random.key(3), None)
                out["block_eigenvalues"] = row["eigenvalues"]
                # The stream tracker (issue 24): cold start, then 3 fused GD steps.
                from lossland import streaming
                start = streaming.make_stream_start(obj, block_size=4, num_iters=20, tol=None)
                fused = streaming.make_fused_step(obj, gd, k=3, refresh=2, lr=0.1)
                stream = start(params, full, jax.random.key(3))
                p, s = params, put(gd.init(model.params))
                flat = lambda tree: ravel_pytree(tree)[0]
                displacement = jnp.zeros_like(flat(p))
                for _ in range(3):
                    new_p, s, metrics, row, _, stream = fused(p, s, full, stream, displacement)
                    displacement, p = flat(new_p) - flat(p), new_p
                out["stream_params"], out["stream_metrics"] = p, jnp.stack(list(metrics))
                out["stream_eigenvalues"], out["stream_chi_k"] = row["eigenvalues"], row["chi_k"]
                out["stream_step_curvature"] = row["step_curvature"]
            # Train-mode BatchNorm: each chunk's statistics are the whole chunk's, sharded or
            # not (float64 only: the comparison is the same, at half the compile time).
            if dtype_name == "float64":
                out.update(_batchnorm_kernels(bn_model, x, y, mesh, put, dtype, bn_v_host))
            for name, value in out.items():
                flat = [np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(
                    sharding.to_host(value))]
                results[key + name] = np.concatenate(flat).astype(np.float64)
    if jax.process_index() == 0:
        np.savez(out_path, **results)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

def _env(num_devices: int, fast_compile: bool = False, **extra) -> dict:
    flags = [f"--xla_force_host_platform_device_count={num_devices}"]
    if fast_compile:  # both sides of every comparison compile alike; halves compile time
        flags.append("--xla_backend_optimization_level=0")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=" ".join(flags),
               **extra)
    env.pop("LOSSLAND_DISTRIBUTED", None)
    return env


def _spawn(out: Path, num_devices: int, *args: str, **extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, str(out), *args], cwd=REPO,
                            env=_env(num_devices, fast_compile=True, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, timeout: float = 900) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]


def _rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _compare(got: dict, ref: dict, got_layout: str, ref_layout: str = "ref") -> list[str]:
    """Problems found comparing every `ref_layout` quantity of `ref` with `got_layout`'s."""
    problems = []
    dtypes_run = {name.split("/")[0] for name in got if name.count("/") == 2}
    for name in ref:
        if name.count("/") != 2 or name.split("/")[1] != ref_layout:
            continue
        dtype_name, _, quantity = name.split("/")
        if dtype_name not in dtypes_run:
            continue
        other = f"{dtype_name}/{got_layout}/{quantity}"
        if other not in got:
            problems.append(f"{other} missing")
            continue
        err = _rel_err(got[other], ref[name])
        if not err <= TOLERANCE[dtype_name]:
            problems.append(f"{other}: relative error {err:.3g} > {TOLERANCE[dtype_name]}")
    return problems


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def kernel_runs(tmp_path_factory):
    """kernel_runs(dtype, meshes, kernels): one process with 4 devices, one device's results
    and those on each mesh size, in that dtype; each setting's process runs once per module."""
    results = {}

    def run(dtype: str, meshes: str = "4,3", kernels: str = "all") -> dict:
        if (dtype, meshes, kernels) not in results:
            tmp = tmp_path_factory.mktemp(f"sharding_{dtype}_{kernels}")
            _finish(_spawn(tmp / "local.npz", 4, meshes, dtype, kernels))
            results[dtype, meshes, kernels] = dict(np.load(tmp / "local.npz"))
        return results[dtype, meshes, kernels]
    return run


@pytest.fixture(scope="module")
def multiprocess_kernel_runs(tmp_path_factory):
    """2 processes × 2 devices joined by jax.distributed, float32."""
    tmp = tmp_path_factory.mktemp("sharding_mp")
    port = _free_port()
    processes = [_spawn(tmp / "mp.npz", 2, "0", "float32",
                        JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                        JAX_PROCESS_ID=str(i)) for i in range(2)]
    for process in processes:
        _finish(process)
    return dict(np.load(tmp / "mp.npz"))


class TestShardedKernels:
    """float64 kernels in one process with 4 devices (kernel_runs), against one device at
    1e-10: the strict check.

    `make test` checks the core kernels (CORE_KERNELS: one of each family) on a mesh of 3
    devices (uneven, padded). `make test-slow` checks every kernel on meshes of 4 and 3
    (one more process; compilation is most of its time), and the same kernels in float32
    at 1e-5 (TestShardedKernelsFloat32) (issue 22).
    """

    def test_core_kernels_equal_one_device(self, kernel_runs):
        # The layout under test and one device's results come from one process.
        _check_kernels(kernel_runs("float64", "3", "core"), 3, CORE_KERNELS)

    @pytest.mark.slow
    @pytest.mark.parametrize("num_devices", [4, 3])
    def test_sharded_kernels_equal_one_device(self, kernel_runs, num_devices):
        _check_kernels(kernel_runs("float64", "4,3"), num_devices, ALL_KERNELS)


@pytest.mark.slow   # its own unit of work under xdist, beside the float64 class
class TestShardedKernelsFloat32:
    """The same kernels in float32, at 1e-5 (one process, meshes of 4 and 3), and on 2
    processes × 2 devices (two more JAX processes)."""

    @pytest.mark.parametrize("num_devices", [4, 3])
    def test_sharded_kernels_equal_one_device(self, kernel_runs, num_devices):
        _check_kernels(kernel_runs("float32", "4,3"), num_devices, ALL_KERNELS)

    def test_two_processes_equal_one_device(self, kernel_runs, multiprocess_kernel_runs):
        """jax.distributed with 2 processes × 2 CPU devices: the multi-host code path."""
        results = multiprocess_kernel_runs
        assert int(results["num_processes"]) == 2 and int(results["num_devices"]) == 4
        assert _compare(results, kernel_runs("float32", "4,3"), "d0") == []


# What _compute(kernels="core") saves: one kernel of each family. "all" adds the rest.
CORE_KERNELS = {"loss", "accuracy", "grad", "hvp", "gnvp", "loss_two_step", "gd_params",
                "gd_metrics", "lanczos_eigenvalues", "lanczos_chi_1", "lanczos_chi_k",
                "lanczos_loss_after_top"}
ALL_KERNELS = CORE_KERNELS | {
    "block_hvp", "block_gnvp", "subset_hvp", "subset_gnvp", "empirical_fisher_vp",
    "hessian_trace", "adam_params", "adam_metrics", "block_eigenvalues", "stream_params",
    "stream_metrics", "stream_eigenvalues", "stream_chi_k", "stream_step_curvature"}
BATCHNORM_KERNELS = {"bn_loss", "bn_grad", "bn_hvp", "bn_running_stats", "bn_step_params",
                     "bn_step_running_stats"}   # float64 only


def _check_kernels(results: dict, num_devices: int, expected: set[str]) -> None:
    """Every kernel on `num_devices` devices equals one device's, and none is missing."""
    assert int(results["num_devices"]) == 4
    assert _compare(results, results, f"d{num_devices}") == []
    for dtype_name in {name.split("/")[0] for name in results if name.count("/") == 2}:
        names = {name.split("/")[2] for name in results
                 if name.startswith(f"{dtype_name}/d{num_devices}/")}
        want = expected | (BATCHNORM_KERNELS if dtype_name == "float64" else set())
        assert "lanczos_eigenvalues" in names, (
            "lossland.tracking (the Lanczos tracker) did not import")
        assert names == want, (dtype_name, want ^ names)


def _records(workdir: Path) -> list[dict]:
    from lossland.loop import TIMING_KEYS
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS}
            for row in rows]


# Quantities that are differences of nearly equal numbers are compared on the
# scale of what they are differences of (a Ritz residual on the eigenvalue's, a
# loss change on the loss's); fractions in [0, 1] on the scale 1.
_SCALE_OF = {"residuals": "eigenvalues", "delta_loss_full": "loss", "delta_loss_top": "loss",
             "delta_loss_bulk": "loss", "cum_delta_top": "loss", "cum_delta_bulk": "loss",
             "grad_norm_top": "grad_norm", "grad_norm_bulk": "grad_norm", "chi_1": None,
             "chi_k": None}


def _assert_rows_close(got: list[dict], want: list[dict], rtol: float, keys=None):
    assert [sorted(r) for r in got] == [sorted(r) for r in want]
    for row_got, row_want in zip(got, want):
        for key, value in row_want.items():
            if keys is not None and key not in keys:
                if not isinstance(value, str) and value is not None:
                    assert np.all(np.isfinite(row_got[key])), key
                continue
            if isinstance(value, str) or value is None:
                assert row_got[key] == value, key
                continue
            if key in _SCALE_OF:
                scale = 1.0 if _SCALE_OF[key] is None else np.max(np.abs(row_want[_SCALE_OF[key]]))
            else:
                scale = np.max(np.abs(value))
            err = np.max(np.abs(np.asarray(row_got[key]) - np.asarray(value)))
            assert err <= rtol * max(scale, 1e-30), (
                f"step {row_want['step']} {key}: {row_got[key]} vs {value} "
                f"(error {err:.3g} > {rtol:g} x scale {scale:.3g})")


DRIVER_FLAGS = ["--n_train=70", "--chunk_size=32", "--width=16", "--depth=1", "--log_every=1",
                "--track_every=2", "--track_k=2", "--lanczos_iters=12", "--noplots"]


def _driver(workdir: Path, num_devices: int, *flags: str, **extra) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.train", *DRIVER_FLAGS, f"--workdir={workdir}",
         *flags], cwd=REPO, env=_env(num_devices, fast_compile=True, **extra),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _driver_processes(workdir: Path, *flags: str, count: int = 2) -> list[subprocess.Popen]:
    """One driver command run as `count` processes of 2 CPU devices (jax.distributed)."""
    port = _free_port()
    return [_driver(workdir, 2, *flags, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                    JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(i)) for i in range(count)]


@pytest.fixture(scope="module")
def driver_runs(tmp_path_factory):
    """Two runs of the same 4 steps, started together: float32 on 1 and on 4 devices."""
    tmp = tmp_path_factory.mktemp("driver")
    workdirs = {key: tmp / f"{key[0]}_{key[1]}" for key in (("float32", 1), ("float32", 4))}
    processes = [_driver(workdirs[dtype, devices], devices, f"--dtype={dtype}", "--steps=4",
                         f"--num_devices={devices}") for dtype, devices in workdirs]
    for process in processes:
        _finish(process)
    return workdirs


@pytest.fixture(scope="module")
def multiprocess_driver_run(tmp_path_factory):
    """Two processes of 2 devices each that stop at step 2 and are resumed (again as two
    processes) to step 4: the multi-host path through checkpoints and resume."""
    workdir = tmp_path_factory.mktemp("driver_mp") / "float32_2x2"
    for flags in (["--steps=2"], ["--steps=4", "--resume"]):
        for process in _driver_processes(workdir, *flags):
            _finish(process)
    return workdir


class TestShardedDriver:
    """The driver on 1 and 4 devices (driver_runs); in float64 on 4 devices and on 2
    processes × 2 devices (slow)."""

    def test_driver_records_do_not_depend_on_device_count(self, driver_runs):
        """experiments.train with --num_devices=4 writes the records of --num_devices=1.

        n=70 in chunks of 32 is padded on 4 devices.
        """
        for (dtype, devices), workdir in driver_runs.items():
            config = json.loads((workdir / "config.json").read_text())
            assert config["num_devices"] == devices and config["flags"]["dtype"] == dtype
        one = _records(driver_runs["float32", 1])
        assert one[-1]["status"] == "finished" and len(one) == 5
        assert sum("eigenvalues" in row for row in one) == 3
        _assert_rows_close(_records(driver_runs["float32", 4]), one, 1e-5)

    @pytest.mark.slow   # one more driver process; float64 drivers run in make test too
    def test_float64_driver_on_four_devices_follows_the_float32_run(self, driver_runs,
                                                                     tmp_path):
        """A float64 run on 4 devices checks that --dtype=float64 works sharded on CPU (its
        kernels are compared with one device's at 1e-10 above; tests/test_analyze.py runs
        the float64 driver on one device in `make test`): its trajectory agrees with the
        float32 run to float32 rounding. (Its tracked eigenvectors need not: 12 Lanczos
        steps leave them unconverged, and float32 and float64 Krylov bases part ways.)
        """
        workdir = tmp_path / "float64_4"
        _finish(_driver(workdir, 4, "--dtype=float64", "--steps=4", "--num_devices=4"))
        config = json.loads((workdir / "config.json").read_text())
        assert config["num_devices"] == 4 and config["flags"]["dtype"] == "float64"
        trajectory = {"step", "loss", "accuracy", "grad_norm", "param_norm", "update_norm", "lr",
                      "status", "stop_reason"}
        _assert_rows_close(_records(workdir), _records(driver_runs["float32", 1]), 1e-5,
                           keys=trajectory)


    @pytest.mark.slow   # four more driver processes (issue 22)
    def test_driver_two_processes_write_the_records_of_one(self, driver_runs,
                                                           multiprocess_driver_run):
        """2 processes × 2 devices, stopped at step 2 and resumed: one device's records.

        Only process 0 writes: a second writer would duplicate every row. The
        resumed run drops the first run's status row and continues from the
        step-2 checkpoint, which both processes saved and restored together.
        """
        workdir = multiprocess_driver_run
        config = json.loads((workdir / "config.json").read_text())
        assert config["process_count"] == 2 and config["num_devices"] == 4
        rows = _records(workdir)
        assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
        _assert_rows_close(rows, _records(driver_runs["float32", 1]), 1e-5)
        assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


@pytest.mark.slow   # two more jax.distributed processes, about 25 s on 2 cores (issue 22)
def test_a_signal_to_one_process_stops_all(tmp_path):
    """SIGTERM reaching one process of two stops both at the same step, checkpointed.

    The processes agree on stopping every step; without that, the signalled
    one would leave and the other would hang in its next collective.
    """
    import signal
    import time

    workdir = tmp_path / "run"
    processes = _driver_processes(workdir, "--steps=100000", "--track_every=0",
                                  "--checkpoint_every=0")
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and all(p.poll() is None for p in processes), (
            [p.communicate()[0][-2000:] for p in processes if p.poll() is not None])
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGTERM)   # not the process that writes the records
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    assert [p.returncode for p in processes] == [130, 130], [o[-2000:] for o in outputs]
    rows = _records(workdir)
    last = rows[-1]
    assert last["status"] == "interrupted"
    assert [row["step"] for row in rows[:-1]] == list(range(last["step"]))
    assert (workdir / "checkpoints" / str(last["step"])).exists()
    assert "Continue with --resume" in outputs[0]


if __name__ == "__main__":
    _compute(*sys.argv[1:])
