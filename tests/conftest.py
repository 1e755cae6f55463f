"""Shared test set-up: one JAX compilation cache and one dataset cache per run,
the Fashion-MNIST skip, and helpers to run the drivers.

Speed (issue 22). Most of a driver subprocess's CPU time is XLA compiling the same
small programs that the previous subprocess compiled (measured: 10.0 s of CPU for a
20-step tracked run cold, 3.5 s with a warm cache). So the first process of a test run
makes a persistent compilation cache in a fresh temporary folder and exports it in the
environment; pytest-xdist workers and every subprocess they start inherit it, and the
controller deletes it at the end. A cached executable is the compiled program itself,
so records stay bitwise equal; the cache key holds the XLA flags, the backend and the
device count, so the fake-device subprocesses do not share entries with one-device
runs. Set LOSSLAND_TEST_COMPILE_CACHE=0 to run without it, or JAX_COMPILATION_CACHE_DIR
to keep one across runs.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Set before JAX is imported (it reads these at import), and inherited by the xdist
# workers, which start after this module is loaded in the controller. Generated
# datasets are cached per test run the same way, never in the user's cache (their
# cache files are written atomically, so workers may share them).
_OWN_TEMP = None
if "PYTEST_XDIST_WORKER" not in os.environ:
    _OWN_TEMP = tempfile.mkdtemp(prefix="lossland-test-")
    os.environ.setdefault("LOSSLAND_CACHE", os.path.join(_OWN_TEMP, "datasets"))
if (_OWN_TEMP and os.environ.get("LOSSLAND_TEST_COMPILE_CACHE", "1") != "0"
        and "JAX_COMPILATION_CACHE_DIR" not in os.environ):
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_OWN_TEMP, "xla-cache")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"   # cache the small ones too
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# XLA's backend optimizations take most of a small program's compile time, and the
# tests run small programs once: without them the suite compiles about twice as fast.
# Both sides of every comparison compile alike; set LOSSLAND_TEST_XLA_OPT=1 to keep them.
if os.environ.get("LOSSLAND_TEST_XLA_OPT", "0") != "1" and \
        "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# The kernels are checked against dense oracles in exact float32 arithmetic. On
# NVIDIA Ampere and later GPUs JAX's default float32 matrix product is TF32
# (3e-4 to 5e-4 relative error on an H100), which the 1e-4 tolerances here
# reject; the driver's --matmul_precision=highest default sets the same. The
# CPU computes float32 products in float32 either way.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
FASHION_AVAILABLE = all((FASHION_DIR / name).exists() for name in FASHION_FILES)
# Real-data tests are skipped, with this reason in the summary (`-rs`), never silently;
# CI installs the package and runs them.
requires_fashion_mnist = pytest.mark.skipif(
    not FASHION_AVAILABLE,
    reason=f"Fashion-MNIST is not installed in {FASHION_DIR}: "
           "`apt-get install dataset-fashion-mnist` runs this test (CI does)")


# The longest test files first. `make test` runs pytest-xdist with `--dist loadscope
# --no-loadscope-reorder`: a module (or a test class) is one unit of work, handed out in
# collection order to whichever worker is free. Longest first keeps one worker from
# being left with a long file at the end while the other idles. (The files after
# test_projections.py: the longest of the rest in the per-test durations of 2026-12-06,
# so that test_zoo.py and test_tracker.py are no longer handed out last.)
LONGEST_FIRST = ("test_sharding.py", "test_faults.py", "test_reproduce.py", "test_bad_input.py",
                 "test_driver.py", "test_sweep_n.py", "test_projections.py", "test_stream.py",
                 "test_curvature_toolkit.py", "test_tracker.py", "test_zoo.py", "test_block.py",
                 "test_plugins.py", "test_batchnorm.py", "test_analyze.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)   # stable: the order within a file is kept


def pytest_unconfigure(config):
    # Only the process that made the caches removes them (never an xdist worker).
    if _OWN_TEMP:
        shutil.rmtree(_OWN_TEMP, ignore_errors=True)


def run_module(module: str, *args: str, timeout: float = 600, env_extra=None):
    """Runs `python -m module args...` from the repo root; returns CompletedProcess."""
    env = dict(os.environ, **(env_extra or {}))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
