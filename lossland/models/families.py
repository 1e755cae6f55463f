"""The built-in model families (linen): MLP and CNN, and their factories.

The factories `make_mlp` and `make_cnn` follow the plug-in convention
(`factory(input_shape=..., num_classes=..., **model_kwargs) -> Module`), so
`--model=lossland.models:make_mlp --model_kwargs='{"width": 16}'` builds the
same network, with the same initial params, as `--model=mlp --width=16`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "tanh": jnp.tanh,
    "gelu": nn.gelu,
    "softplus": nn.softplus,
    "elu": nn.elu,
}


class MLP(nn.Module):
    """`depth` hidden Dense layers of `width` units, then a linear readout."""
    width: int
    depth: int
    num_classes: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        x = x.reshape(x.shape[0], -1)
        for _ in range(self.depth):
            x = act(nn.Dense(self.width)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """`depth` conv blocks (conv → activation → 2× average pool), then a linear readout.

    Rank-2 inputs (n, length) get 1-D convolutions over length (MNIST-1D);
    rank-3 (n, h, w) and rank-4 (n, h, w, c) inputs get 2-D convolutions.
    Average pooling (not max) keeps the only kinks in the network the
    activation's, which matters when looking for singular points.
    """
    width: int
    depth: int
    num_classes: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        if x.ndim == 2:
            x, kernel, window = x[..., None], (5,), (2,)
        else:
            x = x[..., None] if x.ndim == 3 else x
            kernel, window = (3, 3), (2, 2)
        for _ in range(self.depth):
            x = act(nn.Conv(self.width, kernel)(x))
            x = nn.avg_pool(x, window, strides=window)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)


def make_mlp(input_shape: Sequence[int], num_classes: int, width: int = 256, depth: int = 2,
             activation: str = "relu") -> MLP:
    """The built-in MLP as a plug-in factory (input_shape is not needed by Dense layers)."""
    del input_shape
    return MLP(width=width, depth=depth, num_classes=num_classes, activation=activation)


def make_cnn(input_shape: Sequence[int], num_classes: int, width: int = 256, depth: int = 2,
             activation: str = "relu") -> CNN:
    """The built-in CNN as a plug-in factory."""
    del input_shape
    return CNN(width=width, depth=depth, num_classes=num_classes, activation=activation)
