"""Bad input is refused by ntklab itself, before any work, with a ValueError that names the argument.

One test class per kind of input a probe of the package found accepted with meaningless results or
refused only from deep inside torch: model sizes and statistics, labels and dtypes in attacks and
evaluation, non-finite logits, kernel inputs, and training arguments. (The command line, the device
and seed, and the data cache have their own tests in test_cli.py, test_config.py, test_data.py.)
"""
import copy
import math

import pytest
import torch

import ntklab
from ntklab import attacks, evaluate, models
from ntklab.ntk import empirical_ntk
from ntklab.train import Callback, train

EPS = 0.3


@pytest.fixture
def batch(mnist_small):
    x, y = mnist_small[1].tensors
    return x[:16], y[:16]


def nan_model(trained_cnn):
    """A model whose logits are NaN (a broken weight)."""
    model = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        model.classifier[-1].weight[0, 0] = float("nan")
    return model


# ---------------------------------------------------------------- models
class TestModels:
    SIZES = [0, -1, 2.5, "8", True, None]

    @pytest.mark.parametrize("value", SIZES)
    @pytest.mark.parametrize("name", ["num_classes", "width", "in_channels", "image_size"])
    def test_small_cnn_sizes(self, name, value):
        with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1"):
            models.SmallCNN(**{name: value})

    @pytest.mark.parametrize("cls, name", [
        (models.PreActResNet18, "num_classes"), (models.PreActResNet18, "width"),
        (models.PreActResNet18, "in_channels"), (models.WideResNet, "widen"), (models.WideResNet, "num_classes"),
        (models.WideResNet, "depth"), (models.TwoLayerNet, "width"), (models.TwoLayerNet, "in_features"),
        (models.TwoLayerNet, "num_classes")])
    @pytest.mark.parametrize("value", [0, -3, 1.5, "4"])
    def test_other_model_sizes(self, cls, name, value):
        with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1"):
            cls(**{name: value})

    def test_block_counts(self):
        with pytest.raises(ValueError, match=r"num_blocks\[1\] must be an integer >= 1"):
            models.PreActResNet18(num_blocks=(2, 0, 2, 2))
        with pytest.raises(ValueError, match="num_blocks must be a sequence"):
            models.PreActResNet18(num_blocks=())

    @pytest.mark.parametrize("mean, std, message", [
        ((float("nan"),), (0.3,), "must be finite"), ((0.1,), (float("inf"),), "must be finite"),
        ((0.1,), (0.0,), "std must be positive"), ((0.1,), (-1.0,), "std must be positive"),
        (("a",), (0.3,), "sequences of numbers"), ((0.1, 0.2), (0.3, 0.3), "need 1 values")])
    def test_normalisation_statistics(self, mean, std, message):
        with pytest.raises(ValueError, match=message):
            models.SmallCNN(mean=mean, std=std)


# ---------------------------------------------------------------- attacks, losses and evaluation
# every attack of attacks.ATTACKS, called directly (a new attack joins this matrix by itself); the
# arguments an attack cannot do without are here
ATTACK_ARGS = {"pgd": dict(alpha=0.1, steps=2),
               "fgsm_pca": dict(basis=torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)) / 8)}


def _attack_call(name):
    return lambda m, x, y, **kw: getattr(attacks, name)(m, x, y, eps=EPS, **{**ATTACK_ARGS.get(name, {}), **kw})


ATTACK_CALLS = {
    **{name: _attack_call(name) for name in attacks.ATTACKS},
    "trades": lambda m, x, y, **kw: attacks.trades_loss(m, x, y, eps=EPS, alpha=0.1, steps=2, **kw),
    "by name": lambda m, x, y, **kw: attacks.adversarial_examples("pgd", m, x, y, eps=EPS, steps=2, **kw),
    "clean accuracy": lambda m, x, y, **kw: evaluate.clean_accuracy(m, (x, y)),
    "pgd accuracy": lambda m, x, y, **kw: evaluate.pgd_accuracy(m, (x, y), eps=EPS, steps=2),
    "worst case": lambda m, x, y, **kw: evaluate.worst_case_accuracy(m, (x, y), eps=EPS, steps=2),
    "robust flags": lambda m, x, y, **kw: evaluate.robust_flags(
        m, (x, y), [lambda m, xb, yb: attacks.fgsm(m, xb, yb, eps=EPS)]),
    "autoattack": lambda m, x, y, **kw: evaluate.autoattack_accuracy(m, (x, y), eps=EPS, version="custom",
                                                                     attacks=["apgd-ce"]),
}


