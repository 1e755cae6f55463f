"""Line probes, valley floors and power-law fits on analytic functions and a tiny network."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from lossland import curvature, losses, models, objective as objective_lib, probes, records
from lossland import scaling

S_MAX = 0.5
GRID = np.linspace(-S_MAX, S_MAX, 41)


@pytest.fixture
def x64():
    # float64 only inside these tests: the other modules run in float32 in this process.
    with jax.enable_x64(True):
        yield


# Analytic losses of a 2-D params pytree {"x", "y"}; the probes run along x.
def quadratic(p):
    return 1.5 * (p["x"] - 0.2) ** 2 + 0.5 * (p["x"] - 0.2) * p["y"] + p["y"] ** 2


def kink(p):
    return jnp.abs(p["x"] - 0.2) + p["y"] ** 2


def cusp(p):
    return jnp.sqrt(jnp.abs(p["x"] - 0.2)) + p["y"] ** 2


def _point(x, y):
    return {"x": jnp.asarray(x, jnp.float64), "y": jnp.asarray(y, jnp.float64)}


X_DIR = {"x": jnp.asarray(3.0), "y": jnp.asarray(0.0)}   # not unit: the probe normalizes it


@pytest.mark.parametrize("loss_fn,slope_exp,curv_exp", [
    (quadratic, 1.0, 0.0), (kink, 0.0, None), (cusp, -0.5, -1.5)])
def test_exponents_recovered_on_analytic_functions(x64, loss_fn, slope_exp, curv_exp):
    params = _point(0.013, 0.0)
    floor = probes.find_valley_floor(loss_fn, params, X_DIR, S_MAX)
    assert bool(floor.bracketed) and not bool(floor.at_edge)
    s_star = float(floor.s_star)
    assert abs(s_star - (0.2 - 0.013)) < 1e-6
    probe = probes.line_probe(loss_fn, params, X_DIR, GRID)
    for fit in probes.side_fits(probe.s, probe.slope, s_star):
        assert fit.num_points >= 10
        assert abs(fit.exponent - slope_exp) < 0.05, fit
    if curv_exp is not None:
        for fit in probes.side_fits(probe.s, probe.curvature, s_star):
            assert abs(fit.exponent - curv_exp) < 0.05, fit


def test_valley_floor_of_shifted_quadratic_and_probe_values(x64):
    # f(θ) = ½ (θ − m)ᵀ A (θ − m): along unit u from θ0, s* = uᵀA(m − θ0) / uᵀAu.
    A = jnp.array([[3.0, 1.0], [1.0, 2.0]])
    m = jnp.array([0.3, -0.1])
    f = lambda theta: 0.5 * (theta - m) @ A @ (theta - m)
    theta0 = jnp.array([0.05, 0.02])
    u = jnp.array([1.0, 2.0]) / jnp.sqrt(5.0)
    expected = float(u @ A @ (m - theta0) / (u @ A @ u))
    floor = probes.find_valley_floor(f, theta0, jnp.array([1.0, 2.0]), S_MAX)
    assert abs(float(floor.s_star) - expected) < 1e-6
    assert abs(float(floor.slope)) < 1e-6
    probe = probes.line_probe(f, theta0, jnp.array([1.0, 2.0]), GRID)
    grads = jax.vmap(lambda s: A @ (theta0 + s * u - m))(jnp.asarray(GRID))
    np.testing.assert_allclose(probe.loss, jax.vmap(lambda s: f(theta0 + s * u))(GRID), rtol=1e-12)
    np.testing.assert_allclose(probe.slope, grads @ u, atol=1e-12)
    np.testing.assert_allclose(probe.curvature, float(u @ A @ u), rtol=1e-12)
    np.testing.assert_allclose(probe.grad_norm, jnp.linalg.norm(grads, axis=1), rtol=1e-12)
    perp = grads - (grads @ u)[:, None] * u
    np.testing.assert_allclose(probe.grad_norm_perp, jnp.linalg.norm(perp, axis=1), atol=1e-12)


def test_one_dimensional_params_and_batched_evaluation_agree(x64):
    f = lambda theta: jnp.sum(jnp.abs(theta - 0.1) ** 1.5)
    theta = jnp.array([0.0])
    full = probes.line_probe(f, theta, jnp.array([1.0]), GRID)
    batched = probes.line_probe(f, theta, jnp.array([-2.0]), -GRID, batch_size=7)
    # Direction −u on grid −s walks the same points: same loss, curvature and norms,
    # slope of opposite sign.
    np.testing.assert_allclose(full.s, -batched.s)
    np.testing.assert_allclose(full.slope, -batched.slope, rtol=1e-12)
    for name in ("loss", "curvature", "grad_norm", "grad_norm_perp"):
        np.testing.assert_allclose(getattr(full, name), getattr(batched, name), rtol=1e-12,
                                   atol=1e-15)
    s_star = float(probes.find_valley_floor(f, theta, jnp.array([1.0]), S_MAX).s_star)
    assert abs(s_star - 0.1) < 1e-6
    for fit in probes.side_fits(full.s, full.slope, s_star):
        assert abs(fit.exponent - 0.5) < 0.05


def test_minimum_beyond_the_range_is_reported_at_the_edge(x64):
    f = lambda theta: jnp.sum((theta - 5.0) ** 2)
    floor = probes.find_valley_floor(f, jnp.zeros(2), jnp.array([1.0, 0.0]), S_MAX)
    assert bool(floor.at_edge) and not bool(floor.bracketed)
    assert float(floor.s_star) == pytest.approx(S_MAX)


def test_fit_power_law_drops_bad_points_and_reports_range():
    r = np.array([0.0, 0.01, 0.02, 0.04, 0.08, 0.16, -1.0, 0.32])
    y = 2.0 * np.abs(r) ** 1.5
    y[3] = 0.0          # dropped: y ≤ 0
    y[4] = np.nan       # dropped: not finite
    fit = probes.fit_power_law(r, y)
    assert fit.num_points == 4 and fit.r_min == 0.01 and fit.r_max == 0.32
    assert fit.exponent == pytest.approx(1.5) and fit.ci_low <= 1.5 <= fit.ci_high
    assert np.exp(fit.intercept) == pytest.approx(2.0)
    rng = np.random.default_rng(0)
    r = np.geomspace(1e-3, 1e-1, 30)
    noisy = probes.fit_power_law(r, r ** -0.5 * np.exp(0.05 * rng.normal(size=r.size)))
    assert noisy.ci_low < -0.5 < noisy.ci_high and noisy.ci_high - noisy.ci_low < 0.1
    two = probes.fit_power_law([1.0, 2.0], [1.0, 4.0])
    assert two.exponent == pytest.approx(2.0) and np.isnan(two.ci_low)
    assert np.isnan(probes.fit_power_law([1.0], [1.0]).exponent)


def _tiny_objective(n=24, width=6, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)
    model = models.build_model("mlp", (5,), 3, width=width, depth=1, activation="tanh",
                               key=jax.random.key(0), dtype=dtype)
    data = objective_lib.chunk_data(x, y, chunk_size=10, dtype=dtype)   # 3 chunks, padded
    return model, objective_lib.Objective(model.apply, losses.per_example_loss("mse"), data)


def test_probe_curvature_equals_hvp_on_a_network(x64):
    model, objective = _tiny_objective(dtype=jnp.float64)
    params = model.params
    loss_fn = lambda p: objective.loss_fn(p, objective.data)
    theta, unravel = ravel_pytree(params)
    u = jax.random.normal(jax.random.key(3), theta.shape, theta.dtype)
    u = u / jnp.linalg.norm(u)
    probe = probes.line_probe(loss_fn, params, unravel(u), jnp.array([0.0, 0.1]))
    @jax.jit
    def reference(s):   # uᵀ H u through curvature.hvp, and ‖∇L‖, at θ + s u
        point = unravel(theta + s * u)
        hu = ravel_pytree(curvature.hvp(loss_fn, point, unravel(u)))[0]
        return u @ hu, jnp.linalg.norm(ravel_pytree(jax.grad(loss_fn)(point))[0])

    for k, s in enumerate((0.0, 0.1)):
        curv, grad_norm = reference(s)
        assert float(probe.curvature[k]) == pytest.approx(float(curv), rel=1e-10)
        assert float(probe.grad_norm[k]) == pytest.approx(float(grad_norm), rel=1e-10)


def test_prober_row_is_compact_json_and_consistent():
    model, objective = _tiny_objective()
    params = model.params
    theta, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda t: objective.loss_fn(unravel(t), objective.data)))(theta)
    eigenvalues, eigenvectors = jnp.linalg.eigh(hessian)
    v1 = eigenvectors[:, -1]
    prober = probes.make_prober(objective, s_max=0.05, num_points=11, num_random_directions=2)
    row = prober(params, objective.data, v1, jnp.zeros_like(theta), jax.random.key(0))
    names = probes.direction_names(2)
    assert names == ["v1", "grad", "disp", "v1init", "rand0", "rand1"]
    json.dumps(records.to_jsonable(row), allow_nan=False)
    assert all(not isinstance(v, (list, tuple, np.ndarray, jax.Array)) for v in row.values())
    assert row["valley_distance"] == abs(row["probe_v1_s_star"]) <= 0.05 + 1e-6
    assert all(row[f"probe_{d}_{k}"] is None for k in ("s_star", "max_grad_norm")
               for d in ("disp", "v1init"))
    # cos² of the gradient with each direction: 1 along the gradient itself.
    assert row["probe_grad_grad_alignment"] == pytest.approx(1.0, rel=1e-4)
    g_flat = ravel_pytree(objective.grad(params))[0]
    cos2 = float(jnp.vdot(g_flat, v1) ** 2 / jnp.vdot(g_flat, g_flat))
    assert row["probe_v1_grad_alignment"] == pytest.approx(cos2, rel=1e-3, abs=1e-8)
    assert row["probe_v1_curvature_at_0"] == pytest.approx(float(eigenvalues[-1]), rel=1e-3)
    assert row["probe_v1_max_curvature"] >= row["probe_v1_curvature_at_0"] - 1e-6
    g = ravel_pytree(objective.grad(params))[0]
    assert row["probe_grad_max_grad_norm"] >= float(jnp.linalg.norm(g)) * 0.99
    moved = prober(params, objective.data, v1, 0.01 * v1, jax.random.key(0), -2.0 * v1)
    assert moved["probe_disp_s_star"] == pytest.approx(moved["probe_v1_s_star"], abs=1e-6)
    # The control direction v1init, here −v1: the same line, mirrored.
    assert moved["probe_v1init_s_star"] == pytest.approx(-moved["probe_v1_s_star"], abs=1e-6)
    batched = probes.make_prober(objective, s_max=0.05, num_points=11, num_random_directions=2,
                                 batch_size=4)(params, objective.data, v1, 0.01 * v1,
                                               jax.random.key(0), -2.0 * v1)
    for key, value in moved.items():
        if isinstance(value, float) and np.isfinite(value):
            assert batched[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_probe_range_tied_to_the_iterate(x64):
    """--probe_s_max_steps / --probe_s_max_theta: the half-range is max(steps·η‖∇L‖,
    fraction·‖θ‖) at the probed iterate, the row states it in both units, and the valley
    distance in step lengths is |s*| / (η‖∇L‖)."""
    model, objective = _tiny_objective(dtype=jnp.float64)
    params = model.params
    theta, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda t: objective.loss_fn(unravel(t), objective.data)))(theta)
    v1 = jnp.linalg.eigh(hessian)[1][:, -1]
    grad_norm = float(jnp.linalg.norm(ravel_pytree(objective.grad(params))[0]))
    param_norm = float(jnp.linalg.norm(theta))
    lr = 0.1
    for steps, fraction in ((12.0, 1e-6), (1e-6, 0.01)):   # each side of the max
        prober = probes.make_prober(objective, s_max=0.05, num_points=11,
                                    num_random_directions=1, lr=lr, s_max_steps=steps,
                                    s_max_theta=fraction)
        row = prober(params, objective.data, v1, 0.3 * v1 + 0.1 * theta, jax.random.key(0))
        expected = max(steps * lr * grad_norm, fraction * param_norm)
        assert row["probe_s_max"] == pytest.approx(expected, rel=1e-9)
        assert row["probe_step_length"] == pytest.approx(lr * grad_norm, rel=1e-9)
        assert row["probe_param_norm"] == pytest.approx(param_norm, rel=1e-9)
        assert row["probe_s_max_steps"] == pytest.approx(expected / (lr * grad_norm), rel=1e-9)
        assert row["probe_s_max_theta"] == pytest.approx(expected / param_norm, rel=1e-9)
        assert abs(row["probe_v1_s_star"]) <= expected * (1 + 1e-9)
        assert row["valley_distance_steps"] == pytest.approx(
            row["valley_distance"] / (lr * grad_norm), rel=1e-9)
        d = 0.3 * v1 + 0.1 * theta
        cos2 = float(jnp.vdot(d, v1) ** 2 / jnp.vdot(d, d))
        assert row["disp_v1_alignment"] == pytest.approx(cos2, rel=1e-9)
    fixed = probes.make_prober(objective, s_max=0.05, num_points=11, num_random_directions=1,
                               lr=lr)(params, objective.data, v1, jnp.zeros_like(theta),
                                      jax.random.key(0))
    assert fixed["probe_s_max"] == pytest.approx(0.05)
    assert fixed["disp_v1_alignment"] is None   # no displacement at the first step


def test_probes_from_the_edge_of_stability_on(tmp_path):
    """--probe_from_eos: probes at step 0, then only at steps ≥ the EoS entry, and at the end;
    the tied range reaches 16 step lengths in every probe."""
    from lossland import config as config_lib, runner

    # λ1·η/2: 1.94 at step 0, 0.66 at step 5, then sharpening through 0.72 near step 40.
    cfg = config_lib.RunConfig(dataset="mnist1d", n_train=64, width=16, depth=1, lr=0.35,
                               steps=60, eos_threshold=0.72, track_every=5, track_k=1,
                               lanczos_iters=8,
                               probe_every=5, probe_from_eos=True, probe_points=9,
                               probe_s_max_steps=16, num_random_directions=1, log_every=5,
                               plots=False, checkpoint_every=0, workdir=str(tmp_path / "run"))
    assert runner.run(cfg, progress=False).status == "finished"
    rows = records.read_metrics(tmp_path / "run")
    entry = rows[-1]["eos_entry_step"]
    assert entry is not None and 5 < entry < 55
    probed = [r["step"] for r in rows if "valley_distance" in r and "status" not in r]
    assert probed == [0, *range(entry, 60, 5)]
    assert "valley_distance" in rows[-1]   # and at the end
    assert all(r["probe_s_max_steps"] >= 16 * (1 - 1e-6) for r in rows if "probe_s_max" in r)


@pytest.mark.parametrize("s_max", [1e-3, 0.1, 10.0])
def test_gradient_excess_is_at_most_one_on_a_quadratic_at_any_range(x64, s_max):
    """C1 rule version 2 (`scaling.gradient_excess`): along every direction of a quadratic,
    ‖∇L(θ+su)‖ ≤ ‖∇L(θ)‖ + λ1·|s|, so the ratio is ≤ 1 whatever the probe range."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 6))
    hessian = a @ a.T
    lambda1 = float(np.linalg.eigvalsh(hessian)[-1])
    loss = lambda p: 0.5 * p["w"] @ jnp.asarray(hessian) @ p["w"]
    params = {"w": jnp.asarray(rng.normal(size=6))}
    grad_norm = float(jnp.linalg.norm(jax.grad(loss)(params)["w"]))
    top = np.linalg.eigh(hessian)[1][:, -1]
    excesses = []
    for direction in [top, rng.normal(size=6), rng.normal(size=6)]:
        probe = probes.line_probe(loss, params, {"w": jnp.asarray(direction)},
                                  jnp.linspace(-s_max, s_max, 33))
        excesses.append(scaling.gradient_excess(float(probe.grad_norm.max()), grad_norm,
                                                lambda1, s_max))
    assert max(excesses) <= 1 + 1e-12
    assert max(excesses) > 0.5     # along v1 the bound is nearly reached at the far end


def test_gradient_excess_grows_as_a_singular_point_comes_into_range(x64):
    """L = λ/2·x² − |x − c|^(1/2): the gradient is unbounded at x = c. At the same sharpness
    λ1 (measured at the iterate) and range, the ratio grows as c nears the probed segment."""
    lam, s_max = 2.0, 1.0
    excess = []
    for c in (1.5, 1.1, 1.02):
        loss = lambda p, c=c: 0.5 * lam * p["x"][0] ** 2 - jnp.sqrt(jnp.abs(p["x"][0] - c))
        params = {"x": jnp.zeros(1)}
        probe = probes.line_probe(loss, params, {"x": jnp.ones(1)},
                                  jnp.linspace(-s_max, s_max, 65))
        lambda1 = float(jax.hessian(loss)(params)["x"]["x"][0, 0])
        grad_norm = float(jnp.linalg.norm(jax.grad(loss)(params)["x"]))
        excess.append(scaling.gradient_excess(float(probe.grad_norm.max()), grad_norm,
                                              lambda1, s_max))
    assert excess[0] < excess[1] < excess[2] and excess[2] > 2
    assert np.isnan(scaling.gradient_excess(1.0, None, 2.0, 1.0))
