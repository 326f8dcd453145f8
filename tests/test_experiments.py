"""Tests of the experiments' helpers (model_from_profile, data_from_profile, train_kwargs, trained_model).
The experiments have test files of their own; the cache is tested in test_cache.py, the registry in
test_registry.py."""
import pytest
import torch

import ntklab
from ntklab import experiments
from ntklab.config import get_profile
from ntklab.experiments import cache



# ---------------------------------------------------------------- helpers of the experiments
# (the cache's tests are in test_cache.py, the registry's in test_registry.py)
@pytest.mark.parametrize("dataset, size", [("mnist5k", 28), ("digits", 8)])
def test_model_from_profile(dataset, size):
    profile = get_profile("smoke").replace(dataset=dataset)
    model = experiments.model_from_profile(profile)
    assert model(torch.rand(2, 1, size, size)).shape == (2, 10)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(ntklab.data.stats(dataset)[0])
    assert model.features[0].out_channels == 4  # model_kwargs width 4


def test_data_and_train_kwargs_from_profile():
    profile = get_profile("smoke")
    train_set, test_set = experiments.data_from_profile(profile)
    assert len(train_set) == profile.n_train and len(test_set) == profile.n_test
    assert experiments.train_kwargs(profile, "pgd")["steps"] == profile.pgd_steps
    kw = experiments.train_kwargs(profile, "fgsm")
    assert "alpha" not in kw and kw["eps"] == profile.eps and kw["epochs"] == profile.epochs


# ---------------------------------------------------------------- shared trained models
def test_trained_model_is_trained_once_and_shared():
    profile = get_profile("smoke")
    with cache.track() as paths:
        m1, h1 = experiments.trained_model(profile, "fgsm", device="cpu", progress=False, epochs=1)
        m2, h2 = experiments.trained_model(profile, "fgsm", device="cpu", progress=False, epochs=1)
    assert [how for _, how in paths] == ["computed", "loaded"]
    assert paths[0][0].parent.name == "models"
    state1, state2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(state1[k], state2[k]) for k in state1)
    assert len(h1) == len(h2) == 1 and h2.strategy == ["fgsm"] and not m2.training
    # the weights are those of a run of train() with the same arguments
    ntklab.config.seed_everything(profile.seed)
    ref = experiments.model_from_profile(profile)
    train_set, test_set = experiments.data_from_profile(profile)
    ntklab.train.train(ref, train_set, **{**experiments.train_kwargs(profile, "fgsm"), "epochs": 1},
                       eval_set=test_set, device="cpu", progress=False)
    assert all(torch.equal(ref.state_dict()[k], state1[k]) for k in state1)
    # another argument is another model
    m3, _ = experiments.trained_model(profile, "fgsm", device="cpu", progress=False, epochs=1, eps=0.2)
    assert not torch.equal(m3.state_dict()["features.0.weight"], state1["features.0.weight"])


def test_trained_model_refuses_what_it_cannot_key():
    profile = get_profile("smoke")
    with pytest.raises(ValueError, match="callbacks"):
        experiments.trained_model(profile, "pgd", callbacks=[])
    with pytest.raises(ValueError, match="unknown strategy 'adam'"):
        experiments.trained_model(profile, "adam")