class TestAttacksAndEvaluation:
    @pytest.mark.parametrize("bad", [-1, -100, 10, 99])
    @pytest.mark.parametrize("name", ATTACK_CALLS)
    def test_labels_out_of_range(self, name, bad, trained_cnn, batch):
        """-100 is torch's "ignore" label and -1 fails deep inside cross_entropy: both are refused."""
        x, y = batch
        y = y.clone()
        y[3] = bad
        with pytest.raises(ValueError, match=r"must lie in \[0, 10\)"):
            ATTACK_CALLS[name](trained_cnn, x, y)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
    @pytest.mark.parametrize("name", ATTACK_CALLS)
    def test_labels_not_integers(self, name, dtype, trained_cnn, batch):
        x, y = batch
        with pytest.raises(ValueError, match="integer|labels must be integers"):
            ATTACK_CALLS[name](trained_cnn, x, y.to(dtype))

    @pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
    @pytest.mark.parametrize("name", ATTACK_CALLS)
    def test_labels_of_any_integer_dtype_are_converted(self, name, dtype, trained_cnn, batch):
        """int32/int16/uint8 labels (numpy's defaults, image-folder loaders) give the int64 answer,
        never torch's "expected Long" from inside cross_entropy."""
        x, y = batch
        torch.manual_seed(0)
        want = ATTACK_CALLS[name](trained_cnn, x, y)
        torch.manual_seed(0)
        got = ATTACK_CALLS[name](trained_cnn, x, y.to(dtype))
        if isinstance(want, tuple):
            want, got = want[1], got[1]
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))

    RADIUS_CALLS = {
        **{name: lambda m, x, y, name=name, **kw: getattr(attacks, name)(
            m, x, y, **{"eps": EPS, **ATTACK_ARGS.get(name, {}), **kw}) for name in attacks.ATTACKS},
        "trades": lambda m, x, y, **kw: attacks.trades_loss(m, x, y, **{"eps": EPS, "alpha": 0.1, "steps": 2, **kw}),
        "pgd accuracy": lambda m, x, y, **kw: evaluate.pgd_accuracy(m, (x, y), **{"eps": EPS, **kw}),
        "worst case": lambda m, x, y, **kw: evaluate.worst_case_accuracy(m, (x, y), **{"eps": EPS, **kw}),
        "autoattack": lambda m, x, y, **kw: evaluate.autoattack_accuracy(m, (x, y), **{"eps": EPS, **kw}),
        "by name": lambda m, x, y, **kw: attacks.adversarial_examples("pgd", m, x, y, **{"eps": EPS, "steps": 2,
                                                                                          **kw}),
    }

    @pytest.mark.parametrize("name", RADIUS_CALLS)
    @pytest.mark.parametrize("arg", ["eps", "alpha"])
    def test_radius_in_the_wrong_units(self, name, arg, trained_cnn, batch):
        """8 meant as 8/255: refused with the suggestion, for every attack and evaluation."""
        if arg == "alpha" and name in ("fgsm", "autoattack"):
            pytest.skip(f"{name} takes no step size")
        with pytest.raises(ValueError, match=rf"{arg} must be in \[0, 1\].*{arg}=8 / 255 = 0.03137"):
            self.RADIUS_CALLS[name](trained_cnn, *batch, **{arg: 8})

    def test_radius_in_the_wrong_units_in_training_and_callbacks(self, batch):
        x, y = batch
        for make in (lambda: ntklab.train.TrainConfig("pgd", 1, eps=8), lambda: ntklab.train.TrainConfig(
                "normal", 1, eval_eps=8), lambda: ntklab.train.TrainConfig("pgd", 1, eps=0.1, alpha=2),
                     lambda: ntklab.callbacks.KernelSnapshots(x, y, eps=8),
                     lambda: ntklab.callbacks.CatastrophicOverfittingDetector(x, y, eps=8),
                     lambda: attacks.n_fgsm(models.SmallCNN(width=2), x, y, eps=0.1, noise=16)):
            with pytest.raises(ValueError, match=r"must be in \[0, 1\] \(pixel scale"):
                make()
        assert ntklab.train.TrainConfig("pgd", 1, eps=1.0).eps == 1.0  # the whole range is a valid radius

    def test_worst_case_refuses_fgsm_pca_before_any_work(self, trained_cnn, batch):
        with pytest.raises(ValueError, match="'fgsm_pca' needs a noise basis.*robust_flags"):
            evaluate.worst_case_accuracy(trained_cnn, batch, eps=EPS, attacks=["fgsm", "fgsm_pca"])

    @pytest.mark.parametrize("name", ATTACK_CALLS)
    def test_inputs_of_another_dtype_than_the_model(self, name, trained_cnn, batch):
        x, y = batch
        with pytest.raises(ValueError, match=r"dtype torch.float64 but the model computes in torch.float32"):
            ATTACK_CALLS[name](trained_cnn, x.double(), y)

    @pytest.mark.parametrize("name", ATTACK_CALLS)
    def test_model_with_non_finite_logits(self, name, trained_cnn, batch):
        """FGSM used to return x unchanged from a NaN model; accuracies used to be computed on NaN."""
        x, y = batch
        with pytest.raises(ValueError, match="logits that are not finite"):
            ATTACK_CALLS[name](nan_model(trained_cnn), x, y)

    @pytest.mark.parametrize("name", ATTACK_CALLS)
    def test_non_finite_or_integer_images(self, name, trained_cnn, batch):
        x, y = batch
        x_nan = x.clone()
        x_nan[-1, 0, -1, -1] = float("nan")
        with pytest.raises(ValueError, match="NaN or infinite"):
            ATTACK_CALLS[name](trained_cnn, x_nan, y)
        with pytest.raises(ValueError, match="floating-point tensor, got dtype torch.uint8"):
            ATTACK_CALLS[name](trained_cnn, (x * 255).to(torch.uint8), y)

    def test_eps_zero_needs_no_step_size(self, trained_cnn, batch):
        """eps = 0 through the by-name entry point: the default step eps / 4 would be 0 (refused)."""
        x, y = batch
        for name in attacks.ATTACKS:
            steps = 3 if name == "pgd" else None
            kw = {"basis": attacks.pca_noise_basis(x)} if name == "fgsm_pca" else {}
            assert torch.equal(attacks.adversarial_examples(name, trained_cnn, x, y, eps=0.0, steps=steps, **kw), x)
        loss, x_adv = attacks.trades_loss(trained_cnn, x, y, eps=0.0, alpha=None, steps=2)
        assert torch.equal(x_adv, x) and torch.isfinite(loss)
        assert evaluate.pgd_accuracy(trained_cnn, (x, y), eps=0.0) == evaluate.clean_accuracy(trained_cnn, (x, y))

    @pytest.mark.parametrize("kw, message", [
        (dict(eps=-0.1), "eps must be >= 0"), (dict(eps=float("inf")), "eps must be a finite number"),
        (dict(alpha=0.0), "alpha must be > 0"), (dict(steps=0), "steps must be an integer >= 1"),
        (dict(steps=2.0), "steps must be an integer >= 1"), (dict(restarts=0), "restarts must be an integer")])
    def test_evaluation_arguments(self, kw, message, trained_cnn, batch):
        with pytest.raises(ValueError, match=message):
            evaluate.pgd_accuracy(trained_cnn, batch, **{"eps": EPS, **kw})


