"""Datasets read from files: IDX (MNIST, Fashion-MNIST) and the CIFAR-10 python pickles.

Each loader returns the whole split as (float32 images in [0, 1], int32
labels), or raises DataError saying which file is wrong and how to fix it.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from lossland.data import safe_pickle
from lossland.data.errors import DataError

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) into a uint8 array.

    Validates the magic number (two zero bytes, type 0x08 = unsigned byte, and
    the number of dimensions) and that the payload size matches the header.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {path}: {e}. The file is corrupt or "
                        "truncated; reinstall it.") from e
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, no header.")
    zero0, zero1, dtype_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or dtype_code != _IDX_UBYTE or not 1 <= ndim <= 4:
        raise DataError(f"IDX file {path} has a bad magic number "
                        f"{raw[:4].hex()}; expected 000008 followed by 01..04 "
                        "(unsigned bytes). Is it really an IDX file?")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"IDX file {path} is truncated inside its header.")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = int(np.prod(shape))
    payload = len(raw) - header_len
    if payload != expected:
        raise DataError(f"IDX file {path} holds {payload} data bytes but its header "
                        f"says shape {shape} ({expected} bytes): the file is corrupt "
                        "or truncated.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Writes a uint8 array as an IDX file (gzipped if the name ends in .gz)."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    for candidate in (data_dir / (stem + ".gz"), data_dir / stem):
        if candidate.exists():
            return candidate
    return None


# The published IDX shapes of Fashion-MNIST (images, labels) per split.
FASHION_MNIST_SHAPES = {"train": ((60000, 28, 28), (60000,)),
                        "test": ((10000, 28, 28), (10000,))}


def _load_idx_split(name: str, data_dir: Path, split: str, how_to_get: str,
                    known_shapes: dict | None = None):
    image_stem, label_stem = _IDX_FILES[split]
    image_path, label_path = _find_idx(data_dir, image_stem), _find_idx(data_dir, label_stem)
    if image_path is None or label_path is None:
        raise DataError(
            f"{name}: missing IDX files in --data_dir={str(data_dir)!r}. Expected "
            f"{image_stem}[.gz] and {label_stem}[.gz]. {how_to_get}")
    try:
        images, labels = read_idx(image_path), read_idx(label_path)
    except DataError as e:
        raise DataError(f"{name}: {e} Check the files in --data_dir={str(data_dir)!r}. "
                        f"{how_to_get}") from e
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"{name}: {image_path} has shape {images.shape} and {label_path} "
                        f"has shape {labels.shape}; expected (n, rows, cols) and (n,). Check "
                        f"the files in --data_dir={str(data_dir)!r}.")
    if known_shapes is not None and (images.shape, labels.shape) != known_shapes[split]:
        # Size check against the published shapes: a file whose header and payload
        # were both cut (or another dataset's file) passes read_idx, not this.
        raise DataError(f"{name}: {image_path} has shape {images.shape} and {label_path} "
                        f"has shape {labels.shape}; the published {split} split has "
                        f"{known_shapes[split][0]} and {known_shapes[split][1]}. Check the "
                        f"files in --data_dir={str(data_dir)!r}. {how_to_get}")
    if labels.size and labels.max() >= 10:
        raise DataError(f"{name}: {label_path} holds label {labels.max()}; expected 0..9. "
                        f"Check the files in --data_dir={str(data_dir)!r}. {how_to_get}")
    return images.astype(np.float32) / 255.0, labels.astype(np.int32)


def _fashion_mnist(split, data_dir):
    directory = Path(data_dir or DEFAULT_FASHION_MNIST_DIR)
    return _load_idx_split("fashion_mnist", directory, split,
                           "Install them with `apt-get install dataset-fashion-mnist` "
                           f"(into {DEFAULT_FASHION_MNIST_DIR}) or pass --data_dir.",
                           known_shapes=FASHION_MNIST_SHAPES)


def _mnist(split, data_dir):
    if data_dir is None:
        raise DataError("mnist: no --data_dir given. Download the four MNIST IDX files "
                        "(train-images-idx3-ubyte.gz, ...) into a folder and pass it as "
                        "--data_dir.")
    return _load_idx_split("mnist", Path(data_dir), split,
                           "Put the MNIST IDX files there or pass another --data_dir.")


# ----------------------------------------------------------------------------
# CIFAR-10 (python pickles)
# ----------------------------------------------------------------------------

def _cifar10(split, data_dir):
    if data_dir is None:
        raise DataError("cifar10: no --data_dir given. Pass the folder holding the python "
                        "pickles (data_batch_1..5, test_batch), e.g. "
                        "cifar-10-batches-py/ from cifar-10-python.tar.gz.")
    directory = Path(data_dir)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for batch_name in names:
        path = directory / batch_name
        if not path.exists():
            raise DataError(f"cifar10: missing {path}. Expected the files {', '.join(names)} "
                            "from the python version of CIFAR-10 in --data_dir.")
        try:
            with open(path, "rb") as f:
                batch = safe_pickle.load(f)
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels = np.asarray(batch[b"labels"], dtype=np.int32)
        except safe_pickle.UnsafePickleError as e:
            raise DataError(f"cifar10: refused {path}: {e}. A data file must not run code, "
                            "so only numpy arrays, dicts, lists and bytes are read; replace "
                            "it with the official file from cifar-10-python.tar.gz.") from None
        except Exception as e:  # pickle raises many kinds on corrupt input
            raise DataError(f"cifar10: cannot read {path}: {e!r}. The file is corrupt.") from e
        if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
            raise DataError(f"cifar10: {path} holds data of shape {data.shape}; "
                            "expected (n, 3072) with one label per row.")
        # Stored as (n, 3, 32, 32) channel-major; we use NHWC.
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(labels)
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)
