"""Data parallelism over a 1-D device mesh (axis `data`), on one host or many.

The chunked dataset (x: (num_chunks, chunk, ...), y and mask: (num_chunks,
chunk)) is sharded along its *example* axis, axis 1, with a `NamedSharding`;
params (and every other pytree: optimizer state, Lanczos vectors) are
replicated. The jitted kernels in `lossland.objective` run unchanged on such
inputs: each device sums its slice of every chunk and XLA's SPMD partitioner
inserts the cross-device all-reduce. n need not be a multiple of the device
count: the chunk is rounded up to a multiple of it and the extra rows carry
mask 0 (see `objective.chunk_data`).

Placement. Arrays are placed with `jax.make_array_from_callback`: each
process hands JAX only the slices its *own* devices hold. In our setting every
process loads the same full arrays (datasets are files or are generated from
the seed), so a process simply cuts its shards out of its host copy; nothing is
exchanged between hosts and the same code serves one device, several local
devices and several processes (`jax.distributed`, see lossland.distributed).
`shard_chunked` builds each shard (with its padding) straight from the
unpadded host arrays, so the device copy of the dataset is made once, without
a padded host copy of the whole dataset in between.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from lossland import objective as objective_lib
from lossland.config import ConfigError
from lossland import train as train_lib

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh | None:
    """A 1-D mesh (axis `data`) over the first `num_devices` devices (0 = all).

    Returns None when that is a single device (the kernels then run unsharded).
    With several processes (`jax.distributed`), the mesh spans every device of
    every process, so `num_devices` must be 0 or the global device count.
    """
    devices = jax.devices()
    if num_devices < 0:
        raise ConfigError(f"--num_devices={num_devices} must be >= 0 (0 = every device).")
    if num_devices > len(devices):
        raise ConfigError(f"--num_devices={num_devices}, but JAX sees {len(devices)} device(s): "
                          f"{devices}. Use --num_devices<={len(devices)} (0 = all).")
    count = num_devices or len(devices)
    if jax.process_count() > 1 and count != len(devices):
        raise ConfigError(
            f"--num_devices={num_devices}: a multi-process run ({jax.process_count()} "
            f"processes) shards over every device of every process; use --num_devices=0 "
            f"(or ={len(devices)}).")
    if count == 1:
        return None
    return Mesh(np.asarray(devices[:count]), (DATA_AXIS,))


def mesh_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.devices.size


def data_sharding(mesh: Mesh | None, ndim: int):
    """The sharding of a (num_chunks, chunk, ...) array: axis 1 over `data`."""
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS, *([None] * (ndim - 2))))


def replicated_sharding(mesh: Mesh | None):
    if mesh is None:
        return SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(mesh, PartitionSpec())


def _put(host, sharding, dtype=None) -> jax.Array:
    """A global array from a host array every process holds in full."""
    host = np.asarray(host)
    dtype = np.dtype(dtype) if dtype is not None else host.dtype
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: np.asarray(host[index], dtype), dtype=dtype)


def chunk_layout(n: int, chunk_size: int, multiple_of: int = 1) -> tuple[int, int]:
    """(chunk, num_chunks) exactly as `objective.chunk_data` lays n examples out."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive.")
    chunk = min(chunk_size, n)
    chunk = multiple_of * math.ceil(chunk / multiple_of)
    return chunk, math.ceil(n / chunk)


