"""ntklab.noise: checks of a noise basis and the names kept in ntklab.attacks. The basis and the noise
themselves (against the data's covariance) are tested with the attack that uses them, in
test_pca_noise.py."""
import pytest
import torch

from ntklab import attacks, noise


def test_old_import_paths_are_the_same_functions():
    assert attacks.pca_noise_basis is noise.pca_noise_basis and attacks.pca_noise is noise.pca_noise


def test_check_basis():
    basis = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    x = torch.rand(2, 1, 4, 4)
    out = noise.check_basis(basis, x)
    assert out.dtype == torch.float32 and torch.equal(out, basis.float())
    assert noise.check_basis(basis) is basis
    with pytest.raises(ValueError, match="fgsm_pca needs basis=.*ntklab.noise.pca_noise_basis"):
        noise.check_basis(None)
    with pytest.raises(ValueError, match=r"basis must be a floating-point tensor \(r, C, H, W\) with r >= 1"):
        noise.check_basis(basis[:0])
    with pytest.raises(ValueError, match="floating-point tensor"):
        noise.check_basis(basis.long())
    with pytest.raises(ValueError, match=r"basis must have shape \(r, 1, 4, 4\) to match x"):
        noise.check_basis(basis[:, :, :2], x)
    bad = basis.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        noise.check_basis(bad)


def test_noise_shape_dtype_and_generator():
    basis = torch.randn(3, 1, 4, 4)
    a = noise.pca_noise(basis, 5, generator=torch.Generator().manual_seed(0))
    assert a.shape == (5, 1, 4, 4) and a.dtype == torch.float32
    assert torch.equal(a, noise.pca_noise(basis, 5, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        noise.pca_noise(basis, 0)
