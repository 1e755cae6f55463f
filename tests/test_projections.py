import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from conftest import run_module
from lossland import (ablation, checkpoints, curvature, data, losses, models, objective,
                      projections, train)


def _tiny(dtype=jnp.float32, n=30):
    """A tanh MLP 3-3-2 on a synthetic mixture: P = 20 parameters."""
    x, y = data.load("gaussian_mixture", n, input_dim=3, num_classes=2)
    model = models.build_model("mlp", (3,), 2, width=3, depth=1, activation="tanh",
                               key=jax.random.key(3), dtype=dtype)
    obj = objective.Objective(model.apply, losses.per_example_loss("mse"),
                              objective.chunk_data(x, y, 64, dtype=dtype))
    return model, obj


def _state_with(vectors, kind, k=None):
    rows = vectors.shape[0]
    k = rows if k is None else k
    mask = jnp.ones((rows,), vectors.dtype) if k else jnp.zeros((rows,), vectors.dtype)
    return projections.SubspaceProjectionState(
        vectors=vectors, eigenvalues=jnp.zeros((rows,)), mask=mask,
        count=jnp.zeros((), jnp.int32), num_refreshes=jnp.zeros((), jnp.int32),
        num_matvecs=jnp.zeros((), jnp.int32), kind=kind, k=k)


def _run(obj, optimizer, params, steps):
    step = train.make_train_step(obj, optimizer)
    state = optimizer.init(params)
    trajectory = []
    for _ in range(steps):
        params, state, _ = step(params, state, obj.data)
        trajectory.append(ravel_pytree(params)[0])
    return trajectory, state


def test_projectors_are_idempotent_complementary_and_orthogonal():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        V = jnp.asarray(np.linalg.qr(rng.normal(size=(50, 4)))[0].T)  # (4, 50) orthonormal rows
        g = jnp.asarray(rng.normal(size=50))
        dom, bulk = _state_with(V, "dom"), _state_with(V, "bulk")
        top, rest = projections.apply_projection(g, dom), projections.apply_projection(g, bulk)
        np.testing.assert_allclose(projections.apply_projection(top, dom), top, atol=1e-12)
        np.testing.assert_allclose(projections.apply_projection(rest, bulk), rest, atol=1e-12)
        np.testing.assert_allclose(top + rest, g, atol=1e-12)
        assert abs(float(jnp.vdot(top, rest))) < 1e-12
        np.testing.assert_allclose(projections.apply_projection(top, bulk), 0, atol=1e-12)
        assert float(jnp.linalg.norm(top)) > 0.1 and float(jnp.linalg.norm(rest)) > 0.1
        # Masked rows (the k = 0 buffer) do not enter the projector.
        empty_dom, empty_bulk = _state_with(V[:1], "dom", k=0), _state_with(V[:1], "bulk", k=0)
        np.testing.assert_array_equal(projections.apply_projection(g, empty_dom), 0)
        np.testing.assert_array_equal(projections.apply_projection(g, empty_bulk), g)


def test_dom_with_k_equal_p_is_gd():
    with jax.enable_x64(True):
        model, obj = _tiny(jnp.float64)
        P = model.num_params
        gd, _ = _run(obj, train.make_optimizer("gd", 0.5), model.params, 4)
        dom_opt = train.make_optimizer("gd", 0.5, extra=projections.make_projection(
            "dom", k=P, refresh_every=2, num_iters=P))
        dom, state = _run(obj, dom_opt, model.params, 4)
        for a, b in zip(gd, dom):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-9)
        assert float(jnp.linalg.norm(gd[-1] - ravel_pytree(model.params)[0])) > 1e-3
        assert int(projections.find_projection_states(state)[0].num_refreshes) == 2


