import pytest
import random

import numpy as np
import torch

from ntklab import config


def test_default_profile_is_quick(monkeypatch):
    monkeypatch.delenv("NTKLAB_PROFILE", raising=False)
    assert config.get_profile().name == "quick"


def test_env_var_selects_profile(monkeypatch):
    monkeypatch.setenv("NTKLAB_PROFILE", "smoke")
    assert config.get_profile().name == "smoke"
    # an explicit argument wins over the environment
    assert config.get_profile("paper").name == "paper"


def test_profile_name_is_case_insensitive():
    assert config.get_profile(" Quick ").name == "quick"


def test_unknown_profile_lists_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown profile 'fast'.*smoke, quick, paper"):
        config.get_profile("fast")
    monkeypatch.setenv("NTKLAB_PROFILE", "huge")
    with pytest.raises(ValueError, match=r"'huge' \(from \$NTKLAB_PROFILE\)"):
        config.get_profile()


def test_profiles_match_the_design():
    quick, paper, smoke = (config.get_profile(n) for n in ("quick", "paper", "smoke"))
    assert quick.dataset == "mnist5k" and quick.model == "small_cnn"
    assert paper.dataset == "cifar10" and paper.model == "preact_resnet18"
    assert paper.eps == pytest.approx(8 / 255) and paper.pgd_steps == 10
    assert paper.epochs == 200 and paper.lr_milestones == (100, 150)
    assert smoke.n_train < 1000 and smoke.model_kwargs["width"] < quick.model_kwargs["width"]
    for p in (quick, paper, smoke):
        assert 0 < p.pgd_alpha <= p.eps


def test_profile_replace_and_dict():
    p = config.get_profile("quick").replace(epochs=3)
    assert p.epochs == 3 and config.get_profile("quick").epochs != 3
    assert p.to_dict()["epochs"] == 3
    with pytest.raises(dataclasses_error()):
        config.get_profile("quick").epochs = 5


