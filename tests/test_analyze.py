"""experiments.analyze: the curvature of one trained model.

The end-to-end test uses a tiny driver run (a 506-parameter MLP on 64 examples,
10 steps, float64), not `make demo`, to stay fast: analyze on its last
checkpoint must reproduce the run's last tracked eigenvalues to the Lanczos
tolerance (both solves stop once every residual is ≤ tol·|λ|, and a residual r
bounds the distance to an eigenvalue by r).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_module
from experiments import analyze as analyze_lib
from jax.flatten_util import ravel_pytree

from lossland import data as data_lib, losses, models, records

TOL = 1e-6
RUN = ("--dataset=gaussian_mixture", "--n_train=64", "--width=16", "--depth=1", "--steps=10",
       "--track_every=10", "--track_k=3", "--lanczos_iters=80", f"--lanczos_tol={TOL}",
       "--dtype=float64", "--noplots")


def test_analyze_reproduces_the_runs_last_tracked_eigenvalues(tmp_path):
    run, out = tmp_path / "run", tmp_path / "analysis"
    trained = run_module("experiments.train", *RUN, f"--workdir={run}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    last = [row for row in records.read_metrics(run) if "eigenvalues" in row][-1]
    assert last["step"] == 10
    done = run_module("experiments.analyze", f"--run_dir={run}", "--k=3", "--lanczos_iters=80",
                      f"--lanczos_tol={TOL}", "--num_probes=4", "--slq_iters=8",
                      f"--workdir={out}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "analyze: top-3 eigenpairs" in done.stderr    # the progress lines
    analysis = json.loads((out / analyze_lib.ANALYSIS_FILE).read_text())
    assert {"step", "eigenvalues", "residuals", "min_eigenvalue", "trace",
            "trace_stderr"} <= set(analysis)
    assert analysis["step"] == 10 and analysis["num_params"] == 506
    np.testing.assert_allclose(analysis["eigenvalues"], last["eigenvalues"],
                               rtol=2 * TOL, atol=0)
    assert max(r / abs(l) for r, l in zip(analysis["residuals"], analysis["eigenvalues"])) \
        <= TOL
    # λ_min below the top-k, the trace within a few standard errors of a positive number
    # (MSE at a generic point: the Gauss–Newton part dominates), a density that integrates to 1.
    assert analysis["min_eigenvalue"] < analysis["eigenvalues"][-1]
    assert analysis["trace"] > 0 and np.isfinite(analysis["trace_stderr"])
    grid, density = (np.asarray(analysis["density"][k]) for k in ("grid", "density"))
    assert abs(np.trapezoid(density, grid) - 1) < 1e-6
    assert (out / "density.png").is_file()

    _check_against_dense_hessian(run, analysis)

    # --params with the driver's flags: the run directory (its newest checkpoint), and an
    # .npz export of the same params. The same θ and solver: the same λ's, bitwise.
    checkpoint_dir = run / records.CHECKPOINT_DIR
    assert analyze_lib.params_source(str(run)) == (checkpoint_dir, 10)
    assert analyze_lib.params_source(str(checkpoint_dir)) == (checkpoint_dir, 10)
    assert analyze_lib.params_source(str(checkpoint_dir / "10")) == (checkpoint_dir, 10)
    arrays = analyze_lib.params_arrays(str(run))
    assert arrays["Dense_0/kernel"].dtype == np.float64 and len(arrays) == 4
    np.savez(tmp_path / "theta.npz", **arrays)
    solver = ("--k=3", "--lanczos_iters=80", f"--lanczos_tol={TOL}", "--num_probes=4",
              "--slq_iters=8")
    results = {}
    for name, source in (("checkpoint", run), ("npz", tmp_path / "theta.npz")):
        done = run_module("experiments.analyze", *RUN, f"--params={source}", *solver,
                          f"--workdir={tmp_path / name}")
        assert done.returncode == 0, done.stderr[-2000:]
        results[name] = json.loads((tmp_path / name / analyze_lib.ANALYSIS_FILE).read_text())
    assert results["checkpoint"]["step"] == 10 and results["npz"]["step"] is None
    for key in ("eigenvalues", "residuals", "min_eigenvalue", "trace"):
        assert results["checkpoint"][key] == results["npz"][key] == analysis[key], key


def _check_against_dense_hessian(run, analysis):
    """The analysis of the run's last checkpoint against eigh of jax.hessian of its loss
    (float64, P = 506): top-k to the Lanczos tolerance, λ_min (Lanczos which="smallest")
    within its residual, the trace within 4 standard errors."""
    config = json.loads((run / records.CONFIG_FILE).read_text())["flags"]
    with jax.enable_x64(True):
        x, y = data_lib.load("gaussian_mixture", 64, seed=0, input_dim=20, num_classes=10)
        model = models.build_model("mlp", (20,), 10, width=16, depth=1, key=jax.random.key(0),
                                   dtype=jnp.float64)
        params = analyze_lib.load_params(str(run), model.params)
        flat, unravel = ravel_pytree(params)
        per_example = losses.per_example_loss(config["loss"])
        loss = lambda f: jnp.mean(per_example(model.apply(unravel(f), jnp.asarray(x)),
                                              jnp.asarray(y)))
        eigenvalues = np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(loss))(flat)))
    scale = np.abs(eigenvalues).max()
    np.testing.assert_allclose(analysis["eigenvalues"], eigenvalues[::-1][:3], rtol=2 * TOL)
    assert eigenvalues[0] < 0                      # a saddle direction: λ_min is negative
    assert abs(analysis["min_eigenvalue"] - eigenvalues[0]) <= \
        max(analysis["min_residual"], 1e-10 * scale)
    assert abs(analysis["min_eigenvalue"] - eigenvalues[0]) < 1e-6 * scale
    assert abs(analysis["trace"] - eigenvalues.sum()) < 4 * analysis["trace_stderr"]


def test_params_file_round_trip_and_the_leaf_that_differs(tmp_path):
    model = models.build_model("mlp", (20,), 10, width=16, depth=1, key=jax.random.key(0))
    path = tmp_path / "params.npz"
    analyze_lib.save_params_npz(path, model.params)
    analyze_lib.check_params_file(str(path), model.params)
    loaded = analyze_lib.load_params_npz(str(path), model.params)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_array_equal(a, b)
    wider = models.build_model("mlp", (20,), 10, width=32, depth=1, key=jax.random.key(0))
    with pytest.raises(analyze_lib.AnalyzeError, match=r"leaf 'Dense_0/bias' has shape "
                       r"\(16,\), the model's has shape \(32,\)"):
        analyze_lib.check_params_file(str(path), wider.params)
    arrays = {k: np.asarray(v) for k, v in analyze_lib.named_leaves(model.params).items()}
    del arrays["Dense_1/kernel"]
    np.savez(tmp_path / "short.npz", **arrays)
    with pytest.raises(analyze_lib.AnalyzeError, match="no array for the model's leaf "
                       "'Dense_1/kernel'"):
        analyze_lib.check_params_file(str(tmp_path / "short.npz"), model.params)