@pytest.mark.parametrize("name", ["gd", "momentum", "adam"])
def test_bulk_with_k0_is_the_base_optimizer_and_dom_with_k0_stands_still(name):
    model, obj = _tiny()
    lr = {"gd": 0.5, "momentum": 0.1, "adam": 0.01}[name]
    plain, _ = _run(obj, train.make_optimizer(name, lr), model.params, 5)
    bulk_opt = train.make_optimizer(name, lr, extra=projections.project_out_top_subspace(0, 1))
    bulk, state = _run(obj, bulk_opt, model.params, 5)
    for a, b in zip(plain, bulk):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert projections.find_projection_states(state)[0].num_refreshes == 0
    dom_opt = train.make_optimizer(name, lr, extra=projections.project_onto_top_subspace(0, 1))
    dom, _ = _run(obj, dom_opt, model.params, 2)
    np.testing.assert_array_equal(dom[-1], ravel_pytree(model.params)[0])


def test_refresh_exactly_every_r_steps_from_the_switch_step():
    model, obj = _tiny()
    R, switch = 3, 2
    projection = projections.make_projection("dom", k=2, refresh_every=R, switch_step=switch,
                                             num_iters=12)
    optimizer = train.make_optimizer("gd", 0.5, extra=projection)
    step = train.make_train_step(obj, optimizer)
    gd_step = train.make_train_step(obj, train.make_optimizer("gd", 0.5))
    params, state = model.params, optimizer.init(model.params)
    gd_params, gd_state = model.params, train.make_optimizer("gd", 0.5).init(model.params)
    previous = projections.find_projection_states(state)[0].vectors
    refreshed_at = []
    for t in range(11):
        params, state, _ = step(params, state, obj.data)
        gd_params, gd_state, _ = gd_step(gd_params, gd_state, obj.data)
        proj = projections.find_projection_states(state)[0]
        assert int(proj.count) == t + 1
        if not np.array_equal(proj.vectors, previous):
            refreshed_at.append(t)
        previous = proj.vectors
        expected = len([c for c in range(switch, t + 1) if (c - switch) % R == 0])
        assert int(proj.num_refreshes) == expected, t
        if t < switch:  # identity before the switch step
            np.testing.assert_allclose(ravel_pytree(params)[0], ravel_pytree(gd_params)[0],
                                       rtol=1e-6, atol=1e-7)
    assert refreshed_at == [2, 5, 8]
    assert not np.allclose(ravel_pytree(params)[0], ravel_pytree(gd_params)[0])
    V = projections.find_projection_states(state)[0].vectors
    np.testing.assert_allclose(V @ V.T, np.eye(2), atol=1e-4)


def test_refresh_warm_starts_from_the_current_eigenvectors(monkeypatch):
    seen = []

    def fake_lanczos(matvec, v0, k, num_iters, *, tol=None, init_vectors=None, which="largest"):
        seen.append(init_vectors.shape)
        P = v0.shape[0]
        cold = jnp.all(init_vectors == 0)  # the real solver drops zero start rows
        # cold: the first k axes; warm: the given vectors shifted by one axis
        vectors = jnp.where(cold, jnp.eye(k, P, dtype=v0.dtype), jnp.roll(init_vectors, 1, 1))
        return type("R", (), {"eigenvalues": jnp.arange(k, 0, -1.0), "eigenvectors": vectors,
                              "residuals": jnp.zeros(k), "num_matvecs": 0})()

    monkeypatch.setattr(curvature, "lanczos_top_k", fake_lanczos)
    state = projections.project_onto_top_subspace(2, 1).init(jnp.zeros(5))
    refresh = jax.jit(lambda s: projections.refresh_projections(s, lambda v: v))
    state = refresh(state)
    np.testing.assert_array_equal(state.vectors, jnp.eye(2, 5))
    state = refresh(state)  # count did not move (no update): due again, now warm
    np.testing.assert_array_equal(state.vectors, jnp.roll(jnp.eye(2, 5), 1, axis=1))
    assert int(state.num_refreshes) == 2
    assert seen == [(2, 5)]  # one Lanczos in the compiled program serves both


def test_first_refresh_is_a_correct_cold_start():
    # The zero start block of the first refresh must give the true top eigenvectors.
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        Q = np.linalg.qr(rng.normal(size=(30, 30)))[0]
        lam = np.linspace(-1.0, 5.0, 30)
        H = jnp.asarray(Q @ np.diag(lam) @ Q.T)
        state = projections.project_onto_top_subspace(3, 1, num_iters=30).init(jnp.zeros(30))
        state = jax.jit(lambda s: projections.refresh_projections(s, lambda v: H @ v))(state)
        np.testing.assert_allclose(state.eigenvalues, lam[::-1][:3], rtol=1e-8)
        top = Q[:, ::-1][:, :3]
        np.testing.assert_allclose(np.abs(state.vectors @ top), np.eye(3), atol=1e-6)


