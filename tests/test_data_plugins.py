"""Plug-in datasets (.npz, callables) and the CIFAR-10 reader that runs no code."""

import json
import os
import pickle

import numpy as np
import pytest

from lossland import config as config_lib, data as data_lib, runner


def _mnist1d_npz(path, n=96, with_test=True):
    x, y = data_lib.load("mnist1d", n, seed=0)
    arrays = dict(x=x, y=y)
    if with_test:
        arrays.update(x_test=x[:16], y_test=y[:16])
    np.savez(path, **arrays)
    return x, y


def test_npz_subsets_are_nested_and_checked(tmp_path):
    path = tmp_path / "mine.npz"
    x, y = _mnist1d_npz(path)
    spec = str(path)
    info = data_lib.dataset_info(spec)
    assert info.input_shape == (40,) and info.num_classes == 10
    assert info.size == {"train": 96, "test": 16}
    small, large = data_lib.load(spec, 10, seed=3), data_lib.load(spec, 50, seed=3)
    np.testing.assert_array_equal(small[0], large[0][:10])
    np.testing.assert_array_equal(small[1], large[1][:10])
    assert small[0].dtype == np.float32 and small[1].dtype == np.int32
    # The first n of a seeded permutation of the file's rows, used as given.
    order = np.random.default_rng(3).permutation(96)[:10]
    np.testing.assert_array_equal(small[0], x[order])
    assert not np.array_equal(data_lib.load(spec, 10, seed=4)[1], small[1])
    with pytest.raises(data_lib.DataError, match="--n_train=200 .* holds 96"):
        data_lib.load(spec, 200)


@pytest.mark.parametrize("arrays, message", [
    (dict(x=np.zeros((8, 3))), "lacks y"),
    (dict(x=np.zeros((8, 3)), y=np.full(8, 10)), "label 10, outside \\[0, 10\\)"),
    (dict(x=np.zeros((8, 3)), y=np.full(8, -1)), "label -1"),
    (dict(x=np.full((8, 3), np.nan), y=np.zeros(8, int)), "24 NaN or infinite"),
    (dict(x=np.zeros((8, 3)), y=np.zeros(7, int)), "expected y of shape \\(8,\\)"),
    (dict(x=np.zeros((8, 3)), y=np.zeros(8)), "labels must be integers"),
    (dict(x=np.zeros((8, 3)), y=np.array([0, 1, 2, 0, 1, 2, 0, 1]), num_classes=2),
     "label 2, outside \\[0, 2\\)"),
])
def test_bad_npz_is_refused(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(data_lib.DataError, match=f"--dataset={path}.*{message}"):
        data_lib.dataset_info(str(path))


def test_npz_with_object_arrays_is_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([object()] * 4, dtype=object), y=np.zeros(4, int))
    with pytest.raises(data_lib.DataError, match="without running code"):
        data_lib.dataset_info(str(path))


def test_callable_dataset_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_data_module.py").write_text(
        "import numpy as np\n"
        "def make():\n"
        "    rng = np.random.default_rng(0)\n"
        "    return {'x': rng.normal(size=(30, 4)), 'y': rng.integers(0, 3, 30),\n"
        "            'num_classes': 3}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    info = data_lib.dataset_info("my_data_module:make")
    assert info.num_classes == 3 and info.input_shape == (4,) and info.size["train"] == 30
    x, y = data_lib.load("my_data_module:make", 12, seed=1)
    assert x.shape == (12, 4) and set(np.unique(y)) <= {0, 1, 2}


def test_driver_trains_on_an_npz(tmp_path):
    path = tmp_path / "mnist1d.npz"
    _mnist1d_npz(path, with_test=False)
    cfg = config_lib.RunConfig(dataset=str(path), n_train=64, width=16, depth=1, steps=3,
                               plots=False, workdir=str(tmp_path / "run"))
    assert runner.run(cfg, progress=False).status == "finished"
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["n_train"] == 64 and config["dataset_source"]["file"] == str(path)
    assert len(config["dataset_source"]["sha256"]) == 64
    # Other arrays in the same file: --resume refuses, naming it.
    x, y = data_lib.load("mnist1d", 96, seed=1)
    np.savez(path, x=x, y=y)
    with pytest.raises(config_lib.ConfigError, match=f"--dataset={path} changed"):
        runner.run(cfg.replace(steps=5, resume=True), progress=False)


# ----------------------------------------------------------------------------
# CIFAR-10: the allow-list unpickler
# ----------------------------------------------------------------------------

class _MakesADirectory:
    """What a crafted pickle does: unpickling calls os.mkdir(marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _cifar_batches(folder, evil_marker=None, n=20):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"filenames": [b"img.png"] * n}
        if evil_marker is not None and name == "data_batch_1":
            batch[b"data"] = _MakesADirectory(evil_marker)
        # Protocol 2, as the official (Python 2) files were written.
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_reads_official_format_pickles(tmp_path):
    _cifar_batches(tmp_path / "cifar")
    x, y = data_lib._cifar10("train", str(tmp_path / "cifar"))
    assert x.shape == (100, 32, 32, 3) and y.shape == (100,) and 0 <= x.min() <= x.max() <= 1


def test_cifar10_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _cifar_batches(tmp_path / "cifar", evil_marker=marker)
    with pytest.raises(data_lib.DataError, match="refused .*data_batch_1.*posix.mkdir"):
        data_lib.check_files("cifar10", str(tmp_path / "cifar"))
    assert not marker.exists()
    # The control: plain pickle.load would have run it.
    with open(tmp_path / "cifar" / "data_batch_1", "rb") as f:
        pickle.load(f, encoding="bytes")
    assert marker.exists()
