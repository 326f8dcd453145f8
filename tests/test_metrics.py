"""Tests of ntklab.metrics: known answers, invariances, and an independent numpy computation."""
import math

import numpy as np
import pytest
import torch

from ntklab import metrics


def random_psd(m, rank=None, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(m, rank or m))
    return X @ X.T


def flat(K):
    """(n, n, k, k) -> (nk, nk) with index i*k + a, written out with loops."""
    n, _, k, _ = K.shape
    M = np.empty((n * k, n * k))
    for i in range(n):
        for j in range(n):
            for a in range(k):
                for b in range(k):
                    M[i * k + a, j * k + b] = K[i, j, a, b]
    return M


def test_kernel_distance_known_answers():
    K = random_psd(6)
    assert metrics.kernel_distance(K, 3.0 * K) == pytest.approx(0.0, abs=1e-12)
    e1, e2 = np.zeros((4, 4)), np.zeros((4, 4))
    e1[0, 0], e2[1, 1] = 1.0, 1.0
    assert metrics.kernel_distance(e1, e2) == pytest.approx(1.0)
    assert metrics.kernel_distance(torch.tensor(K), torch.tensor(2 * K)) == pytest.approx(0.0, abs=1e-12)


def test_kernel_distance_against_numpy_and_centring():
    K1, K2 = random_psd(8, seed=1), random_psd(8, seed=2)
    expected = 1 - np.trace(K1 @ K2) / (np.linalg.norm(K1) * np.linalg.norm(K2))
    assert metrics.kernel_distance(K1, K2) == pytest.approx(expected, rel=1e-12)
    H = np.eye(8) - np.ones((8, 8)) / 8
    C1, C2 = H @ K1 @ H, H @ K2 @ H
    expected_c = 1 - np.sum(C1 * C2) / (np.linalg.norm(C1) * np.linalg.norm(C2))
    assert metrics.kernel_distance(K1, K2, center=True) == pytest.approx(expected_c, rel=1e-12)
    # a constant added to a kernel changes the uncentred distance but not the centred one
    assert metrics.kernel_distance(K1, K2 + 50.0, center=True) == pytest.approx(expected_c, rel=1e-9)
    assert abs(metrics.kernel_distance(K1, K2 + 50.0) - expected) > 1e-3


def test_full_kernels_are_flattened_i_k_plus_a():
    rng = np.random.default_rng(3)
    n, k = 3, 2
    J = rng.normal(size=(n, k, 5))
    K = np.einsum("iaf,jbf->ijab", J, J)
    M = flat(K)
    K2 = K + 0.1 * np.einsum("iaf,jbf->ijab", J ** 2, J ** 2)
    assert metrics.kernel_distance(K, K2) == pytest.approx(metrics.kernel_distance(M, flat(K2)), rel=1e-12)
    assert metrics.effective_rank(K) == pytest.approx(metrics.effective_rank(M), rel=1e-10)
    C = metrics.center_kernel(K)
    assert C.shape == K.shape
    H = np.eye(n * k) - np.ones((n * k, n * k)) / (n * k)
    np.testing.assert_allclose(flat(C), H @ M @ H, atol=1e-12)


def test_center_kernel():
    K = random_psd(5, seed=4)
    C = metrics.center_kernel(K)
    np.testing.assert_allclose(C.sum(0), 0, atol=1e-10)
    np.testing.assert_allclose(metrics.center_kernel(K + 7.0), C, atol=1e-10)


def test_effective_rank():
    assert metrics.effective_rank(np.eye(7)) == pytest.approx(7.0)
    assert metrics.effective_rank(random_psd(6, rank=1)) == pytest.approx(1.0, rel=1e-6)
    K = random_psd(9, seed=5)
    lam = np.linalg.eigvalsh(K)
    p = lam[lam > 0] / lam[lam > 0].sum()
    assert metrics.effective_rank(K) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-10)


def test_top_concentration():
    assert metrics.top_concentration(random_psd(6, rank=1), 1) == pytest.approx(1.0)
    assert metrics.top_concentration(np.eye(4), 1) == pytest.approx(0.25)
    K = random_psd(8, seed=6)
    lam2 = np.sort(np.linalg.eigvalsh(K))[::-1] ** 2
    assert metrics.top_concentration(K, 3) == pytest.approx(lam2[:3].sum() / lam2.sum(), rel=1e-10)
    with pytest.raises(ValueError, match=r"q must be an integer in \[1, 8\]"):
        metrics.top_concentration(K, 0)
    with pytest.raises(ValueError, match="q must be"):
        metrics.top_concentration(K, 9)


