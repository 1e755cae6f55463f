"""`resnet`: the CIFAR ResNet of He et al. (2016, §4.2), in 1-D and 2-D.

    depth = 6n + 2:  a 3-wide stem convolution to `width` channels, three stages
    of n basic blocks (width, 2·width, 4·width channels; the first block of
    stages 2 and 3 halves the resolution), global average pooling, a linear
    readout. A basic block is

        out = act(x' + N(conv(act(N(conv(x))))))

    with x' = x, or a 1×1 strided projection N(conv(x)) where the shape changes
    (He et al.'s option B), and N the normalization `norm`:

      * none:  identity (the convolutions carry biases);
      * batch: BatchNorm, in training mode normalizing with the statistics of the
               batch it is given, i.e. of each chunk (ghost batch) of the
               full-batch loss; running statistics are a side output
               (see `lossland.models.base`);
      * layer: LayerNorm over the channels of each position (per example).

Rank-2 inputs (n, length) get 1-D convolutions (MNIST-1D), rank-3 (n, h, w)
and rank-4 (n, h, w, c) 2-D ones (Fashion-MNIST).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from lossland.models.families import ACTIVATIONS

NORMS = ("none", "batch", "layer")
BN_MOMENTUM = 0.9
MAX_DEPTH = 110          # ResNet-110, the deepest of He et al.'s CIFAR table
MAX_WIDTH = 256          # channels of the first stage (the last has 4×)


def depth_problem(depth: int) -> str:
    """Why `depth` is not a CIFAR ResNet depth, or "" when it is one."""
    if depth < 8 or depth > MAX_DEPTH or (depth - 2) % 6:
        return (f"a CIFAR ResNet has depth 6n + 2 with n >= 1 blocks per stage, from 8 to "
                f"{MAX_DEPTH} (8, 14, 20, 32, 44, 56, 110)")
    return ""


class _Norm(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x, train: bool):
        if self.kind == "batch":
            return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM)(x)
        if self.kind == "layer":
            return nn.LayerNorm()(x)
        return x


class BasicBlock(nn.Module):
    channels: int
    stride: int
    kernel: tuple
    norm: str
    activation: callable

    @nn.compact
    def __call__(self, x, train: bool):
        bias = self.norm == "none"
        strides = (self.stride,) * len(self.kernel)
        h = nn.Conv(self.channels, self.kernel, strides, use_bias=bias)(x)
        h = self.activation(_Norm(self.norm)(h, train))
        h = nn.Conv(self.channels, self.kernel, use_bias=bias)(h)
        h = _Norm(self.norm)(h, train)
        if self.stride != 1 or x.shape[-1] != self.channels:
            ones = (1,) * len(self.kernel)
            x = nn.Conv(self.channels, ones, strides, use_bias=bias)(x)
            x = _Norm(self.norm)(x, train)
        return self.activation(x + h)


class ResNet(nn.Module):
    """CIFAR ResNet-`depth` (6n + 2) with `width` stem channels and normalization `norm`."""
    width: int
    depth: int
    num_classes: int
    activation: str = "relu"
    norm: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = True):
        act = ACTIVATIONS[self.activation]
        if x.ndim in (2, 3):                 # (n, length) or (n, h, w): one channel
            x = x[..., None]
        kernel = (3,) * (x.ndim - 2)
        blocks = (self.depth - 2) // 6
        h = nn.Conv(self.width, kernel, use_bias=self.norm == "none")(x)
        h = act(_Norm(self.norm)(h, train))
        for stage in range(3):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                h = BasicBlock(self.width * 2 ** stage, stride, kernel, self.norm, act)(h, train)
        h = jnp.mean(h, axis=tuple(range(1, h.ndim - 1)))   # global average pooling
        return nn.Dense(self.num_classes)(h)


def make_resnet(input_shape: Sequence[int], num_classes: int, width: int = 16, depth: int = 8,
                activation: str = "relu", norm: str = "none") -> ResNet:
    """The built-in ResNet as a plug-in factory."""
    del input_shape
    return ResNet(width=width, depth=depth, num_classes=num_classes, activation=activation,
                  norm=norm)
