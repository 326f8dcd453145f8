"""The runs shared by chapters 4 and 5 (ntklab.experiments.runs): their settings per profile."""
from ntklab.config import get_profile
from ntklab.experiments import runs


def test_chapter_profile_decays_at_half_and_three_quarters(paper_profile):
    smoke, quick, paper = (runs.chapter_profile(get_profile(n)) for n in ("smoke", "quick", "paper"))
    assert (smoke.epochs, smoke.lr_milestones) == (4, (2, 3))
    assert (quick.epochs, quick.lr_milestones, quick.model_kwargs) == (20, (10, 15), {"width": 8})
    assert (quick.eps, quick.pgd_alpha, quick.pgd_steps, quick.n_probe, quick.n_eval) == (0.15, 0.0375, 3, 100, 1000)
    assert paper == get_profile("paper")  # the paper profile as it is: 200 epochs, decays at 100 and 150
    assert runs.chapter_profile(paper_profile).lr_milestones == (1,)  # 2 epochs: the decay at 50% only
    other = get_profile("quick").replace(name="mine", epochs=8)
    assert runs.chapter_profile(other) == other.replace(lr_milestones=(4, 6))  # unknown names: only the decays


def test_snapshots_after_every_epoch_at_small_scale_and_fifty_over_a_paper_run():
    for name in ("smoke", "quick"):
        cp = runs.chapter_profile(get_profile(name))
        assert runs.RunSettings.for_profile(cp).snapshot_epochs(cp) == list(range(cp.epochs + 1))
    paper = get_profile("paper")
    assert runs.RunSettings.for_profile(paper).snapshot_epochs(paper) == list(range(0, 201, 4))
    odd = paper.replace(epochs=7)
    assert runs.RunSettings.for_profile(odd).snapshot_epochs(odd) == list(range(8))


def test_run_config_keys_a_run_by_its_training_and_measurements():
    cp = runs.chapter_profile(get_profile("quick"))
    plain = runs.run_config(cp, "pgd", "multistep", True)
    assert plain["train"]["strategy"] == "pgd" and plain["train"]["milestones"] == (10, 15) and plain["ae"] is True
    assert plain["snapshot_epochs"] == list(range(21)) and plain["probe"]["n"] == 100
    switched = runs.run_config(cp, "pgd", "multistep", False, {"switch_epoch": 5})
    assert switched["train"]["switch_epoch"] == 5 and switched != plain
