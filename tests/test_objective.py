import jax
import numpy as np
import pytest

from lossland import data, losses, models, objective


@pytest.fixture(scope="module")
def setup():
    x, y = data.load("mnist1d", 230)
    model = models.build_model("mlp", (40,), 10, width=16, depth=2, activation="tanh",
                               key=jax.random.key(0))
    return x, y, model


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
def test_chunked_equals_unchunked(setup, loss_name):
    x, y, model = setup
    per_example = losses.per_example_loss(loss_name)
    whole = objective.Objective(model.apply, per_example, objective.chunk_data(x, y, 1000))
    chunked = objective.Objective(model.apply, per_example, objective.chunk_data(x, y, 64))
    assert chunked.data.num_chunks == 4 and whole.data.num_chunks == 1  # 230 = 3·64 + 38
    l1, a1, g1 = whole.loss_accuracy_grad(model.params)
    l2, a2, g2 = chunked.loss_accuracy_grad(model.params)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    np.testing.assert_allclose(a1, a2)
    for leaf1, leaf2 in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(leaf1, leaf2, rtol=1e-4, atol=1e-6)
    # And both equal the plain mean loss on the unpadded arrays.
    direct = {"mse": losses.mse, "cross_entropy": losses.cross_entropy}[loss_name]
    np.testing.assert_allclose(l1, direct(model.apply(model.params, x), y), rtol=1e-5)


def test_padding_rows_contribute_nothing(setup):
    x, y, model = setup
    chunked = objective.chunk_data(x, y, 64)
    assert chunked.mask.sum() == 230 and chunked.x.shape[:2] == (4, 64)
    # Poison the padding: the loss must not change.
    poisoned = chunked.replace(x=chunked.x.at[3, 40:].set(1e6))
    obj = objective.Objective(model.apply, losses.per_example_loss("mse"), chunked)
    np.testing.assert_allclose(obj.loss(model.params),
                               objective.Objective(model.apply, losses.per_example_loss("mse"),
                                                   poisoned).loss(model.params), rtol=1e-6)


def test_chunk_rounds_up_to_device_multiple():
    x, y = np.zeros((10, 3), np.float32), np.zeros(10, np.int32)
    chunked = objective.chunk_data(x, y, 4, multiple_of=3)
    assert chunked.chunk_size == 6 and chunked.num_chunks == 2 and chunked.n == 10
    with pytest.raises(ValueError):
        objective.chunk_data(x, y, 0)