# ---------------------------------------------------------------- kernels
class TestKernels:
    def test_non_finite_inputs_anywhere(self, trained_cnn, batch):
        x, _ = batch
        for value in (float("nan"), float("inf"), -float("inf")):
            bad = x[:4].clone()
            bad[-1, 0, 27, 27] = value                       # the last pixel of the last input
            with pytest.raises(ValueError, match="x1 contains NaN or infinite values"):
                empirical_ntk(trained_cnn, bad, kind="trace")
            with pytest.raises(ValueError, match="x2 contains NaN or infinite values"):
                empirical_ntk(trained_cnn, x[:4], bad, kind="trace")

    @pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
    def test_integer_images(self, dtype, trained_cnn, batch):
        """uint8 images in 0-255 used to give kernels 10^4 times too large."""
        x, _ = batch
        with pytest.raises(ValueError, match=rf"x1 must be a floating-point tensor, got dtype {dtype}"):
            empirical_ntk(trained_cnn, (x[:4] * 255).to(dtype), kind="trace")

    def test_float64_inputs_follow_the_model(self, trained_cnn, batch):
        x, _ = batch
        K = empirical_ntk(trained_cnn, x[:4].double(), kind="trace")
        assert K.dtype == torch.float32 and torch.equal(K, empirical_ntk(trained_cnn, x[:4], kind="trace"))


