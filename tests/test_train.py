import jax
import numpy as np

from lossland import data, losses, models, objective, train


def _setup(loss="mse"):
    x, y = data.load("mnist1d", 100)
    model = models.build_model("mlp", (40,), 10, width=8, depth=1, activation="relu",
                               key=jax.random.key(1))
    obj = objective.Objective(model.apply, losses.per_example_loss(loss),
                              objective.chunk_data(x, y, 64))
    return model, obj


def test_gd_step_is_params_minus_lr_grad():
    model, obj = _setup()
    lr = 0.3
    optimizer = train.make_optimizer("gd", lr)
    step = train.make_train_step(obj, optimizer)
    new_params, _, metrics = step(model.params, optimizer.init(model.params), obj.data)
    loss, _, grad = obj.loss_accuracy_grad(model.params)
    expected = jax.tree_util.tree_map(lambda p, g: p - lr * g, model.params, grad)
    for a, b in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics.loss, loss, rtol=1e-6)
    np.testing.assert_allclose(metrics.update_norm, lr * train.tree_norm(grad), rtol=1e-5)


def test_every_optimizer_decreases_the_loss():
    model, obj = _setup("cross_entropy")
    for name, lr in (("gd", 0.5), ("momentum", 0.1), ("adam", 0.01), ("sgd", 0.5)):
        optimizer = train.make_optimizer(name, lr)
        step = train.make_train_step(obj, optimizer)
        params, state = model.params, optimizer.init(model.params)
        for _ in range(20):
            params, state, _ = step(params, state, obj.data)
        assert obj.loss(params) < obj.loss(model.params), name


def test_sgd_reshuffles_each_epoch_deterministically():
    n, batch = 10, 3  # 3 batches per epoch, last partial batch dropped
    epoch0 = [train.minibatch_indices(7, s, n, batch) for s in range(3)]
    epoch1 = [train.minibatch_indices(7, s, n, batch) for s in range(3, 6)]
    flat0 = np.concatenate(epoch0)
    assert len(set(flat0)) == 9  # no repeats inside an epoch
    assert not np.array_equal(flat0, np.concatenate(epoch1))  # a new order next epoch
    again = [train.minibatch_indices(7, s, n, batch) for s in range(3)]
    np.testing.assert_array_equal(np.concatenate(again), flat0)  # same seed, same order
    other_seed = np.concatenate([train.minibatch_indices(8, s, n, batch) for s in range(3)])
    assert not np.array_equal(other_seed, flat0)