def test_kernel_velocity():
    Ks = [random_psd(5, seed=s) for s in range(4)]
    times = [0.0, 1.0, 3.0, 3.5]
    v = metrics.kernel_velocity(Ks, times)
    expected = [metrics.kernel_distance(Ks[t], Ks[t + 1]) / (times[t + 1] - times[t]) for t in range(3)]
    np.testing.assert_allclose(v, expected, rtol=1e-12)
    np.testing.assert_allclose(metrics.kernel_velocity(Ks), expected * np.diff(times), rtol=1e-12)
    with pytest.raises(ValueError, match="strictly increasing"):
        metrics.kernel_velocity(Ks, [0, 1, 1, 2])
    with pytest.raises(ValueError, match="one entry per kernel"):
        metrics.kernel_velocity(Ks, [0, 1])


def test_polar_dynamics():
    K0 = random_psd(5, seed=7)
    Ks = [K0, K0 + 0.5 * random_psd(5, seed=8), 2 * K0, K0 + random_psd(5, seed=9)]
    radius, angle = metrics.polar_dynamics(Ks)
    assert radius[0] == 0 and radius[-1] == pytest.approx(1.0) and angle[0] == pytest.approx(0.0, abs=1e-6)
    assert angle[2] == pytest.approx(0.0, abs=1e-6)            # a rescaled kernel has not turned
    expected = np.linalg.norm(Ks[1] - K0) / np.linalg.norm(Ks[3] - K0)
    assert radius[1] == pytest.approx(expected, rel=1e-12)
    cos = np.sum(Ks[1] * K0) / (np.linalg.norm(Ks[1]) * np.linalg.norm(K0))
    assert angle[1] == pytest.approx(np.arccos(cos), rel=1e-9)


def test_alignment():
    u = np.array([1.0, -1.0, 1.0])
    assert metrics.alignment(np.outer(u, u), u) == pytest.approx(1.0)
    K = random_psd(3, seed=10)
    assert metrics.alignment(K, u) == pytest.approx(u @ K @ u / (np.linalg.norm(K) * 3), rel=1e-12)
    with pytest.raises(ValueError, match="length 3"):
        metrics.alignment(K, np.ones(4))


def class_block_kernel(labels, k, strength):
    """A full kernel whose output-c block is large on pairs of class-c inputs."""
    n = len(labels)
    rng = np.random.default_rng(11)
    J = 0.1 * rng.normal(size=(n, k, 20))
    for i, c in enumerate(labels):
        J[i, c, c] += strength
    return np.einsum("iaf,jbf->ijab", J, J)


def test_kernel_specialization():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    K = class_block_kernel(labels, 3, strength=1.0)
    ks, S = metrics.kernel_specialization(K, labels)
    assert S.shape == (3, 3) and ks > 1.5
    # independent computation of S with explicit loops
    for c in range(3):
        Kc = K[:, :, c, c]
        for d in range(3):
            u = (labels == d).astype(float)
            assert S[c, d] == pytest.approx(u @ Kc @ u / (np.linalg.norm(Kc) * u.sum()), rel=1e-12)
    off = S[~np.eye(3, dtype=bool)].mean()
    assert ks == pytest.approx(np.diag(S).mean() / off, rel=1e-12)
    ks_flat, _ = metrics.kernel_specialization(class_block_kernel(labels, 3, strength=0.0), labels)
    assert ks_flat < ks
    with pytest.raises(ValueError, match="labels must have shape"):
        metrics.kernel_specialization(K, labels[:-1])
    with pytest.raises(ValueError, match="classes \\[2\\] have none"):
        metrics.kernel_specialization(K, np.array([0, 1, 0, 0, 1, 1, 0, 1]))
    with pytest.raises(ValueError, match="full kernel"):
        metrics.kernel_specialization(K[:, :, 0, 0], labels)