# ---------------------------------------------------------------- training
def tiny_train(mnist_small, **kw):
    torch.manual_seed(0)
    model = models.SmallCNN(width=2, mean=ntklab.data.stats("mnist5k")[0], std=ntklab.data.stats("mnist5k")[1])
    before = copy.deepcopy(model.state_dict())
    args = dict(strategy="pgd", epochs=1, batch_size=64, eps=EPS, steps=2, progress=False, device="cpu")
    args.update(kw)
    return model, before, lambda: train(model, ntklab.data.subset(mnist_small[0], 128, seed=0), **args)


def unchanged(model, before):
    return all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class TestTraining:
    @pytest.mark.parametrize("kw, message", [
        (dict(lr=float("nan")), "lr must be a finite number"), (dict(lr=float("inf")), "lr must be a finite"),
        (dict(lr=0.0), "lr must be > 0"), (dict(lr=-0.1), "lr must be > 0"),
        (dict(lr=0.1, lr_schedule="cosine"), None),
        (dict(epochs=2.5), "epochs must be an integer >= 0"), (dict(epochs="3"), "epochs must be an integer"),
        (dict(epochs=-1), "epochs must be an integer >= 0"), (dict(batch_size=0), "batch_size must be"),
        (dict(momentum=-0.5), "momentum must be >= 0"), (dict(weight_decay=float("nan")), "weight_decay must"),
        (dict(gamma=0.0, milestones=(1,)), "gamma must be > 0"),
        (dict(milestones=(1.5,)), "milestones must be an integer"), (dict(milestones=3), "milestones must be a"),
        (dict(seed=-1), "seed must be an integer >= 0"), (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*63\)"),
        (dict(switch_epoch=0.5), "switch_epoch must be an integer"), (dict(eval_steps=0), "eval_steps must be"),
    ])
    def test_arguments_refused_before_any_epoch(self, kw, message, mnist_small):
        if message is None:
            return                                   # a valid combination, listed to show the others differ
        model, before, run = tiny_train(mnist_small, **kw)
        with pytest.raises(ValueError, match=message):
            run()
        assert unchanged(model, before)

    @pytest.mark.parametrize("kw, message", [
        (dict(eps=-1.0), "eps must be >= 0"), (dict(alpha=0.0), "alpha must be > 0"),
        (dict(steps=0), "steps must be an integer >= 1"), (dict(attack_bn_mode="batch"), "attack_bn_mode"),
        (dict(strategy="fgsm", alpha=0.1, steps=None), "'fgsm' takes no alpha"),
        (dict(strategy="fgsm_rs", alpha=None, steps=None, attack_kwargs={"nosie": 0.1}),
         r"attack_kwargs has arguments \['nosie'\] that 'fgsm_rs' does not take; it takes: generator"),
        (dict(strategy="fgsm_logscale", alpha=None, steps=None, attack_kwargs={"low": -1.0}), "low must be > 0"),
        (dict(strategy="n_fgsm", alpha=None, steps=None, attack_kwargs={"noise": 8}), r"noise must be in \[0, 1\]"),
        (dict(strategy="pgd", attack_kwargs={"restarts": 0}), "restarts must be an integer >= 1"),
    ])
    def test_attack_arguments_checked_before_the_normal_epochs(self, kw, message, mnist_small):
        """With switch_epoch the first epochs are normal training: the attack's arguments are still
        checked before them, not after the switch."""
        model, before, run = tiny_train(mnist_small, epochs=2, switch_epoch=1, **kw)
        with pytest.raises(ValueError, match=message):
            run()
        assert unchanged(model, before)

    def test_callbacks_are_checked_before_any_epoch(self, mnist_small):
        for callbacks, message in (([ntklab.callbacks.Callback], "is the class Callback, not an instance"),
                                   ([lambda *a: None], "is a function with none of the hooks"),
                                   ([object()], "is a object with none of the hooks"),
                                   (ntklab.callbacks.Callback(), "must be a list of callback objects")):
            model, before, run = tiny_train(mnist_small, callbacks=callbacks)
            with pytest.raises(ValueError, match=message):
                run()
            assert unchanged(model, before)
        model, before, run = tiny_train(mnist_small, callbacks=None)       # None: no callbacks
        run()

    def test_a_callback_that_raises_stops_training_naming_itself(self, mnist_small):
        class Broken(Callback):
            def on_epoch_end(self, epoch, model, history):
                raise ZeroDivisionError("by zero")

        model, before, run = tiny_train(mnist_small, epochs=3, callbacks=[Broken()])
        with pytest.raises(ZeroDivisionError) as err:
            run()
        assert err.value.__notes__ == ["raised by the callback Broken in on_epoch_end after epoch 0; training stopped"]

    def test_models_and_batches_that_cannot_train(self, mnist_small):
        x, y = ntklab.data.subset(mnist_small[0], 65, seed=0).tensors
        frozen = models.SmallCNN(width=2).requires_grad_(False)
        with pytest.raises(ValueError, match="no trainable parameters"):
            train(frozen, (x, y), strategy="normal", epochs=1, progress=False)
        flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10), torch.nn.BatchNorm1d(10))
        before = copy.deepcopy(flat.state_dict())
        with pytest.raises(ValueError, match=r"last batch of every epoch would hold one example \(65 examples"):
            train(flat, (x, y), strategy="normal", epochs=1, batch_size=64, progress=False)
        assert all(torch.equal(v, flat.state_dict()[k]) for k, v in before.items())
        train(flat, (x, y), strategy="normal", epochs=1, batch_size=40, progress=False)   # a last batch of 25 trains

    def test_checkpoint_dir_that_is_a_file(self, mnist_small, tmp_path):
        afile = tmp_path / "afile"
        afile.write_text("x")
        model, before, run = tiny_train(mnist_small, checkpoint_dir=afile)
        with pytest.raises(ValueError, match="checkpoint_dir .* is a file, not a folder"):
            run()
        assert unchanged(model, before)
        model, before, run = tiny_train(mnist_small, checkpoint_dir="/proc/ntklab-checkpoints")
        with pytest.raises(ValueError, match="checkpoint_dir .* cannot be created"):
            run()

    def test_labels_and_dtypes_of_the_data(self, mnist_small):
        x, y = ntklab.data.subset(mnist_small[0], 64, seed=0).tensors
        model, before, _ = tiny_train(mnist_small)
        bad = y.clone()
        bad[5] = 10
        with pytest.raises(ValueError, match=r"labels of train_set must lie in \[0, 10\)"):
            train(model, (x, bad), strategy="normal", epochs=1, progress=False)
        with pytest.raises(ValueError, match=r"labels of eval_set must lie in \[0, 10\)"):
            train(model, (x, y), strategy="normal", epochs=1, eval_set=(x, bad), progress=False)
        with pytest.raises(ValueError, match="dtype torch.float64 but the model computes in torch.float32"):
            train(model, (x.double(), y), strategy="normal", epochs=1, progress=False)
        assert unchanged(model, before)

    def test_eps_zero_trains(self, mnist_small):
        """Adversarial training at radius 0 is normal training; the default step eps / 4 = 0 used to be refused."""
        model, _, run = tiny_train(mnist_small, eps=0.0, alpha=None)
        history = run()
        assert history.finished and math.isfinite(history.loss[0])

    def test_a_loss_that_becomes_nan_stops_the_run(self, mnist_small, tmp_path):
        class Breaker(Callback):
            def on_epoch_end(self, epoch, model, history):
                if epoch == 0:
                    with torch.no_grad():
                        model.classifier[-1].weight.fill_(float("nan"))

        model, _, run = tiny_train(mnist_small, strategy="normal", steps=None, epochs=3, callbacks=[Breaker()],
                                   checkpoint_dir=tmp_path)
        with pytest.raises(FloatingPointError, match="training diverged in epoch 1.*loss is nan"):
            run()
        saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        assert saved["history"]["epoch"] == [0] and not saved["history"]["finished"]