def test_attribution_adds_up_on_a_separable_quadratic():
    # L(θ) = mean_i ½ Σ_j (a_j θ_j − t_ij)², with H = diag(a²): P onto top eigenvectors
    # commutes with H, so ΔL_top + ΔL_bulk = ΔL_full exactly.
    from lossland import tracking
    with jax.enable_x64(True):
        lam = np.array([10.0, 5.0, 3.0, 1.0, 0.5, 0.1])
        n, D = 8, lam.size
        x = np.tile(np.sqrt(lam), (n, 1))
        y = np.arange(n) % D
        obj = objective.Objective(lambda p, x: x * p["theta"], losses.per_example_loss("mse"),
                                  objective.chunk_data(x, y, 8, dtype=jnp.float64))
        params = {"theta": jnp.asarray(np.random.default_rng(1).normal(size=D))}
        lr = 0.15
        tracker = tracking.make_tracker(obj, k=2, num_iters=D, tol=None, track_gn=False, lr=lr)
        row, V = tracker(params, obj.data, jax.random.key(0), None)
        np.testing.assert_allclose(row["eigenvalues"], lam[:2], rtol=1e-8)
        np.testing.assert_allclose(row["delta_loss_top"] + row["delta_loss_bulk"],
                                   row["delta_loss_full"], rtol=1e-9)
        assert row["delta_loss_top"] < 0 and row["delta_loss_bulk"] < 0
        # The same split through the Dom/Bulk optimizers (one step each).
        deltas = {None: float(row["delta_loss_full"])}
        for kind in ("dom", "bulk"):
            extra = kind and projections.make_projection(kind, k=2, refresh_every=1, num_iters=D)
            (theta,), _ = _run(obj, train.make_optimizer("gd", lr, extra=extra), params, 1)
            deltas[kind] = float(obj.loss({"theta": theta}) - obj.loss(params))
        np.testing.assert_allclose(deltas["dom"], row["delta_loss_top"], rtol=1e-8)
        np.testing.assert_allclose(deltas["bulk"], row["delta_loss_bulk"], rtol=1e-8)
        np.testing.assert_allclose(deltas["dom"] + deltas["bulk"], deltas[None], rtol=1e-9)


@pytest.mark.parametrize("k", [0, 2])
def test_projection_state_checkpoints_with_orbax(tmp_path, k):
    model, obj = _tiny()
    optimizer = train.make_optimizer("gd", 0.5, extra=projections.make_projection(
        "bulk", k=k, refresh_every=2, num_iters=10))
    step = train.make_train_step(obj, optimizer)
    params, opt_state = model.params, optimizer.init(model.params)
    for _ in range(3):
        params, opt_state, _ = step(params, opt_state, obj.data)
    manager = checkpoints.CheckpointManager(tmp_path)
    state = checkpoints.initial_state(params, opt_state, 1).replace(step=3)
    manager.save(state)
    manager.wait()
    template = checkpoints.initial_state(model.params, optimizer.init(model.params), 1)
    restored = manager.restore_latest(template)
    manager.close()
    saved, back = (projections.find_projection_states(s.opt_state)[0] for s in (state, restored))
    assert type(back) is projections.SubspaceProjectionState and back.k == k
    for name in ("vectors", "mask", "count", "num_refreshes", "num_matvecs"):
        np.testing.assert_array_equal(getattr(back, name), getattr(saved, name))
    # The restored state continues exactly as the original.
    a = step(params, opt_state, obj.data)[0]
    b = step(restored.params, restored.opt_state, obj.data)[0]
    np.testing.assert_array_equal(ravel_pytree(a)[0], ravel_pytree(b)[0])


