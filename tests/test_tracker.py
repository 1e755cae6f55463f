"""lossland.Tracker against a dense float64 oracle; chunked, warm-started, jitted once."""

import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import lossland
from conftest import REPO
from lossland import data as data_lib, losses
from lossland.objective import Objective, chunk_data

MODEL = nn.Sequential([nn.Dense(6), nn.tanh, nn.Dense(3)])


def _problem():
    x, y = data_lib.load("gaussian_mixture", 24, seed=0, input_dim=4, num_classes=3)
    x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y)
    params = MODEL.init(jax.random.key(0), x)["params"]
    params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
    apply = lambda p, inputs: MODEL.apply({"params": p}, inputs)
    loss_fn = lambda p, inputs, labels: jnp.mean(
        losses.per_example_loss("cross_entropy")(apply(p, inputs), labels))
    return apply, loss_fn, params, x, y


def test_tracker_matches_dense_oracle_and_chunked_objective():
    with jax.enable_x64(True):
        apply, loss_fn, params, x, y = _problem()
        flat, unravel = ravel_pytree(params)
        H = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), x, y)))(flat)
        g = jax.grad(lambda f: loss_fn(unravel(f), x, y))(flat)
        evals, evecs = jnp.linalg.eigh(H)
        top_vals, top_vecs = evals[::-1][:3], evecs[:, ::-1][:, :3]
        chi = lambda V: float(jnp.sum((V.T @ g) ** 2) / jnp.sum(g ** 2))

        tracker = lossland.Tracker(loss_fn, k=3, num_iters=flat.shape[0], tol=1e-10)
        result, state = tracker.update(params, tracker.init(params, jax.random.key(1)), x, y)
        np.testing.assert_allclose(result.eigenvalues, top_vals, rtol=1e-8)
        assert float(jnp.max(result.residuals)) < 1e-8
        np.testing.assert_allclose(result.chi_1, chi(top_vecs[:, :1]), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(result.chi_k, chi(top_vecs), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(jnp.abs(result.eigenvectors @ top_vecs), jnp.eye(3),
                                   atol=1e-6)
        assert int(state.num_updates) == 1

        # The same loss as an Objective over three chunks: its chunked HVPs are used.
        objective = Objective(apply, losses.per_example_loss("cross_entropy"),
                              chunk_data(x, y, 8, dtype=jnp.float64))
        chunked = lossland.Tracker(objective.loss_fn, k=3, num_iters=flat.shape[0], tol=1e-10)
        assert chunked._objective is objective
        result_c, _ = chunked.update(params, chunked.init(params, jax.random.key(1)),
                                     objective.data)
        np.testing.assert_allclose(result_c.eigenvalues, top_vals, rtol=1e-8)
        np.testing.assert_allclose(result_c.chi_k, result.chi_k, rtol=1e-6)


def test_tracker_warm_starts_and_compiles_once():
    with jax.enable_x64(True):
        _, loss_fn, params, x, y = _problem()
        tracker = lossland.Tracker(loss_fn, k=2, num_iters=40, tol=1e-3)
        state = tracker.init(params, jax.random.key(3))
        cold, state = tracker.update(params, state, x, y)
        moved = jax.tree_util.tree_map(lambda p: p * 1.001, params)
        warm, state = tracker.update(moved, state, x, y)
        fresh, _ = tracker.update(moved, tracker.init(params, jax.random.key(3)), x, y)
        assert int(warm.num_matvecs) < int(fresh.num_matvecs), (warm.num_matvecs,
                                                                fresh.num_matvecs)
        np.testing.assert_allclose(warm.eigenvalues, fresh.eigenvalues, rtol=1e-3)
        assert tracker._update._cache_size() == 1


@pytest.mark.parametrize("k, num_iters, tol", [(0, 10, 1e-3), (5, 3, 1e-3), (2, 10, -1.0)])
def test_tracker_refuses_bad_settings(k, num_iters, tol):
    with pytest.raises(ValueError, match="k=|num_iters=|tol="):
        lossland.Tracker(lambda p: 0.0, k=k, num_iters=num_iters, tol=tol)


def test_readme_embeds_the_tracker_example_verbatim():
    example = (REPO / "docs" / "tracker_example.py").read_text()
    body = "\n".join(example.splitlines()[1:]).strip()  # minus the first comment line
    assert body in (REPO / "README.md").read_text(), "README's Tracker example drifted"


def test_tracker_example_runs():
    """An NNX model trained by an optax loop, tracked every 10 steps (docs/tracker_example.py)."""
    result = subprocess.run([sys.executable, str(REPO / "docs" / "tracker_example.py")],
                            capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"step (\d+): lambda_1 = ([0-9.]+), chi_5 = ([0-9.]+), "
                      r"residual_1 = ([0-9.e+-]+), (\d+) HVPs", result.stdout)
    assert [int(r[0]) for r in rows] == [0, 10, 20, 30, 40], result.stdout
    for _, lam, chi, residual, hvps in rows:
        assert float(lam) > 0 and 0 <= float(chi) <= 1
        assert float(residual) <= 1e-3 * float(lam) and 5 <= int(hvps) <= 40
