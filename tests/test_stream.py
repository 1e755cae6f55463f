"""The fused step and the stream tracker (issue 24) against dense oracles.

* `loss_accuracy_grad_block_hvp` returns the plain step's loss and gradient and
  `full_batch_block_hvp`'s H V, chunked or not;
* the fused GD step's update equals `train.make_train_step`'s;
* along a float64 GD trajectory of a tiny network, the stream's eigenvalues
  follow `eigh(jax.hessian)` at every step after burn-in, and with every row
  imaged each step (m = b) its residuals are the explicit ‖H u − θ u‖;
* on a quadratic with a large negative eigenvalue it returns the algebraically
  largest eigenvalues.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from lossland import curvature, objective, streaming
from lossland import train as train_lib
from test_curvature import get_problem


def _objective(problem, chunk_size):
    data = objective.chunk_data(np.asarray(problem.x), np.asarray(problem.y), chunk_size,
                                dtype=problem.dtype)
    return objective.Objective(problem.model.apply, problem.per_example, data)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_kernel_equals_plain_gradient_and_block_hvp(dtype):
    with jax.enable_x64(dtype == "float64"):
        problem = get_problem("mlp", "tanh", "mse", dtype)
        V = jnp.asarray(np.random.default_rng(3).normal(size=(3, problem.P)), problem.dtype)
        tangents = jax.vmap(problem.unravel)(V)
        rtol = 1e-12 if dtype == "float64" else 1e-5
        # One chunk, and 5 chunks with padding (N = 23); float32 only the latter.
        for chunk_size in (1000, 5) if dtype == "float64" else (5,):
            obj = _objective(problem, chunk_size)
            fused = jax.jit(obj.loss_accuracy_grad_block_hvp_fn)
            loss, acc, grad, hv = fused(problem.params, tangents, obj.data)
            loss0, acc0, grad0 = obj.loss_accuracy_grad(problem.params)
            hv0 = obj.block_hvp(problem.params, tangents)
            g, g0 = ravel_pytree(grad)[0], ravel_pytree(grad0)[0]
            assert abs(float(loss - loss0)) <= rtol * abs(float(loss0))
            assert float(acc) == float(acc0)
            assert float(jnp.max(jnp.abs(g - g0))) <= rtol * float(jnp.max(jnp.abs(g0)))
            flat = lambda t: jax.vmap(lambda x: ravel_pytree(x)[0])(t)
            scale = float(jnp.max(jnp.abs(flat(hv0))))
            assert float(jnp.max(jnp.abs(flat(hv) - flat(hv0)))) <= rtol * scale


def _gd_stream_run(problem, lr, steps, k, block_size, refresh):
    """The fused GD trajectory with its stream rows, and the plain GD trajectory."""
    obj = _objective(problem, 1000)
    optimizer = train_lib.make_optimizer("gd", lr)
    fused = streaming.make_fused_step(obj, optimizer, k=k, refresh=refresh, lr=lr)
    plain = train_lib.make_train_step(obj, optimizer)
    start = streaming.make_stream_start(obj, block_size=block_size, num_iters=40, tol=1e-8)
    stream = start(problem.params, obj.data, jax.random.key(0))
    params = plain_params = problem.params
    opt_state = plain_state = optimizer.init(params)
    thetas, rows, vectors = [], [], []
    displacement = jnp.zeros_like(ravel_pytree(params)[0])
    for t in range(steps):
        thetas.append(ravel_pytree(params)[0])
        if t:
            displacement = thetas[-1] - thetas[-2]
        params, opt_state, _, row, V, stream = fused(params, opt_state, obj.data, stream,
                                                     displacement)
        plain_params, plain_state, _ = plain(plain_params, plain_state, obj.data)
        rows.append(jax.device_get(row))
        vectors.append(V)
    return thetas, rows, vectors, params, plain_params


@pytest.mark.parametrize("k,block_size", [(2, 4), (1, 1)])   # (1, 1): the momentum step
def test_stream_follows_dense_eigenvalues_along_gd(k, block_size):
    """Every image from step t (m = b): residuals exact, values within one step's drift.

    The block at step t has had one subspace-iteration step on H_t after
    following H_0 … H_{t−1}, so its Ritz values lag the moving spectrum. The
    tolerance is the largest change of λ_i over one GD step along this very
    trajectory (from the dense oracle): the stream is never more than one
    step's drift behind. At lr = 0.05 that is 0.9% for λ1 and 0.4% for λ2;
    the measured errors are 0.2 and 0.8 of it.
    """
    with jax.enable_x64(True):
        problem = get_problem("mlp", "tanh", "mse", "float64")
        steps, burn_in = 40, 10
        thetas, rows, vectors, params, plain_params = _gd_stream_run(
            problem, lr=0.05, steps=steps, k=k, block_size=block_size, refresh=block_size)
        # The fused step's update is the plain step's: the same gradient, to rounding.
        diff = ravel_pytree(params)[0] - ravel_pytree(plain_params)[0]
        assert float(jnp.max(jnp.abs(diff))) <= 1e-12
        hessians = [np.asarray(problem.dense_hessian(theta)) for theta in thetas]
        exact = np.array([np.linalg.eigvalsh(H)[::-1][:k] for H in hessians])
        drift = np.max(np.abs(np.diff(exact, axis=0)) / np.abs(exact[:-1]), axis=0)
        for t in range(burn_in, steps):
            got = np.asarray(rows[t]["eigenvalues"])
            assert np.all(np.abs(got - exact[t]) / np.abs(exact[t]) <= drift), t
            U = np.asarray(vectors[t])
            explicit = np.linalg.norm(U @ hessians[t] - got[:, None] * U, axis=1)
            np.testing.assert_allclose(rows[t]["residuals"], explicit, rtol=1e-8, atol=1e-12)


def test_step_curvature_is_the_hessian_averaged_along_the_step():
    """The free step curvature (`streaming.step_curvature`) of row t is d̂ᵀ H̄ d̂ over the
    step d = θ_t − θ_{t−1}, H̄ the Hessian averaged along it. Simpson's rule over dense
    Hessians at the ends and the midpoint gives H̄ to O(‖d‖⁴): measured 2e-8–2e-7
    relative, under the 1e-6 asserted; the midpoint Hessian alone is 2e-4–5e-4 off."""
    with jax.enable_x64(True):
        problem = get_problem("mlp", "tanh", "mse", "float64")
        thetas, rows, _, _, _ = _gd_stream_run(problem, lr=0.05, steps=8, k=2, block_size=4,
                                               refresh=4)
        assert np.isnan(rows[0]["step_curvature"])      # no step before the first
        for t in range(1, len(thetas)):
            d = np.asarray(thetas[t] - thetas[t - 1])
            mid = problem.dense_hessian(0.5 * (thetas[t] + thetas[t - 1]))
            ends = [problem.dense_hessian(thetas[t - 1]), problem.dense_hessian(thetas[t])]
            average = (np.asarray(ends[0]) + 4 * np.asarray(mid) + np.asarray(ends[1])) / 6
            want = d @ average @ d / (d @ d)
            got = float(rows[t]["step_curvature"])
            assert abs(got - want) <= 1e-6 * abs(want), (t, got, want)
            assert got <= np.linalg.eigvalsh(average)[-1]     # a Rayleigh quotient of H̄


@pytest.mark.parametrize("refresh", [4, 2, 1])
def test_stream_converges_to_dense_eigenpairs_at_a_fixed_point(refresh):
    """With θ fixed, stale images are exact ones: any refresh count converges to eigh
    (k = 3 of b = 4: the centred shift's path)."""
    with jax.enable_x64(True):
        problem = get_problem("mlp", "relu", "cross_entropy", "float64")
        obj = _objective(problem, 5)
        H = np.asarray(problem.dense_hessian())
        want = np.linalg.eigvalsh(H)[::-1][:3]
        block = jax.jit(objective.flat_block_matvec(obj.block_hvp_fn, problem.params, obj.data))
        rng = np.random.default_rng(4)
        state = curvature.stream_start(jnp.asarray(rng.normal(size=(4, problem.P))),
                                       jnp.zeros(4), 0.0)
        update = jax.jit(functools.partial(curvature.stream_update, num_wanted=3))
        for _ in range(300 * 4 // refresh):
            state, ritz = update(state, block(curvature.stream_pending(state, refresh)))
        np.testing.assert_allclose(np.asarray(ritz.eigenvalues[:3]), want, rtol=1e-8)
        U = np.asarray(ritz.eigenvectors[:3])
        explicit = np.linalg.norm(U @ H - want[:, None] * U, axis=1)
        np.testing.assert_allclose(np.asarray(ritz.residuals[:3]), explicit, atol=1e-7)
        assert np.max(explicit) <= 1e-6 * want[0]


@pytest.mark.parametrize("phases,b", [(1, 2), (2, 2), (1, 4), (2, 4)])
def test_stream_picks_the_algebraically_largest_of_an_indefinite_quadratic(phases, b):
    """k = 2 of a spectrum with −50 at the bottom: with b = k the step shifts by σ, with two
    guard rows (b = 4) by the centred shift (σ − θ_b)/2 (curvature/stream.py)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        P = 30
        Q = np.linalg.qr(rng.normal(size=(P, P)))[0]
        spectrum = np.concatenate([[-50.0, 10.0, 5.0], np.linspace(-3, 2, P - 3)])
        A = jnp.asarray(Q @ np.diag(spectrum) @ Q.T)
        k = 2
        # A cold block with a large share of the negative eigenvector and no shift:
        # unshifted subspace iteration would keep −50 (the largest |λ|) in the block.
        start = jnp.asarray(rng.normal(size=(b, P))) + 3.0 * jnp.asarray(Q[:, 0])
        state = curvature.stream_start(start, jnp.zeros(b), 0.0, phases)
        update = jax.jit(functools.partial(curvature.stream_update, num_wanted=k))
        for _ in range(400 * phases):     # each phase's block is updated every phases-th step
            pending = curvature.stream_pending(state, 1)
            state, ritz = update(state, pending @ A)
        np.testing.assert_allclose(np.asarray(ritz.eigenvalues[:k]), [10.0, 5.0], rtol=1e-6)
        # The shift rose past −(λ_min + λ_k)/2 = 22.5, where |λ_min + σ| < λ_k + σ.
        assert float(state.shift) > 22.5


def test_two_phases_follow_a_period_two_spectrum_that_one_block_cannot():
    """H_t alternates between A and B, whose top eigenvectors are orthogonal (at the edge
    of stability λ1's direction alternates so; BUILD_NOTES.md). With two phases each
    block sees one fixed matrix and converges to its top pairs; a single block, turned
    by a large angle every step, does not."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        P, k, b = 40, 1, 1                           # the default at k = 1: one vector
        Q = np.linalg.qr(rng.normal(size=(P, P)))[0]
        spectrum = np.linspace(-1.0, 6.0, P)[::-1].copy()
        spectrum[:2] = [16.0, 12.0]
        swapped = spectrum.copy()
        swapped[:2] = [12.0, 16.0]                   # B's top vector is A's second
        A = Q @ np.diag(spectrum) @ Q.T
        B = Q @ np.diag(swapped) @ Q.T
        want = [16.0]
        update = jax.jit(curvature.stream_update)
        errors = {}
        for phases in (1, 2):
            state = curvature.stream_start(jnp.asarray(rng.normal(size=(b, P))), jnp.zeros(b),
                                           1.0, phases)
            worst = 0.0
            for t in range(400):
                H = jnp.asarray(A if t % 2 == 0 else B)
                state, ritz = update(state, curvature.stream_pending(state, b) @ H)
                if t >= 300:
                    got = np.asarray(ritz.eigenvalues[:k])
                    worst = max(worst, float(np.max(np.abs(got - want) / want)))
            errors[phases] = worst
        assert errors[2] <= 1e-8, errors
        assert errors[1] >= 1e-2, errors


@pytest.mark.slow   # three driver runs: about 1 min on an idle 2-core CPU, 4 min loaded
def test_stream_driver_rows_audit_and_resume_equal_uninterrupted(tmp_path):
    """--tracker=stream end to end: every-step rows with the audit, and a resumed run's
    records equal an uninterrupted run's (the block is part of the checkpoint)."""
    from conftest import run_module
    from lossland import records
    from lossland.loop import TIMING_KEYS

    common = ["--dataset=gaussian_mixture", "--n_train=64", "--width=16", "--depth=1",
              "--log_every=1", "--track_every=1", "--track_k=2", "--lanczos_iters=20",
              "--tracker=stream", "--stream_check_every=4", "--checkpoint_every=3", "--noplots"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    done = run_module("experiments.train", *common, "--steps=8", f"--workdir={straight}")
    assert done.returncode == 0, done.stderr
    assert run_module("experiments.train", *common, "--steps=5",
                      f"--workdir={split}").returncode == 0
    resumed = run_module("experiments.train", *common, "--steps=8", "--resume",
                         f"--workdir={split}")
    assert resumed.returncode == 0, resumed.stderr

    rows = records.read_metrics(straight)
    tracked = [r for r in rows if "eigenvalues" in r and "status" not in r]
    assert [r["step"] for r in tracked] == list(range(8))
    for row in tracked:
        assert len(row["eigenvalues"]) == 2 and row["num_matvecs"] == 2   # b = 4, m = 2
        assert {"residuals", "stability_ratio", "chi_1", "chi_k", "hvp_equivalents"} <= set(row)
    audits = [r for r in tracked if "stream_check_rel_err" in r]
    assert [r["step"] for r in audits] == [0, 4]
    # At the cold start the block is Lanczos's own answer.
    assert max(audits[0]["stream_check_rel_err"]) <= 1e-4

    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]
    assert strip(records.read_metrics(split)) == strip(rows)


@pytest.mark.parametrize("b", [3, 1])
def test_a_stream_saved_with_its_phases_stacked_resumes_with_the_right_block_first(b):
    """Checkpoints before the phases were kept apart held (q, b, P) arrays indexed by
    `phase`; `unstack_stream` puts the block imaged next first (b = 1 keeps `previous`)."""
    from lossland import checkpoints
    rng = np.random.default_rng(0)
    q, P = 2, 5
    saved = {"basis": rng.normal(size=(q, b, P)), "images": rng.normal(size=(q, b, P)),
             "shift": np.float32(2.5), "cursor": np.array([1, 2], np.int32),
             "phase": np.int32(1), "previous": rng.normal(size=(q, b, P))}
    state = checkpoints.unstack_stream(saved)
    for name in ("basis", "images"):
        np.testing.assert_array_equal(getattr(state, name)[0], saved[name][1])
        np.testing.assert_array_equal(getattr(state, name)[1], saved[name][0])
    assert [int(c) for c in state.cursor] == [2, 1] and int(state.phase) == 1
    assert all(p.shape == (1, P) for p in state.previous)
    if b == 1:
        np.testing.assert_array_equal(state.previous[0], saved["previous"][1])
    else:
        assert not np.any(state.previous[0])