@pytest.mark.slow   # the whole subspace experiment, about 60 s on 2 cores (issue 22)
def test_smoke_preset_runs_end_to_end(tmp_path):
    workdir = tmp_path / "subspace"
    result = run_module("experiments.subspace", "--preset=smoke", f"--workdir={workdir}",
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert list(summary) == ["gd", "dom", "bulk"]
    for entry in summary.values():
        assert entry["status"] == "finished" and entry["final_loss"] is not None
        assert 0.0 <= entry["mean_chi_k"] <= 1.0
        assert entry["num_tracked_steps"] == 4  # steps 0, 5, 10, 15 of 20: every tracked row
    starts = {entry["start_loss"] for entry in summary.values()}
    assert len(starts) == 1  # one shared start
    assert summary["gd"]["decrease_vs_baseline"] == pytest.approx(1.0)
    experiment = json.loads((workdir / "experiment.json").read_text())
    assert experiment["start"]["kind"] == "eos" and experiment["start"]["step"] > 0
    verdict = (workdir / "verdict.md").read_text()
    assert "C4" in verdict and any(word in verdict for word in
                                   ("reproduced", "undetermined"))
    assert (workdir / "loss_overlay.png").stat().st_size > 1000
    rows = [json.loads(line) for line in
            (workdir / "variants" / "bulk" / "metrics.jsonl").read_text().splitlines()]
    assert any("delta_loss_bulk" in r and "cum_delta_top" in r for r in rows)
    # A second run into the same workdir is refused without --overwrite.
    again = run_module("experiments.subspace", "--preset=smoke", f"--workdir={workdir}")
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.slow   # two seeds of the smoke experiment, about 3 min on 2 loaded cores
def test_seeds_run_resume_and_judge_across_seeds(tmp_path):
    workdir = tmp_path / "seeds"
    first = run_module("experiments.subspace", "--preset=smoke", "--seeds=0",
                       f"--workdir={workdir}", timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    kept = (workdir / "seed_0" / "experiment.json").stat().st_mtime_ns
    # What a kill during seed 1 leaves: a seed folder without experiment.json.
    (workdir / "seed_1" / "warmup").mkdir(parents=True)
    (workdir / "seed_1" / "warmup" / "metrics.jsonl").write_text('{"step": 0}\n')
    second = run_module("experiments.subspace", "--preset=smoke", "--seeds=0,1",
                        f"--workdir={workdir}", timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "seed 0: finished before, kept" in second.stderr
    assert (workdir / "seed_0" / "experiment.json").stat().st_mtime_ns == kept
    for seed in (0, 1):
        experiment = json.loads((workdir / f"seed_{seed}" / "experiment.json").read_text())
        assert experiment["seed"] == seed and experiment["start"]["kind"] == "eos"
        assert (workdir / f"seed_{seed}" / "verdict.md").exists()
    summary = json.loads((workdir / "c4_summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["preset"] == "smoke"
    starts = [json.loads((workdir / f"seed_{s}" / "summary.json").read_text())["gd"]["start_loss"]
              for s in (0, 1)]
    assert starts[0] != starts[1]   # each seed its own warm-up point
    (group,) = summary["groups"]
    assert [c["name"] for c in group["criteria"]] == list(ablation.DIRECTIONS)
    for c in group["criteria"]:
        assert len(c["values"]) == len(c["margins"]) == len(c["passes"]) == 2
        for value, margin, passes in zip(c["values"], c["margins"], c["passes"]):
            if value is not None:
                assert margin == pytest.approx(ablation.signed_margin(value, c["threshold"],
                                                                      c["direction"]))
                assert passes == (margin > 0 or (margin == 0 and c["direction"] == ">="))
        assert c["outcome"] in ("holds", "fails", "split", "undetermined")
    assert group["verdict"] == ablation.verdict_across_seeds(group["criteria"])
    assert "| seed 0 | seed 1 |" in (workdir / "verdict.md").read_text()
    assert (workdir / "loss_seeds.png").stat().st_size > 1000
    # A finished seed with other settings is refused, naming the difference.
    changed = run_module("experiments.subspace", "--preset=smoke", "--seeds=0,1", "--steps=10",
                         f"--workdir={workdir}")
    assert changed.returncode == 2 and "steps: 20 there, 10 now" in changed.stderr
