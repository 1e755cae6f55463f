"""Plug-in datasets: `--dataset=path/to/file.npz` or `--dataset=package.module:callable`.

A `.npz` holds `x` (N, *input_shape) and `y` (N,) integer labels, optionally
`x_test`, `y_test` and `num_classes` (else --num_classes gives C). It is read
with `allow_pickle=False`, so no data file runs code. A callable is called
with no arguments and returns a mapping with the same keys.

Checked at start-up (`DataError` naming --dataset and the value): the keys,
the shapes, integer labels in [0, C), finite inputs. Subsets are nested as for
the built-ins: the first n of a permutation fixed by the seed. Inputs are used
as given (cast to float32, not standardized).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

KEYS = ("x", "y", "x_test", "y_test", "num_classes")


def is_plugin(name: str) -> bool:
    return name.endswith(".npz") or ":" in name


@dataclasses.dataclass(frozen=True)
class Arrays:
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    num_classes: int
    source: dict


_CACHE: dict = {}   # (spec, num_classes, file stamp) -> Arrays: read once per process


def _stamp(path: str | None):
    if path and Path(path).is_file():
        info = Path(path).stat()
        return (info.st_size, info.st_mtime_ns)
    return None


def _sha256(path: str | None):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if _stamp(path) else None


def _read_npz(spec: str, error) -> tuple[dict, dict]:
    path = Path(spec)
    if not path.is_file():
        raise error(f"--dataset={spec}: no such file.")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files if k in KEYS}
    except ValueError as e:   # object arrays need pickle: refused
        raise error(f"--dataset={spec}: cannot read it without running code ({e}). Save "
                    "plain numeric arrays (np.savez(path, x=..., y=...)).") from None
    except Exception as e:
        raise error(f"--dataset={spec}: not a readable .npz file: {type(e).__name__}: {e}"
                    ) from None
    return arrays, {"spec": spec, "file": str(path.resolve()), "sha256": _sha256(path)}


def _call(spec: str, error) -> tuple[dict, dict]:
    from lossland.models.plugin import ModelError, load_factory
    try:
        fn, source = load_factory(spec, flag="dataset")
    except ModelError as e:
        raise error(str(e)) from None
    try:
        result = fn()
    except Exception as e:
        raise error(f"--dataset={spec}: calling it raised {type(e).__name__}: {e}") from None
    if not hasattr(result, "keys"):
        raise error(f"--dataset={spec} returned a {type(result).__name__}; return a dict with "
                    "x, y (and optionally x_test, y_test, num_classes).")
    return {k: np.asarray(result[k]) for k in result.keys() if k in KEYS}, source


def _check_split(spec, x, y, num_classes, names, error):
    xn, yn = names
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise error(f"--dataset={spec}: {xn} has shape {x.shape} and dtype {x.dtype}; expected "
                    "real numbers of shape (N, *input_shape).")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise error(f"--dataset={spec}: {yn} has shape {y.shape} but {xn} has {x.shape[0]} "
                    f"examples; expected {yn} of shape ({x.shape[0]},).")
    if not np.issubdtype(y.dtype, np.integer):
        raise error(f"--dataset={spec}: {yn} has dtype {y.dtype}; labels must be integers.")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise error(f"--dataset={spec}: {yn} holds label {bad}, outside [0, {num_classes}). "
                    "Labels are class indices 0..C-1; put num_classes in the file or pass "
                    "--num_classes.")
    if not np.all(np.isfinite(x)):
        raise error(f"--dataset={spec}: {xn} holds {int(np.sum(~np.isfinite(x)))} NaN or "
                    "infinite values; inputs must be finite.")


def load_arrays(spec: str, num_classes: int, error=ValueError) -> Arrays:
    """The checked arrays of a plug-in dataset (read once per process)."""
    file = spec if spec.endswith(".npz") else None
    key = (spec, num_classes, _stamp(file))
    if key in _CACHE:
        return _CACHE[key]
    arrays, source = _read_npz(spec, error) if file else _call(spec, error)
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise error(f"--dataset={spec} lacks {' and '.join(missing)}; it must hold x "
                    "(N, *input_shape) and y (N,) integer labels, optionally x_test, y_test "
                    "and num_classes.")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise error(f"--dataset={spec}: give x_test and y_test together, or neither.")
    classes = int(arrays["num_classes"]) if "num_classes" in arrays else num_classes
    if classes < 2:
        raise error(f"--dataset={spec}: num_classes={classes}; must be >= 2.")
    _check_split(spec, arrays["x"], arrays["y"], classes, ("x", "y"), error)
    if "x_test" in arrays:
        _check_split(spec, arrays["x_test"], arrays["y_test"], classes, ("x_test", "y_test"),
                     error)
        if arrays["x_test"].shape[1:] != arrays["x"].shape[1:]:
            raise error(f"--dataset={spec}: x_test has inputs of shape "
                        f"{arrays['x_test'].shape[1:]}, x of {arrays['x'].shape[1:]}.")
    result = Arrays(x=arrays["x"], y=arrays["y"], x_test=arrays.get("x_test"),
                    y_test=arrays.get("y_test"), num_classes=classes, source=source)
    _CACHE[key] = result
    return result


def subset(arrays: Arrays, n: int, seed: int, split: str, error=ValueError):
    """The first n examples of the split's permutation fixed by seed (nested in n)."""
    if split == "test" and arrays.x_test is None:
        raise error(f"--dataset={arrays.source['spec']} holds no x_test, y_test.")
    x, y = (arrays.x, arrays.y) if split == "train" else (arrays.x_test, arrays.y_test)
    if n > x.shape[0]:
        raise error(f"--n_train={n} is not allowed: --dataset={arrays.source['spec']} holds "
                    f"{x.shape[0]} {split} examples. Use --n_train<={x.shape[0]}.")
    order = np.random.default_rng(seed).permutation(x.shape[0])[:n]
    return x[order].astype(np.float32), y[order].astype(np.int32)