def test_bad_shapes():
    with pytest.raises(ValueError, match="square"):
        metrics.effective_rank(np.ones((3, 4)))
    with pytest.raises(ValueError, match="same shape"):
        metrics.kernel_distance(np.eye(3), np.eye(4))
    with pytest.raises(ValueError, match=r"\(n, n, k, k\)"):
        metrics.kernel_distance(np.ones((2, 3, 2, 2)), np.ones((2, 3, 2, 2)))
    with pytest.raises(ValueError, match="zero kernel"):
        metrics.kernel_distance(np.ones((3, 3)), np.eye(3), center=True)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.polar_dynamics([np.eye(3)])
    with pytest.raises(ValueError, match="last kernel equals the first"):
        metrics.polar_dynamics([np.eye(3), 2 * np.eye(3), np.eye(3)])


# ---------------------------------------------------------------- phase splitter (chapters 4 and 5)
LEARN, LAZY = metrics.PHASES


def threefold(decay_at=10, n=20, seed=0):
    """A synthetic velocity curve: fast fall, a flat lazy floor with noise, a burst at the decay."""
    rng = np.random.default_rng(seed)
    v = 0.3 * np.exp(-np.arange(n) / 1.5) + 0.01 * (1 + 0.2 * rng.random(n))
    v[decay_at:decay_at + 2] *= [8.0, 5.0]
    return v


def test_split_phases_finds_three_phases_at_the_right_epochs():
    v = threefold()
    # the onset by hand: the first value at or below a fifth of the first
    onset = next(t for t in range(1, len(v)) if v[t] <= 0.2 * v[0])
    assert metrics.lazy_onset(v) == onset
    assert metrics.split_phases(v) == [(LEARN, 0, onset), (LAZY, onset, 10), (LEARN, 10, 12), (LAZY, 12, 20)]


def test_split_phases_hand_example_and_edges():
    assert metrics.split_phases([1.0, 0.5, 0.1, 0.1, 0.1, 0.5, 0.1]) == [
        (LEARN, 0, 2), (LAZY, 2, 5), (LEARN, 5, 6), (LAZY, 6, 7)]
    # never 5x below the first value: one phase of kernel learning
    assert metrics.split_phases([1.0, 0.9, 0.5, 0.21]) == [(LEARN, 0, 4)]
    assert metrics.lazy_onset([1.0, 0.9, 0.5, 0.21]) is None
    assert metrics.split_phases([2.0]) == [(LEARN, 0, 1)]
    # exactly at the thresholds: at or below lazy_below is lazy; at rise_above x the level still lazy
    assert metrics.split_phases([1.0, 0.2, 0.6, 1.81], window=1) == [(LEARN, 0, 1), (LAZY, 1, 3), (LEARN, 3, 4)]
    # the recent lazy level is the median of the last `window` lazy values
    v = [1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.05]
    assert metrics.split_phases(v, window=3)[-1] == (LEARN, 6, 7)      # 0.05 > 3 x median(0.1, 0.01, 0.01)
    assert metrics.split_phases(v, window=5) == [(LEARN, 0, 1), (LAZY, 1, 7)]  # 0.05 <= 3 x 0.1


@pytest.mark.parametrize("seed", range(5))
def test_split_phases_invariants_on_random_curves(seed):
    rng = np.random.default_rng(seed)
    v = rng.lognormal(sigma=1.5, size=30)
    phases = metrics.split_phases(v)
    # consecutive segments covering the curve, alternating names
    assert phases[0][1] == 0 and phases[-1][2] == len(v)
    assert all(a[2] == b[1] and a[0] != b[0] for a, b in zip(phases, phases[1:]))
    labels = [name for name, start, stop in phases for _ in range(start, stop)]
    onset = metrics.lazy_onset(v)
    assert onset is None or (labels[onset] == LAZY and v[onset] <= 0.2 * v[0])
    first_lazy = labels.index(LAZY) if LAZY in labels else len(v)
    assert first_lazy == (len(v) if onset is None else onset)
    assert all(v[t] > 0.2 * v[0] for t in range(1, first_lazy))
    # every later value labelled learning is more than 3x the median of the 3 lazy values before it
    for t in range(first_lazy + 1, len(v)):
        recent = [v[s] for s in range(first_lazy, t) if labels[s] == LAZY][-3:]
        assert (labels[t] == LEARN) == (v[t] > 3 * np.median(recent))
    # thresholds are relative: a change of units (per epoch -> per unit of a constant lr) changes nothing
    assert metrics.split_phases(v / 0.05) == phases


