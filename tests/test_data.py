import gzip

import numpy as np
import pytest

from conftest import requires_fashion_mnist
from lossland import data


def test_mnist1d_shapes_dtypes_and_standardization():
    x, y = data.load("mnist1d", 500)
    assert x.shape == (500, 40) and x.dtype == np.float32
    assert y.shape == (500,) and y.dtype == np.int32
    assert set(np.unique(y)) <= set(range(10))
    # Standardized with training statistics: roughly zero mean, unit spread per feature.
    assert np.abs(x.mean(0)).max() < 0.25
    assert 0.7 < x.std(0).mean() < 1.3


@pytest.mark.parametrize("name,kwargs", [("mnist1d", {}), ("gaussian_mixture", {"input_dim": 7}),
                                         ("teacher", {"input_dim": 5, "num_classes": 3})])
def test_subsets_are_nested_and_deterministic(name, kwargs):
    x_small, y_small = data.load(name, 300, seed=1, **kwargs)
    x_big, y_big = data.load(name, 12_000, seed=1, **kwargs)  # crosses a generation block
    np.testing.assert_array_equal(x_big[:300], x_small)
    np.testing.assert_array_equal(y_big[:300], y_small)
    x_again, _ = data.load(name, 300, seed=1, **kwargs)
    np.testing.assert_array_equal(x_again, x_small)
    x_other, _ = data.load(name, 300, seed=2, **kwargs)
    assert not np.allclose(x_other, x_small)


def test_synthetic_sizes_and_labels():
    x, y = data.load("teacher", 1000, input_dim=5, num_classes=3)
    assert x.shape == (1000, 5) and y.max() <= 2
    assert len(np.unique(y)) == 3  # a useful teacher labels every class
    x, y = data.load("gaussian_mixture", 800, input_dim=9, num_classes=4, split="test")
    assert x.shape == (800, 9) and set(np.unique(y)) == {0, 1, 2, 3}


def _write_fake_idx_dir(directory, n=20, gz=True):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    data.write_idx(directory / f"train-images-idx3-ubyte{suffix}", images)
    data.write_idx(directory / f"train-labels-idx1-ubyte{suffix}", labels)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images, labels = _write_fake_idx_dir(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    np.testing.assert_array_equal(data.read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"),
                                  images)
    x, y = data.load("mnist", 20, data_dir=str(tmp_path))
    assert x.shape == (20, 28, 28)
    # Same permutation as the loader's: the labels are the file's labels, reordered.
    order = np.random.default_rng(0).permutation(20)
    np.testing.assert_array_equal(y, labels[order])


def test_idx_truncated_and_corrupt_files_fail_clearly(tmp_path):
    _write_fake_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(data.DataError, match="truncated"):
        data.read_idx(path)
    path.write_bytes(b"\x00\x00\x0d\x03" + raw[4:])  # float type code: not ours
    with pytest.raises(data.DataError, match="magic"):
        data.read_idx(path)
    gz_path = tmp_path / "x.gz"
    gz_path.write_bytes(gzip.compress(raw)[:50])
    with pytest.raises(data.DataError, match="corrupt or truncated"):
        data.read_idx(gz_path)


def test_missing_files_name_what_is_expected(tmp_path):
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.*apt-get install "
                                             r"dataset-fashion-mnist"):
        data.load("fashion_mnist", 10, data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match="data_dir"):
        data.load("cifar10", 10)


def test_too_many_examples_says_how_many_exist(tmp_path):
    _write_fake_idx_dir(tmp_path)
    with pytest.raises(data.DataError, match="60000"):
        data.load("mnist", 60001, data_dir=str(tmp_path))
    with pytest.raises(data.DataError, match="hold 20 examples"):
        data.load("mnist", 21, data_dir=str(tmp_path))


def test_bad_names_and_sizes():
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.load("imagenet", 10)
    with pytest.raises(data.DataError, match="positive"):
        data.load("mnist1d", 0)
    with pytest.raises(data.DataError, match="split"):
        data.load("mnist1d", 10, split="validation")


def test_cifar10_pickles(tmp_path):
    import pickle
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": list(rng.integers(0, 10, 4))}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    x, y = data.load("cifar10", 20, data_dir=str(tmp_path))
    assert x.shape == (20, 32, 32, 3) and y.dtype == np.int32
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="corrupt"):
        data.load("cifar10", 20, data_dir=str(tmp_path))


@requires_fashion_mnist
def test_real_fashion_mnist():
    x, y = data.load("fashion_mnist", 60000)
    assert x.shape == (60000, 28, 28) and x.dtype == np.float32
    assert np.bincount(y).tolist() == [6000] * 10
    x_test, _ = data.load("fashion_mnist", 10000, split="test")
    assert x_test.shape == (10000, 28, 28)