# ---------------------------------------------------------------- callbacks and metrics (before any work)
class TestCallbacksAndMetrics:
    @pytest.mark.parametrize("kw, message", [
        (dict(kind="logits"), "kind must be one of 'full', 'trace', 'diagonal'"),
        (dict(implementation="fast"), "implementation must be one of"),
        (dict(epochs=(0, -1)), "epochs must be an integer >= 0"), (dict(epochs=(0, 1.5)), "epochs must be an integer"),
        (dict(epochs=3), "epochs must be a sequence"), (dict(dtype=torch.int64), "dtype must be a floating-point"),
        (dict(steps=0), "steps must be an integer >= 1"), (dict(chunk_size=0), "chunk_size must be an integer"),
        (dict(attack_bn_mode="keep"), "attack_bn_mode must be 'eval' or 'train'"),
        (dict(statistics_x=torch.rand(4, 28, 28)), "statistics_x must be a 4-D tensor"),
    ])
    def test_kernel_snapshots_are_checked_when_built(self, kw, message, batch):
        x, y = batch
        with pytest.raises(ValueError, match=message):
            ntklab.callbacks.KernelSnapshots(x, y, **kw)

    def test_kernel_snapshots_probe(self, batch):
        x, y = batch
        with pytest.raises(ValueError, match="probe_x must be a 4-D tensor"):
            ntklab.callbacks.KernelSnapshots(x.flatten(1), y)
        with pytest.raises(ValueError, match="probe_x must lie in"):
            ntklab.callbacks.KernelSnapshots(x * 255, y)
        with pytest.raises(ValueError, match=r"probe_y must have shape \(N,\)"):
            ntklab.callbacks.KernelSnapshots(x, y[:3])
        assert ntklab.callbacks.KernelSnapshots(x, y.int()).probe_y.dtype == torch.int64

    def test_metrics_refuse_what_is_not_a_kernel(self):
        from ntklab import metrics

        torch.manual_seed(0)
        A = torch.randn(5, 5, dtype=torch.float64)
        K = A @ A.T
        for fn in (metrics.effective_rank, metrics.top_eigenvalue, lambda M: metrics.top_concentration(M, 2)):
            with pytest.raises(ValueError, match="K must be a symmetric kernel matrix"):
                fn(K + torch.triu(torch.ones_like(K), 1))
            fn(K + 1e-12 * torch.randn_like(K))                    # rounding: symmetrised
        with pytest.raises(ValueError, match="must be real, got a complex"):
            metrics.kernel_distance(K.to(torch.complex128), K)
        with pytest.raises(ValueError, match="must be real, got a complex array"):
            metrics.effective_rank(K.numpy() + 0j)
        for bad in ([0.0, float("nan"), 2.0], [0.0, 1.0, float("inf")]):
            for fn in (metrics.kernel_velocity, metrics.angular_velocity):
                with pytest.raises(ValueError, match="times must be finite"):
                    fn([K, 2 * K + torch.eye(5, dtype=K.dtype), K], bad)
