"""Data parallelism over a 1-D device mesh (axis `data`).

The chunked dataset is sharded along its example axis (axis 1 of
(num_chunks, chunk, ...)), params are replicated, and the jitted kernels run
unchanged: the per-chunk sums become cross-device sums that XLA inserts.
Padding (mask 0) makes n independent of the device count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lossland import objective as objective_lib
from lossland.config import ConfigError
from lossland import train as train_lib

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh | None:
    """A 1-D mesh over the first `num_devices` devices (0 = all); None for one device."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise ConfigError(f"--num_devices={num_devices}, but JAX sees {len(devices)} device(s): "
                         f"{devices}. Use --num_devices<={len(devices)} (0 = all).")
    chosen = devices[:num_devices or len(devices)]
    if len(chosen) == 1:
        return None
    return Mesh(np.asarray(chosen), (DATA_AXIS,))


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.devices.size


def shard_data(data: objective_lib.ChunkedData, mesh: Mesh | None) -> objective_lib.ChunkedData:
    """Places the chunk axis of `data` across the mesh (examples split over devices)."""
    if mesh is None:
        return data
    def put(array):
        spec = PartitionSpec(None, DATA_AXIS, *([None] * (array.ndim - 2)))
        return jax.device_put(array, NamedSharding(mesh, spec))
    return data.replace(x=put(data.x), y=put(data.y), mask=put(data.mask))


def replicate(tree, mesh: Mesh | None):
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


class MinibatchSource:
    """SGD minibatches as one-chunk ChunkedData, in the order `train.minibatch_indices` fixes."""

    def __init__(self, x, y, cfg, dtype, mesh):
        self.x, self.y = np.asarray(x), np.asarray(y)
        self.seed, self.batch_size, self.dtype, self.mesh = cfg.seed, cfg.batch_size, dtype, mesh
        self.multiple = mesh_size(mesh) if cfg.batch_size % mesh_size(mesh) == 0 else 1

    def batch(self, step: int) -> objective_lib.ChunkedData:
        idx = train_lib.minibatch_indices(self.seed, step, self.x.shape[0], self.batch_size)
        chunk = objective_lib.chunk_data(self.x[idx], self.y[idx], self.batch_size,
                                         multiple_of=self.multiple, dtype=self.dtype)
        return shard_data(chunk, self.mesh) if self.multiple > 1 else chunk
