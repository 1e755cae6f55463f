"""Datasets: one entry point, `load(name, n, seed, data_dir, split)`.

Every loader returns `(x, y)` with float32 inputs of shape (n, *input_shape)
and int32 labels of shape (n,). Inputs are standardized per feature with
statistics of the *training* split (a fixed reference set, not of the subset),
so that subsets are truly nested: `load(name, n2)[0][:n1] == load(name, n1)[0]`
for n1 <= n2 and the same seed.

Subsets are the first n of a fixed sequence for the seed:
  * finite datasets (fashion_mnist, mnist, cifar10): a permutation of the split
    drawn from `seed`;
  * generated datasets (mnist1d, gaussian_mixture, teacher): examples are
    generated in fixed blocks whose generator seeds derive from `seed`, so the
    sequence is unbounded and any n is available.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np

from lossland.data import plugin, safe_pickle  # noqa: F401 (safe_pickle: public)
from lossland.data.errors import DataError
from lossland.data.files import (DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_SHAPES,  # noqa: F401
                                 _cifar10, _fashion_mnist, _mnist, read_idx, write_idx)

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    input_shape: tuple
    size: dict  # split -> number of examples, or None when unbounded
    description: str


def cache_dir() -> Path:
    """Where generated arrays are cached: $LOSSLAND_CACHE or ~/.cache/lossland."""
    return Path(os.environ.get("LOSSLAND_CACHE", Path.home() / ".cache" / "lossland"))


# ----------------------------------------------------------------------------
# Generated datasets: unbounded sequences built from fixed-size blocks
# ----------------------------------------------------------------------------

_MNIST1D_BLOCK = 10_000       # examples generated per mnist1d call (80% train)
_MNIST1D_TRAIN_FRACTION = 0.8
_SYNTHETIC_BLOCK = 10_000
# mnist1d seeds numpy's legacy global RNG, which takes seeds in [0, 2**32); block b of
# `seed` uses 42 + 1_000_003·seed + b. Up to this seed, every block b < 10**6 (8·10**9
# training examples) stays in that range.
MNIST1D_MAX_SEED = (2**32 - 1 - 42 - 1_000_000) // 1_000_003


def _mnist1d_seed(seed: int, block: int) -> int:
    """The mnist1d generator seed of one (seed, block): distinct and reproducible."""
    if not 0 <= seed <= MNIST1D_MAX_SEED:
        raise DataError(f"mnist1d: --seed={seed} is not allowed: the generator takes seeds "
                        f"0..{MNIST1D_MAX_SEED}. Choose one there.")
    return 42 + 1_000_003 * seed + block


def _mnist1d_block(seed: int, block: int):
    """One block of MNIST-1D: 8000 train and 2000 test examples, cached on disk."""
    path = cache_dir() / f"mnist1d_seed{seed}_block{block}.npz"
    if path.exists():
        try:
            with np.load(path) as f:
                return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # a corrupt cache entry is regenerated, never trusted
            path.unlink(missing_ok=True)
    import mnist1d.data

    args = mnist1d.data.get_dataset_args()
    args.num_samples = _MNIST1D_BLOCK
    args.train_split = _MNIST1D_TRAIN_FRACTION
    args.seed = _mnist1d_seed(seed, block)
    # mnist1d seeds numpy's global RNG; keep the caller's global state intact.
    state = np.random.get_state()
    try:
        generated = mnist1d.data.make_dataset(args)
    finally:
        np.random.set_state(state)
    arrays = {"x": generated["x"].astype(np.float32), "y": generated["y"].astype(np.int32),
              "x_test": generated["x_test"].astype(np.float32),
              "y_test": generated["y_test"].astype(np.int32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of this process's own: in a multi-process run every process
    # generates the same block and may write it at the same moment.
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a reader never sees a half-written cache file
    return arrays


def _blocks_needed(n: int, per_block: int) -> int:
    return max(1, -(-n // per_block))


def _mnist1d(split, n, seed):
    per_block = int(_MNIST1D_BLOCK * (_MNIST1D_TRAIN_FRACTION if split == "train"
                                      else 1 - _MNIST1D_TRAIN_FRACTION))
    key_x, key_y = ("x", "y") if split == "train" else ("x_test", "y_test")
    blocks = [_mnist1d_block(seed, b) for b in range(_blocks_needed(n, per_block))]
    x = np.concatenate([b[key_x] for b in blocks])[:n]
    y = np.concatenate([b[key_y] for b in blocks])[:n]
    # Standardization statistics: the training part of block 0 (fixed per seed).
    reference = _mnist1d_block(seed, 0)["x"]
    return x, y, reference


def _synthetic_block(kind, seed, block, split, input_dim, num_classes):
    """One block of a synthetic dataset; the generating model is fixed by `seed` alone."""
    model_rng = np.random.default_rng([seed, input_dim, num_classes, 7])
    split_id = 0 if split == "train" else 1
    rng = np.random.default_rng([seed, input_dim, num_classes, split_id, block])
    if kind == "gaussian_mixture":
        # Class means on a sphere of radius 3 (so classes overlap but are learnable).
        means = model_rng.normal(size=(num_classes, input_dim))
        means *= 3.0 / np.linalg.norm(means, axis=1, keepdims=True)
        y = rng.integers(0, num_classes, size=_SYNTHETIC_BLOCK)
        x = means[y] + rng.normal(size=(_SYNTHETIC_BLOCK, input_dim))
    else:  # teacher: labels from a random one-hidden-layer tanh network
        hidden = 64
        w1 = model_rng.normal(size=(input_dim, hidden)) / np.sqrt(input_dim)
        w2 = model_rng.normal(size=(hidden, num_classes)) / np.sqrt(hidden)
        x = rng.normal(size=(_SYNTHETIC_BLOCK, input_dim))
        y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
    return x.astype(np.float32), y.astype(np.int32)


def _synthetic(kind, split, n, seed, input_dim, num_classes):
    blocks = [_synthetic_block(kind, seed, b, split, input_dim, num_classes)
              for b in range(_blocks_needed(n, _SYNTHETIC_BLOCK))]
    x = np.concatenate([b[0] for b in blocks])[:n]
    y = np.concatenate([b[1] for b in blocks])[:n]
    reference = _synthetic_block(kind, seed, 0, "train", input_dim, num_classes)[0]
    return x, y, reference


# ----------------------------------------------------------------------------
# Registry and the public entry point
# ----------------------------------------------------------------------------

DATASETS = {
    "mnist1d": DatasetInfo("mnist1d", 10, (40,), {"train": None, "test": None},
                           "MNIST-1D, generated locally by the mnist1d package"),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (28, 28), {"train": 60000, "test": 10000},
                                 "Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)"),
    "mnist": DatasetInfo("mnist", 10, (28, 28), {"train": 60000, "test": 10000},
                         "MNIST IDX files from --data_dir"),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), {"train": 50000, "test": 10000},
                           "CIFAR-10 python pickles from --data_dir"),
    "gaussian_mixture": DatasetInfo("gaussian_mixture", 10, (20,), {"train": None, "test": None},
                                    "synthetic Gaussian mixture, one component per class"),
    "teacher": DatasetInfo("teacher", 10, (20,), {"train": None, "test": None},
                           "synthetic inputs labelled by a random tanh teacher network"),
}
SYNTHETIC = ("gaussian_mixture", "teacher")
GENERATED = ("mnist1d",) + SYNTHETIC

_FINITE_LOADERS: dict[str, Callable] = {
    "fashion_mnist": _fashion_mnist, "mnist": _mnist, "cifar10": _cifar10}


def dataset_info(name: str, input_dim: int | None = None,
                 num_classes: int | None = None) -> DatasetInfo:
    """The registry entry for `name`, with the synthetic sizes filled in.

    A plug-in (`file.npz`, `module:callable`) is read and checked here, once
    per process: its sizes and classes come from its arrays.
    """
    if plugin.is_plugin(name):
        arrays = plugin.load_arrays(name, num_classes or 10, DataError)
        return DatasetInfo(name, arrays.num_classes, tuple(arrays.x.shape[1:]),
                           {"train": arrays.x.shape[0],
                            "test": 0 if arrays.x_test is None else arrays.x_test.shape[0]},
                           f"plug-in dataset {name}")
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    info = DATASETS[name]
    if name in SYNTHETIC:
        info = dataclasses.replace(
            info, input_shape=(input_dim or info.input_shape[0],),
            num_classes=num_classes or info.num_classes)
    return info


def source(name: str, num_classes: int | None = None) -> dict | None:
    """Where a plug-in dataset came from ({spec, file, sha256}) for config.json; None otherwise."""
    if not plugin.is_plugin(name):
        return None
    return plugin.load_arrays(name, num_classes or 10, DataError).source


def standardize(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """(x − mean)/std per feature, with the statistics of `reference`.

    Features that are constant in the reference (e.g. Fashion-MNIST border
    pixels) are only centered, never divided by ~0.
    """
    mean = reference.mean(axis=0, dtype=np.float64)
    std = reference.std(axis=0, dtype=np.float64)
    std = np.where(std > 1e-8, std, 1.0)
    return ((x - mean) / std).astype(np.float32)


def load(name: str, n: int, seed: int = 0, data_dir: str | None = None,
         split: str = "train", *, input_dim: int | None = None,
         num_classes: int | None = None):
    """Loads the first `n` examples of `name`'s fixed sequence for `seed`.

    Args:
      name: a key of DATASETS.
      n: number of examples (> 0). Larger n contains smaller n as a prefix.
      seed: selects the permutation (finite datasets) or generator (others).
      data_dir: folder with the files, for fashion_mnist, mnist and cifar10.
      split: "train" or "test".
      input_dim, num_classes: sizes of the synthetic datasets only.

    Returns:
      (x, y): float32 array (n, *input_shape), int32 array (n,).
    """
    info = dataset_info(name, input_dim, num_classes)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {SPLITS}.")
    if not isinstance(n, (int, np.integer)) or n <= 0:
        raise DataError(f"n={n!r} examples asked of {name}; n must be a positive integer.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"--seed={seed!r} is not allowed: seeds are integers >= 0.")
    if plugin.is_plugin(name):   # used as given: no standardization
        arrays = plugin.load_arrays(name, info.num_classes, DataError)
        return plugin.subset(arrays, n, seed, split, DataError)
    if name in SYNTHETIC:
        x, y, reference = _synthetic(name, split, n, seed, info.input_shape[0], info.num_classes)
    elif name == "mnist1d":
        x, y, reference = _mnist1d(split, n, seed)
    else:
        available = info.size[split]
        if n > available:
            raise DataError(f"{name} {split} split holds {available} examples, but n={n} "
                            f"were asked for; use n <= {available}.")
        x_all, y_all = _FINITE_LOADERS[name](split, data_dir)
        if x_all.shape[0] < n:
            raise DataError(f"{name} {split} files hold {x_all.shape[0]} examples, but "
                            f"n={n} were asked for.")
        reference = x_all if split == "train" else _FINITE_LOADERS[name]("train", data_dir)[0]
        order = np.random.default_rng(seed).permutation(x_all.shape[0])[:n]
        x, y = x_all[order], y_all[order]
    flat_ref = reference.reshape(reference.shape[0], -1)
    x = standardize(x.reshape(n, -1), flat_ref).reshape((n,) + info.input_shape)
    return x, y.astype(np.int32)


def check_files(name: str, data_dir: str | None = None, split: str = "train") -> None:
    """Reads and checks `name`'s files for `split` without keeping them; a DataError if bad.

    For drivers that create folders before their first run loads the data (the
    sweeps): the same existence, size and shape checks as `load`, at start-up.
    Generated datasets have no files and pass.
    """
    dataset_info(name)   # a plug-in is read and checked here
    if name in _FINITE_LOADERS:
        _FINITE_LOADERS[name](split, data_dir)