def _aligned_empty(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialized array whose data start on an `align`-byte boundary.

    The CPU backend adopts such a buffer as the device buffer without copying
    it, so a shard built here costs its size once, not twice.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def shard_chunked(x, y, chunk_size: int, mesh: Mesh | None, *, dtype=np.float32
                  ) -> objective_lib.ChunkedData:
    """`shard_data(chunk_data(x, y, chunk_size, multiple_of=mesh_size(mesh)), mesh)`, lean.

    Same layout, padding and values as `objective.chunk_data`, but each device's
    shard is copied (and padded) straight from the unpadded host arrays into a
    fresh buffer, chunk by chunk: no padded host copy of the whole dataset and
    no fancy-indexing temporaries. On CPU the device adopts that buffer, so the
    dataset costs one extra copy in all; on an accelerator the host buffer of
    one shard lives only during its transfer. Works unchanged with several
    processes, provided each passes the same x and y (each builds only the
    shards of its own devices).
    """
    x, y = np.asarray(x), np.asarray(y)
    n = x.shape[0]
    chunk, num_chunks = chunk_layout(n, chunk_size, mesh_size(mesh))
    dtype = np.dtype(dtype)

    def spans(index):
        """[(position in shard, lo, hi)]: the real examples of each chunk of the shard."""
        chunks = range(num_chunks)[index[0]]
        within = range(chunk)[index[1]]
        assert within.step == 1, index
        out = []
        for i, c in enumerate(chunks):
            lo = c * chunk + within.start
            out.append((i, lo, max(lo, min(lo + len(within), n))))
        return (len(chunks), len(within)), out

    def build(source, index, out_dtype, fill):
        shape, pieces = spans(index)
        features = tuple(index[2:])
        tail = tuple(len(range(d)[s]) for d, s in zip(source.shape[1:], features))
        block = _aligned_empty(shape + tail, out_dtype)
        for i, lo, hi in pieces:
            block[i, :hi - lo] = fill(source, lo, hi, features)
            block[i, hi - lo:] = 0
        return block

    x_piece = lambda src, lo, hi, features: src[lo:hi][(slice(None),) + features]
    y_piece = lambda src, lo, hi, features: src[lo:hi]
    mask_piece = lambda src, lo, hi, features: 1

    def put(shape, source, out_dtype, fill):
        return jax.make_array_from_callback(
            shape, data_sharding(mesh, len(shape)),
            lambda index: build(source, index, out_dtype, fill), dtype=out_dtype)

    return objective_lib.ChunkedData(
        x=put((num_chunks, chunk) + x.shape[1:], x, dtype, x_piece),
        y=put((num_chunks, chunk), y, np.int32, y_piece),
        mask=put((num_chunks, chunk), y, dtype, mask_piece),
        n=n)


def shard_data(data: objective_lib.ChunkedData, mesh: Mesh | None) -> objective_lib.ChunkedData:
    """Places an already chunked dataset across the mesh (examples split over devices).

    The chunk size must be a multiple of the mesh size (`chunk_data(...,
    multiple_of=mesh_size(mesh))`). Prefer `shard_chunked`, which skips the
    intermediate single-device copy.
    """
    if mesh is None:
        return data
    if data.chunk_size % mesh_size(mesh):
        raise ValueError(f"chunk size {data.chunk_size} is not a multiple of the "
                         f"{mesh_size(mesh)} devices; chunk with multiple_of={mesh_size(mesh)}.")
    return data.replace(x=_put(data.x, data_sharding(mesh, data.x.ndim)),
                        y=_put(data.y, data_sharding(mesh, 2)),
                        mask=_put(data.mask, data_sharding(mesh, 2)))


def replicate(tree, mesh: Mesh | None):
    """Every leaf replicated on every device of the mesh; without one, on the first device.

    Either way the leaves are *committed* to their devices, like every output of
    a jitted step. jit keys its cache on that: feeding a step uncommitted
    initial params and then its own committed outputs compiles it twice.
    """
    sharding = replicated_sharding(mesh)
    return jax.tree_util.tree_map(lambda leaf: _put(leaf, sharding), tree)


def to_host(tree):
    """numpy copies of (replicated or local) arrays, valid on every process."""
    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if not leaf.is_fully_replicated:
                from jax.experimental import multihost_utils
                return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
            return np.asarray(leaf.addressable_data(0))
        return np.asarray(leaf)
    return jax.tree_util.tree_map(fetch, tree)


class MinibatchSource:
    """SGD minibatches as one-chunk ChunkedData, in the order `train.minibatch_indices` fixes.

    Each minibatch is sharded over the mesh like the full dataset; when the
    batch size is not a multiple of the device count it is padded with mask-0
    rows, so the batch mean (and the step) are those of the unpadded batch.
    """

    def __init__(self, x, y, cfg, dtype, mesh):
        self.x, self.y = np.asarray(x), np.asarray(y)
        self.seed, self.batch_size, self.dtype, self.mesh = cfg.seed, cfg.batch_size, dtype, mesh

    def batch(self, step: int) -> objective_lib.ChunkedData:
        idx = train_lib.minibatch_indices(self.seed, step, self.x.shape[0], self.batch_size)
        return shard_chunked(self.x[idx], self.y[idx], self.batch_size, self.mesh,
                             dtype=self.dtype)
