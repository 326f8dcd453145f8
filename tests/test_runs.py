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


def test_the_paper_shaped_dry_run_takes_the_paper_branch_of_every_experiment():
    """Under ``paper_cpu`` every experiment's settings come from its ``paper`` branch (the sizes from
    that profile), with kernels every 2 epochs where ``paper`` takes them every few epochs; ``quick``
    keeps its own branch."""
    from ntklab.experiments import _schedule_runs, batchnorm, frozen_kernel, ntk_features, overfitting, theorems

    dry, paper, quick = get_profile("paper_cpu"), get_profile("paper"), get_profile("quick")
    cp = runs.chapter_profile(dry)
    assert cp == dry.replace(lr_milestones=(2, 3)) and cp.model == "preact_resnet18"
    assert runs.RunSettings.for_profile(cp).snapshot_epochs(cp) == [0, 2, 4]
    ch5 = _schedule_runs.Settings.for_profile(dry)
    assert ch5.profile == cp and ch5.autoattack_n == dry.n_eval and ch5.n_seeds == 2
    assert _schedule_runs.Settings.for_profile(quick).n_seeds == 3
    ch6 = overfitting.Settings.for_profile(dry)
    assert (ch6.lr_schedule, ch6.pgd_at, ch6.nfgsm_noise) == ("cosine", True, 2.0)   # paper's branch
    assert (ch6.epochs, ch6.snapshot_every, ch6.n_seeds) == (dry.epochs, 2, 2)
    assert overfitting.Settings.for_profile(paper).epochs == 30
    fk = frozen_kernel.Settings.for_profile(dry)
    assert (fk.eps, fk.train_attack, fk.train_steps) == (4 / 255, "pgd", 2 * dry.pgd_steps) and fk.n_kernel == dry.n_probe
    assert frozen_kernel.Settings.for_profile(paper).n_kernel == 500
    assert ntk_features.Settings.for_profile(dry).classes == (0, 1)                # paper's pair
    th = theorems.Settings.for_profile(dry)
    assert th.relu_width is None and th.n_probe1 < dry.n_probe and th.n_robust == dry.n_eval
    bn = batchnorm.Settings.for_profile(dry)
    assert bn.switch_epoch is None and bn.n_eval == dry.n_eval and bn.n_aa == dry.n_eval