def dataclasses_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_device_auto_and_forced(monkeypatch):
    monkeypatch.delenv("NTKLAB_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert config.get_device().type == expected
    assert config.get_device("auto").type == expected
    assert config.get_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("NTKLAB_DEVICE", "cpu")
    assert config.get_device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        config.get_device("cuda")


def test_unknown_device():
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        config.get_device("gpu0")
    for name in ("mps", "meta", "xla", torch.device("meta")):
        with pytest.raises(ValueError, match="unsupported device"):
            config.get_device(name)
    with pytest.raises(ValueError, match="unknown device 'cpu:3'"):
        config.get_device("cpu:3")
    assert config.get_device(torch.device("cpu")) == torch.device("cpu")
    assert config.get_device(" cpu ") == torch.device("cpu")


def test_seed_everything_repeats_all_generators():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    config.seed_everything(123)
    a = draw()
    config.seed_everything(123)
    assert draw() == a
    config.seed_everything(124)
    assert draw() != a
    for bad in (-1, 2**63, True, 1.5, "1"):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
            config.seed_everything(bad)
    config.seed_everything(2**63 - 1)


def test_seed_from_the_environment(monkeypatch):
    monkeypatch.setenv("NTKLAB_SEED", "2")
    assert config.get_profile("quick").seed == 2 and config.get_profile("smoke").seed == 2
    monkeypatch.setenv("NTKLAB_SEED", "")
    assert config.get_profile("quick").seed == 0
    for bad in ("-1", "1.5", "x", str(2**63)):
        monkeypatch.setenv("NTKLAB_SEED", bad)
        with pytest.raises(ValueError, match=r"\$NTKLAB_SEED must be an integer"):
            config.get_profile()


@pytest.mark.parametrize("change, message", [
    (dict(epochs=-1), "epochs must be an integer >= 0"), (dict(eps="0.1"), "eps must be a finite number"),
    (dict(eps=8), r"eps must be in \[0, 1\].*8 / 255"), (dict(dataset="cifar11"), "unknown dataset 'cifar11'"),
    (dict(model="resnet"), "unknown model 'resnet'"), (dict(batch_size=0), "batch_size must be an integer >= 1"),
    (dict(lr=0.0), "lr must be > 0"), (dict(n_train=-5), "n_train must be an integer"),
    (dict(lr_milestones=5), "lr_milestones must be a sequence"), (dict(seed=-1), "seed must be an integer"),
    (dict(epoch=3), "Profile has no field 'epoch'"), (dict(pgd_alpha=0), "pgd_alpha must be > 0"),
])
def test_profiles_are_checked_when_built_or_replaced(change, message):
    with pytest.raises(ValueError, match=message):
        config.get_profile("quick").replace(**change)
    if "epoch" not in change:
        with pytest.raises(ValueError, match=message):
            config.Profile(**{**config.get_profile("smoke").to_dict(), **change})


# ---- the paper-scale profiles (issue 20): augmentation, best checkpoint, sources, the dry run -------

def test_paper_profiles_and_their_sources():
    import dataclasses

    paper = config.get_profile("paper")
    assert (paper.augment, paper.select_best) == ("crop_flip", True)
    assert (paper.lr, paper.momentum, paper.weight_decay, paper.batch_size) == (0.1, 0.9, 5e-4, 128)
    assert paper.pgd_alpha == pytest.approx(2 / 255) and paper.eval_pgd_steps == 20
    c100, svhn = config.get_profile("paper_cifar100"), config.get_profile("paper_svhn")
    assert c100.dataset == "cifar100" and svhn.dataset == "svhn" and svhn.lr == 0.01
    assert svhn.augment is None and c100.augment == "crop_flip"
    fields = {f.name for f in dataclasses.fields(config.Profile)} - {"name"}
    for name in ("paper", "paper_cifar100", "paper_svhn", "paper_cpu"):
        assert set(config.SOURCES[name]) == fields, name          # every setting says where it comes from
        assert all(isinstance(v, str) and v.strip() for v in config.SOURCES[name].values())
    # only eps and the decays are attested for Li et al.; the rest is sourced elsewhere
    li = {k for k, v in config.SOURCES["paper"].items() if "Li et al. 2023" in v}
    assert li == {"eps", "lr_milestones"}
    assert "Rice et al. 2020" in config.SOURCES["paper"]["select_best"]
    assert "book's choice" in config.SOURCES["paper"]["lr"]
    assert set(config.SOURCES) == {n for n in config.PROFILES if n.startswith("paper")}


def test_paper_cpu_has_the_paper_structure_at_a_tiny_size():
    from ntklab import data

    cpu, paper = config.get_profile("paper_cpu"), config.get_profile("paper")
    assert cpu.dataset == "synthetic_cifar10" and cpu.dataset in data.SYNTHETIC
    assert data.info(cpu.dataset)["channels"] == 3 and data.info(cpu.dataset)["image_size"] == 32
    assert cpu.model == paper.model == "preact_resnet18" and cpu.model_kwargs["width"] < 64
    assert (cpu.augment, cpu.select_best) == (paper.augment, paper.select_best)
    assert cpu.eps == paper.eps and len(cpu.lr_milestones) == 2 and max(cpu.lr_milestones) < cpu.epochs
    assert cpu.epochs <= 6 and cpu.n_train <= 500 and cpu.n_probe <= 32 and cpu.n_eval <= 100
    assert 0 < cpu.pgd_alpha <= cpu.eps and cpu.pgd_steps < paper.pgd_steps
    assert "SYNTHETIC" in config.SOURCES["paper_cpu"]["dataset"] and "paper_cpu" in config.__doc__
    assert config.get_profile("PAPER_CPU") is cpu


def test_new_fields_are_checked_and_left_out_of_old_cache_keys():
    quick = config.get_profile("quick")
    assert "augment" not in quick.to_dict() and "select_best" not in quick.to_dict()
    paper = config.get_profile("paper")
    d = paper.to_dict()
    assert d["augment"] == "crop_flip" and d["select_best"] is True
    assert config.Profile(**d) == paper and config.Profile(**quick.to_dict()) == quick
    for change, message in ((dict(augment="flip"), "augment must be None or one of 'crop_flip'"),
                            (dict(augment=1), "augment must be None"),
                            (dict(select_best="yes"), "select_best must be True or False"),
                            (dict(select_best=1), "select_best must be True or False")):
        with pytest.raises(ValueError, match=message):
            quick.replace(**change)
    assert quick.replace(augment="crop_flip", select_best=True).to_dict()["select_best"] is True