def test_split_phases_rejects_bad_input():
    for bad, match in [([], "non-empty"), ([[1.0, 0.5]], "1-d"), ([1.0, float("nan")], "finite"),
                       ([1.0, -0.1], ">= 0"), ([0.0, 0.1], r"velocity\[0\]")]:
        with pytest.raises(ValueError, match=match):
            metrics.split_phases(bad)
    with pytest.raises(ValueError, match="lazy_below"):
        metrics.split_phases([1.0, 0.1], lazy_below=1.0)
    with pytest.raises(ValueError, match="rise_above"):
        metrics.split_phases([1.0, 0.1], rise_above=1.0)
    with pytest.raises(ValueError, match="window"):
        metrics.split_phases([1.0, 0.1], window=0)


# ---------------------------------------------------------------- angles and scale (chapter 4)
def _psd(n, seed):
    A = np.random.default_rng(seed).normal(size=(n, n + 3))
    return A @ A.T


def test_kernel_angle_and_angular_velocity_against_numpy():
    from ntklab import metrics as m

    Ks = [_psd(6, s) for s in range(4)]
    H = np.eye(6) - 1 / 6

    def angle(a, b, center):
        if center:
            a, b = H @ a @ H, H @ b @ H
        return np.arccos(np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b))

    assert m.kernel_angle(Ks[0], Ks[1], center=True) == pytest.approx(angle(Ks[0], Ks[1], True), rel=1e-12)
    assert m.kernel_angle(Ks[0], 3 * Ks[0]) == pytest.approx(0, abs=1e-7)      # blind to scale
    times = [0.0, 0.5, 2.0, 2.1]
    w = m.angular_velocity(Ks, times, center=True)
    by_hand = [angle(Ks[i], Ks[i + 1], True) / (times[i + 1] - times[i]) for i in range(3)]
    assert np.allclose(w, by_hand, rtol=1e-12)
    # the negative control: the angle is not KD (nor KD / dt); for small motions KD ~ theta^2 / 2
    kd = m.kernel_velocity(Ks, times, center=True)
    assert not np.allclose(w, kd, rtol=1e-3)
    K1 = Ks[0] + 1e-3 * Ks[1]
    theta = m.kernel_angle(Ks[0], K1)
    assert m.kernel_distance(Ks[0], K1) == pytest.approx(theta ** 2 / 2, rel=1e-3)
    # a kernel turning at a constant speed: the angle adds up over time, KD does not
    u, v = np.eye(6)[0], np.eye(6)[1]
    path = [np.outer(np.cos(a) * u + np.sin(a) * v, np.cos(a) * u + np.sin(a) * v) + np.eye(6) for a in
            (0.0, 0.01, 0.03)]
    w = m.angular_velocity(path, [0.0, 1.0, 3.0])
    assert w[0] == pytest.approx(w[1], rel=0.02)
    kd = m.kernel_velocity(path, [0.0, 1.0, 3.0])
    assert kd[1] / kd[0] == pytest.approx(2.0, rel=0.05)                        # KD per unit time doubles
    with pytest.raises(ValueError, match="times"):
        m.angular_velocity(Ks, [0.0, 1.0, 1.0, 2.0])


def test_kernel_norm_and_top_eigenvalue_against_numpy():
    from ntklab import metrics as m

    K = _psd(7, 5)
    H = np.eye(7) - 1 / 7
    assert m.kernel_norm(K) == pytest.approx(np.sqrt((K ** 2).sum()), rel=1e-12)
    assert m.kernel_norm(K, center=True) == pytest.approx(np.linalg.norm(H @ K @ H), rel=1e-12)
    assert m.top_eigenvalue(K) == pytest.approx(np.linalg.eigvalsh(K)[-1], rel=1e-12)
    assert m.top_eigenvalue(K, center=True) == pytest.approx(np.linalg.eigvalsh(H @ K @ H)[-1], rel=1e-12)
    # the negative control: centring removes a constant, which the uncentred scale sees
    assert m.kernel_norm(K + 50, center=True) == pytest.approx(m.kernel_norm(K, center=True), rel=1e-10)
    assert m.kernel_norm(K + 50) > 2 * m.kernel_norm(K)
