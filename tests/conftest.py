"""Shared test set-up: an isolated dataset cache and helpers to run the drivers."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

# The kernels are checked against dense oracles in exact float32 arithmetic. On
# NVIDIA Ampere and later GPUs JAX's default float32 matrix product is TF32
# (3e-4 to 5e-4 relative error on an H100), which the 1e-4 tolerances here
# reject; the driver's --matmul_precision=highest default sets the same. The
# CPU computes float32 products in float32 either way.
jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parents[1]
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="session", autouse=True)
def _dataset_cache(tmp_path_factory):
    # Generated datasets are cached per test session, never in the user's cache.
    if "LOSSLAND_CACHE" not in os.environ:
        os.environ["LOSSLAND_CACHE"] = str(tmp_path_factory.mktemp("lossland_cache"))


def run_module(module: str, *args: str, timeout: float = 600, env_extra=None):
    """Runs `python -m module args...` from the repo root; returns CompletedProcess."""
    env = dict(os.environ, **(env_extra or {}))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
