"""Models with normalization, in float64 against dense oracles written out by hand.

The training-mode full-batch loss of a BatchNorm network over chunks (ghost batches):

    L(θ) = (1/n) Σ_c Σ_{i ∈ c} ℓ(f(θ; x_i, μ_c(θ), σ²_c(θ)), y_i),

μ_c, σ²_c the batch statistics of chunk c. The kernels' HVPs must be those of
this L, which `oracle_loss` writes out without Flax; the eval-mode surrogate
(running statistics) has another Hessian.
"""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from lossland import curvature, data as data_lib, losses, models, records
from lossland.objective import Objective, chunk_data, flat_matvec, full_batch_model_state

THIS = Path(__file__).resolve()
MOMENTUM, N, CLASSES = 0.9, 12, 3
EPS = {"batch": 1e-5, "layer": 1e-6}   # Flax's BatchNorm and LayerNorm defaults


class BNNet(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(5, name="l1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=MOMENTUM, name="bn")(x)
        return nn.Dense(self.num_classes, name="l2")(jnp.tanh(x))


class NnxBNNet(nnx.Module):
    def __init__(self, din, num_classes, rngs):
        self.l1 = nnx.Linear(din, 5, rngs=rngs)
        self.bn = nnx.BatchNorm(5, momentum=MOMENTUM, rngs=rngs)
        self.l2 = nnx.Linear(5, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.bn(self.l1(x))))


class LNNet(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(name="ln")(nn.Dense(5, name="l1")(x))
        return nn.Dense(self.num_classes, name="l2")(jnp.tanh(x))


def make_bn(input_shape, num_classes):
    return BNNet(num_classes)


def make_nnx_bn(input_shape, num_classes, rngs):
    return NnxBNNet(input_shape[0], num_classes, rngs)


def make_ln(input_shape, num_classes):
    return LNNet(num_classes)


# ----------------------------------------------------------------------------
# Oracles, without Flax
# ----------------------------------------------------------------------------

def _normalize(h, mean, var, eps=EPS["batch"]):
    return (h - mean) / jnp.sqrt(var + eps)


def oracle_forward(p, x, norm):
    h = x @ p["l1"]["kernel"] + p["l1"]["bias"]
    if norm == "batch":   # training mode: the statistics of the batch given
        h = _normalize(h, h.mean(0), h.var(0)) * p["bn"]["scale"] + p["bn"]["bias"]
    else:                 # layer: per example, over features
        h = _normalize(h, h.mean(-1, keepdims=True), h.var(-1, keepdims=True), EPS["layer"])
        h = h * p["ln"]["scale"] + p["ln"]["bias"]
    return jnp.tanh(h) @ p["l2"]["kernel"] + p["l2"]["bias"]


def oracle_loss(p, x, y, chunk, norm):
    """Mean over examples of ½‖z − onehot(y)‖², each chunk a batch of its own."""
    total = 0.0
    for lo in range(0, x.shape[0], chunk):
        z = oracle_forward(p, x[lo:lo + chunk], norm)
        total += 0.5 * jnp.sum((z - jax.nn.one_hot(y[lo:lo + chunk], CLASSES)) ** 2)
    return total / x.shape[0]


def dense_hessian(objective, params):
    """H from P HVPs on the basis vectors: the kernels' Hessian, column by column."""
    flat = ravel_pytree(params)[0]
    matvec = jax.jit(flat_matvec(objective.hvp_fn, params, objective.data))
    return jax.vmap(matvec)(jnp.eye(flat.shape[0], dtype=flat.dtype))


def oracle_hessian(params, x, y, chunk, norm):
    flat, unravel = ravel_pytree(params)
    return jax.jit(jax.hessian(lambda f: oracle_loss(unravel(f), x, y, chunk, norm)))(flat)


def _setup(factory: str, chunk: int):
    x, y = data_lib.load("gaussian_mixture", N, seed=0, input_dim=4, num_classes=CLASSES)
    model = models.build_model(f"{THIS}:{factory}", (4,), CLASSES, key=jax.random.key(1),
                               dtype=jnp.float64)
    # Away from init (BatchNorm scale 1, bias 0): a generic point.
    leaves, treedef = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [
        p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
    data = chunk_data(x, y, chunk, dtype=jnp.float64)
    objective = Objective(model.apply, losses.per_example_loss("mse"), data)
    return model, params, objective, jnp.asarray(x, jnp.float64), jnp.asarray(y)


@pytest.mark.parametrize("chunk", [N, 4])   # one chunk; three ghost batches
def test_batchnorm_train_mode_hessian_matches_dense_oracle(chunk):
    with jax.enable_x64(True):
        model, params, objective, x, y = _setup("make_bn", chunk)
        assert model.has_state and set(model.state) == {"batch_stats"}
        np.testing.assert_allclose(objective.loss(params),
                                   oracle_loss(params, x, y, chunk, "batch"), rtol=1e-12)
        H, H_oracle = dense_hessian(objective, params), oracle_hessian(params, x, y, chunk,
                                                                       "batch")
        scale = jnp.max(jnp.abs(H_oracle))
        assert float(jnp.max(jnp.abs(H - H_oracle))) < 1e-10 * scale
        # Another chunking is another function: ghost batches are part of the definition.
        other = oracle_hessian(params, x, y, 6 if chunk == N else N, "batch")
        assert float(jnp.max(jnp.abs(H - other))) > 1e-3 * scale
        # The eval-mode surrogate (running statistics, as PyHessian uses) is another one too.
        flat, unravel = ravel_pytree(params)
        eval_loss = lambda f: jnp.mean(losses.per_example_loss("mse")(
            model.evaluate(unravel(f), model.state, x), y))
        H_eval = jax.jit(jax.hessian(eval_loss))(flat)
        assert float(jnp.max(jnp.abs(H - H_eval))) > 1e-3 * scale
        # Lanczos on the kernels' HVPs finds the oracle's top eigenvalues.
        top = curvature.lanczos_top_k(flat_matvec(objective.hvp_fn, params, objective.data),
                                      jnp.ones_like(flat), 3, 30)
        np.testing.assert_allclose(top.eigenvalues, jnp.linalg.eigh(H_oracle)[0][::-1][:3],
                                   rtol=1e-8)


def test_nnx_batchnorm_hessian_equals_its_linen_twin():
    with jax.enable_x64(True):
        nnx_model, params, nnx_objective, x, y = _setup("make_nnx_bn", 4)
        linen_model, linen_params, linen_objective, _, _ = _setup("make_bn", 4)
        # The twins name their layers alike, so NNX params are valid linen params.
        assert jax.tree_util.tree_structure(params) == \
            jax.tree_util.tree_structure(linen_params)
        H_nnx, H_linen = dense_hessian(nnx_objective, params), dense_hessian(linen_objective,
                                                                             params)
        H_oracle = oracle_hessian(params, x, y, 4, "batch")
        scale = jnp.max(jnp.abs(H_oracle))
        assert float(jnp.max(jnp.abs(H_nnx - H_linen))) < 1e-12 * scale
        assert float(jnp.max(jnp.abs(H_nnx - H_oracle))) < 1e-10 * scale


@pytest.mark.parametrize("chunk", [N, 4])
def test_layernorm_hessian_matches_dense_oracle(chunk):
    with jax.enable_x64(True):
        model, params, objective, x, y = _setup("make_ln", chunk)
        assert not model.has_state
        H_oracle = oracle_hessian(params, x, y, N, "layer")   # per example: chunks do not matter
        scale = jnp.max(jnp.abs(H_oracle))
        assert float(jnp.max(jnp.abs(dense_hessian(objective, params) - H_oracle))) \
            < 1e-10 * scale


@pytest.mark.parametrize("factory", ["make_bn", "make_nnx_bn"])
def test_running_statistics_are_a_side_output_and_eval_uses_them(factory):
    with jax.enable_x64(True):
        model, params, objective, x, y = _setup(factory, 4)
        new_state = full_batch_model_state(model.update_state, params, model.state,
                                           objective.data)
        h = x @ params["l1"]["kernel"] + params["l1"]["bias"]
        chunks = h.reshape(3, 4, 5)
        # One update per step with the mean of the three ghost batches' statistics.
        mean = (1 - MOMENTUM) * chunks.mean(1).mean(0)
        var = MOMENTUM * 1.0 + (1 - MOMENTUM) * chunks.var(1).mean(0)
        stats = new_state["batch_stats"]["bn"] if factory == "make_bn" else new_state["bn"]
        np.testing.assert_allclose(stats["mean"], mean, rtol=1e-12)
        np.testing.assert_allclose(stats["var"], var, rtol=1e-12)
        # Evaluation normalizes with them, not with the batch's own statistics.
        expected = jnp.tanh(_normalize(h, mean, var) * params["bn"]["scale"]
                            + params["bn"]["bias"]) @ params["l2"]["kernel"] + \
            params["l2"]["bias"]
        np.testing.assert_allclose(model.evaluate(params, new_state, x), expected, rtol=1e-10)
        # Training mode normalizes with the batch's statistics, whatever the running ones.
        np.testing.assert_allclose(model.apply(params, x), oracle_forward(params, x, "batch"),
                                   rtol=1e-12)


# ----------------------------------------------------------------------------
# The running statistics along training: the step carries them, checkpoints keep them
# ----------------------------------------------------------------------------

def _flax_ghost_batch_update(params, batch_stats, x, chunk):
    """The oracle of one step's running statistics, with Flax itself: each chunk through
    `BNNet.apply(..., train=True, mutable=['batch_stats'])` from the same running stats,
    and the mean of the chunks' results (one update per step, see
    `objective.full_batch_model_state`)."""
    module = BNNet(CLASSES)
    updates = [module.apply({"params": params, "batch_stats": batch_stats}, x[lo:lo + chunk],
                            train=True, mutable=["batch_stats"])[1]["batch_stats"]
               for lo in range(0, x.shape[0], chunk)]
    return jax.tree_util.tree_map(lambda *s: sum(s) / len(s), *updates)


@pytest.mark.parametrize("chunk", [N, 4])   # one batch; three ghost batches
def test_gd_steps_carry_running_statistics_as_flax_computes_them(chunk):
    from lossland import train
    lr, steps = 0.2, 3
    with jax.enable_x64(True):
        model, params, objective, x, y = _setup("make_bn", chunk)
        gd = train.make_optimizer("gd", lr)
        step = train.make_train_step(objective, gd, update_state=model.update_state)
        plain = train.make_train_step(objective, gd)
        p, opt_state, state = params, gd.init(params), model.state
        p_oracle, stats_oracle = params, model.state["batch_stats"]
        sequential = model.state["batch_stats"]   # C updates in turn: not the rule
        for _ in range(steps):
            p_plain, _, metrics_plain = plain(p, opt_state, objective.data)
            p, opt_state, metrics, state = step(p, opt_state, objective.data, state)
            # The running statistics are a side output: the step is the stateless one.
            np.testing.assert_allclose(metrics.loss, metrics_plain.loss, rtol=1e-13)
            for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(p_plain)):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
            for lo in range(0, N, chunk):
                sequential = BNNet(CLASSES).apply(
                    {"params": p_oracle, "batch_stats": sequential}, x[lo:lo + chunk],
                    train=True, mutable=["batch_stats"])[1]["batch_stats"]
            stats_oracle = _flax_ghost_batch_update(p_oracle, stats_oracle, x, chunk)
            grad = jax.grad(oracle_loss)(p_oracle, x, y, chunk, "batch")
            p_oracle = jax.tree_util.tree_map(lambda a, g: a - lr * g, p_oracle, grad)
        assert set(state) == {"batch_stats"}
        for name in ("mean", "var"):
            np.testing.assert_allclose(state["batch_stats"]["bn"][name],
                                       stats_oracle["bn"][name], rtol=1e-12)
            moved = state["batch_stats"]["bn"][name] - model.state["batch_stats"]["bn"][name]
            assert float(jnp.min(jnp.abs(moved))) > 1e-3   # they did move
        for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(p_oracle)):
            np.testing.assert_allclose(a, b, rtol=1e-10)
        gap = jnp.abs(state["batch_stats"]["bn"]["mean"] - sequential["bn"]["mean"])
        if chunk == N:   # one chunk: exactly Flax's own train-mode update
            assert float(jnp.max(gap)) < 1e-14
        else:            # three: the mean of the ghost batches, not three updates in turn
            assert float(jnp.max(gap)) > 1e-3
        # Nor do the running statistics change the Hessian being measured: the training-mode
        # loss with the initial and with the trained statistics has the same HVP, bitwise.
        v = jax.tree_util.tree_map(jnp.ones_like, p)
        hvps = []
        for stats in (model.state["batch_stats"], state["batch_stats"]):
            apply = lambda q, xc, s=stats: BNNet(CLASSES).apply(
                {"params": q, "batch_stats": s}, xc, train=True, mutable=["batch_stats"])[0]
            hvps.append(Objective(apply, losses.per_example_loss("mse"), objective.data).hvp(
                p, v))
        for a, b in zip(*map(jax.tree_util.tree_leaves, hvps)):
            np.testing.assert_array_equal(a, b)


BN_RUN = dict(dataset="gaussian_mixture", input_dim=4, num_classes=CLASSES, n_train=N,
              chunk_size=4, model=f"{THIS}:make_bn", lr=0.2, log_every=1, plots=False,
              track_every=0, checkpoint_every=3)


def _saved_state(exp, workdir, step):
    """The driver's checkpoint of `step` (template: exp's build)."""
    from lossland import checkpoints
    template = checkpoints.initial_state(exp.model.params, exp.optimizer.init(exp.model.params),
                                         exp.cfg.track_k, model_state=exp.model.state)
    manager = checkpoints.CheckpointManager(workdir)
    state = manager.restore(template, step)
    manager.close()
    return state


def _saved_model_state(exp, workdir, step):
    """The running statistics in the driver's checkpoint of `step`."""
    return _saved_state(exp, workdir, step).model_state


def _saved_params(exp, workdir, step):
    return _saved_state(exp, workdir, step).params


def test_driver_checkpoints_running_statistics_and_resumes_exactly(tmp_path):
    """float32 in-process (x64 is process-wide): a BatchNorm run stopped at step 3 and
    resumed to 6 gives the uninterrupted run's records and running statistics, bitwise,
    and those are the train step's own, step after step."""
    from lossland import config as config_lib, experiment, runner, train
    straight = config_lib.RunConfig(**BN_RUN, steps=6, n_test=12, eval_every=3,
                                    workdir=str(tmp_path / "straight"))
    split = straight.replace(workdir=str(tmp_path / "split"))
    assert runner.run(straight, progress=False).status == "finished"
    assert runner.run(split.replace(steps=3), progress=False).status == "finished"
    assert runner.run(split.replace(resume=True), progress=False).status == "finished"
    rows = lambda cfg: [{k: v for k, v in r.items() if k not in runner.TIMING_KEYS}
                        for r in records.read_metrics(cfg.workdir)]
    assert rows(split) == rows(straight) and len(rows(straight)) == 7
    exp = experiment.build_experiment(straight)
    saved = _saved_model_state(exp, straight.workdir, 6)
    resumed = _saved_model_state(exp, split.workdir, 6)
    for a, b in zip(*map(jax.tree_util.tree_leaves, (saved, resumed))):
        np.testing.assert_array_equal(a, b)
    # The same six steps by hand, through the step the driver builds.
    step = train.make_train_step(exp.objective, exp.optimizer,
                                 update_state=exp.model.update_state)
    p, opt_state, state = exp.model.params, exp.optimizer.init(exp.model.params), exp.model.state
    for _ in range(6):
        p, opt_state, _, state = step(p, opt_state, exp.objective.data, state)
    for a, b in zip(*map(jax.tree_util.tree_leaves, (saved, state))):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(saved["batch_stats"]["bn"]["mean"],
                           exp.model.state["batch_stats"]["bn"]["mean"])
    # Eval uses them: the final row's test metrics are the eval-mode loss with the running
    # statistics at step 6 (--n_test, --eval_every), not the initial ones.
    final = records.read_metrics(straight.workdir)[-1]
    assert [r["step"] for r in records.read_metrics(straight.workdir)
            if "test_loss" in r] == [0, 3, 6]
    evaluate = experiment.make_evaluator(exp)
    loss, accuracy = evaluate(_saved_params(exp, straight.workdir, 6), saved)
    assert final["test_loss"] == pytest.approx(float(loss), rel=1e-6)
    assert final["test_accuracy"] == pytest.approx(float(accuracy))
    initial_loss, _ = evaluate(_saved_params(exp, straight.workdir, 6), exp.model.state)
    assert abs(float(initial_loss) - final["test_loss"]) > 1e-4 * abs(final["test_loss"])


@pytest.mark.slow   # two tracked driver runs (the stream's cold start compiles): ~35 s loaded
def test_stream_tracker_run_carries_the_same_running_statistics(tmp_path):
    """--tracker=stream's fused step has no model state: a pass of its own updates it, from
    the same chunks, so its checkpoint holds what the plain step's run holds."""
    from lossland import config as config_lib, experiment, runner
    tracked = dict(BN_RUN, steps=3, track_every=1, track_k=1, lanczos_iters=8)
    stream = config_lib.RunConfig(**tracked, tracker="stream", workdir=str(tmp_path / "stream"))
    plain = stream.replace(tracker="lanczos", workdir=str(tmp_path / "plain"))
    for cfg in (stream, plain):
        assert runner.run(cfg, progress=False).status == "finished"
    exp = experiment.build_experiment(plain)
    got, expected = (_saved_model_state(exp, cfg.workdir, 3) for cfg in (stream, plain))
    for a, b in zip(*map(jax.tree_util.tree_leaves, (got, expected))):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    assert not np.allclose(got["batch_stats"]["bn"]["var"],
                           exp.model.state["batch_stats"]["bn"]["var"])


def test_a_checkpoint_from_before_model_state_still_restores(tmp_path):
    """Checkpoints of stateless runs saved before TrainState had model_state resume."""
    import orbax.checkpoint as ocp
    from lossland import checkpoints
    state = checkpoints.initial_state({"w": jnp.arange(3.0)}, (), 1).replace(step=5)
    saved = checkpoints._to_saveable(state)
    manager = checkpoints.CheckpointManager(tmp_path)
    manager._manager.save(5, args=ocp.args.StandardSave(
        {name: getattr(saved, name) for name in saved.__dataclass_fields__
         if name != "model_state"}))
    manager.close()
    manager = checkpoints.CheckpointManager(tmp_path)   # a fresh one, as a resume has
    restored = manager.restore_latest(state)
    manager.close()
    assert restored.step == 5 and restored.model_state == {}
    for a, b in zip(*map(jax.tree_util.tree_leaves, (restored, state))):
        np.testing.assert_array_equal(a, b)
    # A BatchNorm run's checkpoint from before then has no running statistics: refused,
    # with a message that says what to do, not orbax's structure error.
    stateful = state.replace(model_state={"batch_stats": {"mean": jnp.zeros(2)}})
    manager = checkpoints.CheckpointManager(tmp_path)
    with pytest.raises(checkpoints.CheckpointMismatch, match="--overwrite"):
        manager.restore_latest(stateful)
    manager.close()


def test_padding_rows_never_reach_batch_statistics():
    """A BatchNorm run is refused where a chunk or an SGD minibatch would be padded: the
    minibatch is one chunk padded to a multiple of the device count (`sharding.MinibatchSource`),
    so --batch_size must be such a multiple (checked for 4 devices without needing them)."""
    from lossland import config as config_lib, experiment

    cfg = config_lib.RunConfig(n_train=96, chunk_size=48, optimizer="sgd", batch_size=30,
                               model="resnet", norm="batch")
    assert experiment.padding_problem(cfg, devices=1) is None
    assert experiment.padding_problem(cfg.replace(batch_size=32), devices=4) is None
    problem = experiment.padding_problem(cfg, devices=4)
    assert "--batch_size=30" in problem and "multiple of 4" in problem
    assert experiment.padding_problem(cfg.replace(optimizer="gd"), devices=4) is None
    problem = experiment.padding_problem(cfg.replace(chunk_size=40), devices=1)
    assert "--chunk_size=40" in problem and "--n_train=96" in problem
