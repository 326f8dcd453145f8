"""Shared fixtures: small embedded data and a quickly trained SmallCNN (CPU, seeded)."""
import pytest
import torch

import ntklab
from ntklab.models import SmallCNN

# The tests use tiny models, which gain nothing from a second thread; on a busy 2-core machine two
# threads per process slow them down many times over. Chapters run by nbval use their own kernels.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Experiment results of tests go to a temporary folder, never to the user's cache.
    The converted embedded data set stays shared (it is read-only after the first write)."""
    monkeypatch.setenv("NTKLAB_RESULTS", str(tmp_path_factory.getbasetemp() / "results"))


@pytest.fixture(scope="session")
def mnist_small():
    """(train, test): 1,000 and 200 class-balanced embedded MNIST images, float32 in [0, 1]."""
    train = ntklab.data.subset(ntklab.data.load("mnist5k", "train"), 1000, seed=0)
    test = ntklab.data.subset(ntklab.data.load("mnist5k", "test"), 200, seed=0)
    return train, test


@pytest.fixture(scope="session")
def trained_cnn(mnist_small):
    """A SmallCNN(width=8) trained normally for 6 epochs on 1,000 images (about 93% clean test
    accuracy), in eval mode. Tests must not modify it (copy.deepcopy it first)."""
    torch.manual_seed(0)
    train, _ = mnist_small
    mean, std = ntklab.data.stats("mnist5k")
    model = SmallCNN(width=8, mean=mean, std=std)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = train.tensors
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(6):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def fake_cifar10(tmp_path_factory):
    """A folder holding a tiny CIFAR-10 in torchvision's on-disk format (5 training batches of 40
    images and a test batch of 40, random pixels, every class present), so that the ``paper``
    profile's code path runs offline. Use it through :func:`paper_profile`."""
    import pickle

    import numpy as np

    root = tmp_path_factory.mktemp("fake_cifar10")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(40, 3 * 32 * 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images, "labels": [i % 10 for i in range(40)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return root


@pytest.fixture
def paper_profile(fake_cifar10, monkeypatch):
    """The ``paper`` profile (CIFAR-10, PreAct ResNet-18, eps 8/255, ...) on a tiny CPU subset: the
    fake CIFAR-10 of :func:`fake_cifar10` as ``$NTKLAB_DATA``, 40 training and 20 test images, a
    PreAct ResNet-18 of width 4, two epochs with a decay after the first, short attacks. Every
    experiment's ``paper`` code path runs in a test with it (``ntklab.experiments.run(name,
    paper_profile, "cpu")``); only the sizes differ from the real profile."""
    import torchvision.datasets.cifar as tv_cifar

    from ntklab.config import get_profile

    monkeypatch.setenv("NTKLAB_DATA", str(fake_cifar10))
    # the fake files have no official checksums
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    return get_profile("paper").replace(n_train=40, n_test=20, batch_size=20, epochs=2, lr_milestones=(1,),
                                        model_kwargs={"width": 4}, pgd_steps=2, eval_pgd_steps=2,
                                        n_eval=20, n_probe=10)
