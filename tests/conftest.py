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
