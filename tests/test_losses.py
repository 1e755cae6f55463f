import jax.numpy as jnp
import numpy as np

from lossland import losses


def test_mse_matches_hand_computed_value():
    outputs = jnp.array([[1.0, 0.0, 0.0], [0.5, 0.5, 2.0]])
    labels = jnp.array([0, 2])
    # Example 1: exact → 0. Example 2: ½(0.25 + 0.25 + 1) = 0.75. Mean: 0.375.
    np.testing.assert_allclose(losses.mse(outputs, labels), 0.375, rtol=1e-6)


def test_cross_entropy_matches_hand_computed_value():
    outputs = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    labels = jnp.array([0, 1])
    # −log ½ and −log ¼ → mean = (log 2 + log 4)/2 = 1.5 log 2.
    np.testing.assert_allclose(losses.cross_entropy(outputs, labels), 1.5 * np.log(2.0),
                               rtol=1e-6)


def test_losses_are_means_not_sums():
    outputs = jnp.zeros((10, 4))
    labels = jnp.zeros(10, jnp.int32)
    np.testing.assert_allclose(losses.mse(outputs, labels), 0.5, rtol=1e-6)
    np.testing.assert_allclose(losses.cross_entropy(outputs, labels), np.log(4.0), rtol=1e-6)
