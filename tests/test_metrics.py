import numpy as np
import pytest
import torch

from msfp.metrics import (bootstrap_interval, classifier_score, fd_bootstrap, feature_stats, frechet_distance, kid,
                          precision_recall)


def test_feature_stats_matches_numpy():
    f = np.random.default_rng(0).normal(size=(500, 4))
    mu, sigma = feature_stats(torch.from_numpy(f).float())
    np.testing.assert_allclose(mu, f.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), atol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        feature_stats(np.zeros(5))
    with pytest.raises(ValueError, match=r"D >= 1, got \(5, 0\)"):  # FD failed on an empty reduction
        feature_stats(np.zeros((5, 0)))


def test_fd_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(1).normal(size=(2000, 16))
    mu, sigma = feature_stats(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fd_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 3, size=8), rng.uniform(0.1, 3, size=8)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_fd_general_gaussians_against_symmetric_formula():
    # tr((S1 S2)^½) = tr((S1^½ S2 S1^½)^½): an independent route through symmetric square roots.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    expected = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner).sum()
    assert frechet_distance(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(expected, rel=1e-8)


def test_fd_singular_covariances_are_finite():
    # Dead ReLU units: all-zero feature columns make both covariances singular.
    rng = np.random.default_rng(4)
    f1, f2 = rng.normal(size=(300, 10)), rng.normal(size=(300, 10)) + 0.5
    f1[:, :3] = 0
    f2[:, :3] = 0
    fd = frechet_distance(*feature_stats(f1), *feature_stats(f2))
    assert np.isfinite(fd) and fd == pytest.approx(7 * 0.25, abs=0.5)


def test_fd_scales_with_the_square_of_the_features_when_covariances_are_singular():
    # 50 samples of 128 features: both covariances singular. FD(cX, cY) = c² FD(X, Y); at c = 100 sqrtm's imaginary
    # round-off used to exceed a fixed tolerance, and the same data was refused.
    rng = np.random.default_rng(7)
    mix = rng.standard_normal((128, 128)) / np.sqrt(128)
    x, y = rng.standard_normal((50, 128)) @ mix, rng.standard_normal((50, 128)) @ mix + 0.1
    base = frechet_distance(*feature_stats(x), *feature_stats(y))
    for c in (10, 100, 1000):
        assert frechet_distance(*feature_stats(c * x), *feature_stats(c * y)) == pytest.approx(c * c * base, rel=1e-6)
    # And it agrees with the textbook route through scipy's general matrix square root where that one is accurate.
    from scipy import linalg

    (mu1, s1), (mu2, s2) = feature_stats(x), feature_stats(y)
    textbook = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real
    assert base == pytest.approx(textbook, rel=1e-6)


def test_fd_refuses_asymmetric_covariances():
    with pytest.raises(ValueError, match="first covariance is not symmetric"):
        frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))


def test_fd_refuses_what_is_no_covariance_but_takes_rank_deficient_ones():
    # -I gave FD 0 against I: the square root read its negative eigenvalues as 0.
    with pytest.raises(ValueError, match=r"second covariance is not positive semi-definite \(smallest eigenvalue -1"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))
    with pytest.raises(ValueError, match="first covariance is not positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -0.5]), np.zeros(2), np.eye(2))
    # Fewer samples than features: singular covariances, whose round-off leaves eigenvalues just below 0.
    f = np.random.default_rng(4).normal(size=(20, 64))
    mu, sigma = feature_stats(f)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    assert abs(frechet_distance(mu, sigma.astype(np.float32), mu, sigma)) < 1e-4 * np.trace(sigma)


def test_fd_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_identical_near_zero_shifted_positive():
    rng = np.random.default_rng(5)
    f = rng.normal(size=(1000, 32))
    same, _ = kid(f, f.copy(), subsets=10, subset_size=200)
    other = rng.normal(size=(1000, 32))
    iid, _ = kid(f, other, subsets=10, subset_size=200)
    shifted, _ = kid(f, other + 1.0, subsets=10, subset_size=200)
    assert abs(same) < 0.05 and abs(iid) < 0.05
    assert shifted > 1.0
    assert kid(f, other + 1.0, subsets=10, subset_size=200, seed=0) == kid(f, other + 1.0, subsets=10,
                                                                          subset_size=200, seed=0)


def test_kid_unbiased_mmd_matches_direct_formula():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=(20, 3)) + 0.3

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    m = 20
    expected = (sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
                + sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
                - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2)
    mean, std = kid(x, y, subsets=3, subset_size=20)  # subset = whole set, so every draw is the same
    assert mean == pytest.approx(expected, rel=1e-10) and std is None  # a spread of 0 would claim certainty
    assert kid(x, np.concatenate([y, y]), subsets=3, subset_size=20)[1] is None  # x is whole in every draw
    assert kid(x, y, subsets=3, subset_size=10)[1] > 0
    assert kid(x, y, subsets=1, subset_size=10)[1] is None  # one draw has no spread: 0 claimed certainty


def test_classifier_score_uniform_and_one_hot():
    n, c = 1000, 10
    assert classifier_score(np.zeros((n, c)))[0] == pytest.approx(1.0)
    one_hot = np.full((n, c), -np.inf)
    one_hot[np.arange(n), np.arange(n) % c] = 0.0
    mean, std = classifier_score(one_hot, splits=10)
    assert mean == pytest.approx(c) and std == pytest.approx(0, abs=1e-9)
    # Confident but always the same class: no diversity, score 1.
    assert classifier_score(torch.tensor([[50.0] + [0.0] * (c - 1)] * n))[0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="splits"):
        classifier_score(np.zeros((5, c)), splits=10)


def test_fd_bootstrap_spread_shrinks_with_more_samples():
    rng = np.random.default_rng(0)
    mu, sigma = np.zeros(4), np.eye(4)
    small = fd_bootstrap(rng.normal(size=(100, 4)), mu, sigma, resamples=100)
    large = fd_bootstrap(rng.normal(size=(2500, 4)), mu, sigma, resamples=100)
    assert small.shape == (100,) and np.isfinite(small).all()
    assert large.std() < small.std() / 3  # ~ 1/sqrt(N) and better


def test_fd_bootstrap_resamples_equal_size_sets_identically():
    # g is f shifted by c: per replicate, the covariance terms cancel and the FD difference is 2c·(m_i - mu) + |c|²
    # for that replicate's mean m_i. Shared indices make the differences far tighter than the replicates.
    rng = np.random.default_rng(1)
    f = rng.normal(size=(300, 3))
    c = np.array([0.01, 0.0, 0.0])
    mu, sigma = np.zeros(3), np.eye(3)
    rf, rg = fd_bootstrap(f, mu, sigma, resamples=100), fd_bootstrap(f + c, mu, sigma, resamples=100)
    assert (rg - rf).std() < 0.1 * rf.std()
    assert (rg - rf).mean() == pytest.approx(c @ c + 2 * c @ (f.mean(0) - mu), abs=5e-4)
    other_seed = fd_bootstrap(f + c, mu, sigma, resamples=100, seed=1)
    assert (other_seed - rf).std() > 0.5 * rf.std()  # unpaired: no cancellation


def test_bootstrap_interval_reflects_the_replicates_through_the_estimate():
    # Replicates 5..95 around an estimate of 40: the interval is 2·40 − (95, 5).
    assert bootstrap_interval(np.arange(101.0), estimate=40.0) == pytest.approx((-15.0, 75.0))
    # Between order statistics, the percentiles interpolate linearly: of 5 values, the 5th percentile lies at rank
    # 0.05 * 4 = 0.2 (between 0 and 1), the 95th at 3.8 (between 5 and 9).
    assert bootstrap_interval([9.0, 0.0, 5.0, 1.0, 2.0], estimate=2.0, level=0.9) == pytest.approx((4 - (5 + 0.8 * 4), 4 - 0.2))
    with pytest.raises(ValueError, match="finite replicates"):
        bootstrap_interval([1.0, np.nan, 2.0], estimate=1.0)
    with pytest.raises(ValueError, match="the estimate must be finite, got nan"):
        bootstrap_interval([1.0, 2.0], estimate=float("nan"))
    with pytest.raises(TypeError):  # the old call bootstrap_interval(r, 0.9) would read 0.9 as the estimate
        bootstrap_interval([1.0, 2.0], 0.9)


def test_paired_fd_difference_intervals_cover_the_population_difference():
    # Bootstrap FDs sit above the whole sample's, by a different amount for each model: the replicates' own percentile
    # interval of the difference covered the population difference 65 % of the time here for a nominal 90 %.
    rng = np.random.default_rng(5)
    d, n, trials = 32, 160, 60
    scale_a, scale_b = np.linspace(0.5, 2.0, d), np.linspace(0.9, 1.1, d)
    mean_a, mean_b = np.full(d, 0.3), np.full(d, 0.25)
    ref_mu, ref_sigma = np.zeros(d), np.eye(d)
    true = (frechet_distance(mean_a, np.diag(scale_a**2), ref_mu, ref_sigma)
            - frechet_distance(mean_b, np.diag(scale_b**2), ref_mu, ref_sigma))
    covered = 0
    for _ in range(trials):
        z = rng.standard_normal((n, d))  # partly paired: both models' features from related noise
        fa, fb = mean_a + z * scale_a, mean_b + (0.7 * z + 0.71 * rng.standard_normal((n, d))) * scale_b
        estimate = (frechet_distance(*feature_stats(fa), ref_mu, ref_sigma)
                    - frechet_distance(*feature_stats(fb), ref_mu, ref_sigma))
        replicates = fd_bootstrap(fa, ref_mu, ref_sigma, resamples=200) - fd_bootstrap(fb, ref_mu, ref_sigma,
                                                                                         resamples=200)
        lo, hi = bootstrap_interval(replicates, estimate=estimate, level=0.9)
        covered += lo <= true <= hi
    assert covered / trials >= 0.8


def test_fd_bootstrap_replicates_are_frechet_distances():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    ref = rng.normal(size=(80, 6)) + 0.3
    mu_ref, sigma_ref = feature_stats(ref)
    (replicate,) = fd_bootstrap(f, mu_ref, sigma_ref, resamples=1, seed=3)
    idx = np.random.default_rng(3).integers(0, 50, 50)
    assert replicate == pytest.approx(frechet_distance(*feature_stats(f[idx]), mu_ref, sigma_ref), rel=1e-9)
    with pytest.raises(ValueError, match="D = 6"):
        fd_bootstrap(f[:, :5], mu_ref, sigma_ref)
    # The reference is checked as frechet_distance checks it (a NaN mean gave all-NaN replicates).
    with pytest.raises(ValueError, match=r"1 non-finite values \(NaN or inf\) in the reference mean"):
        fd_bootstrap(f, np.where(np.arange(6) == 2, np.nan, mu_ref), sigma_ref)
    with pytest.raises(ValueError, match="reference covariance is not symmetric"):
        fd_bootstrap(f, mu_ref, sigma_ref + np.triu(np.ones((6, 6)), 1))


def test_non_finite_features_are_refused_by_every_metric():
    # FD failed inside scipy's sqrtm, KID returned NaN and precision/recall silently dropped the point.
    rng = np.random.default_rng(0)
    good, bad = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    bad[3, 2] = np.nan
    mu, sigma = feature_stats(good)
    for call in (lambda: feature_stats(bad), lambda: kid(good, bad, subsets=2, subset_size=10),
                 lambda: precision_recall(good, bad), lambda: frechet_distance(mu, sigma, mu, sigma * np.inf),
                 lambda: classifier_score(np.where(bad > 0, np.inf, bad))):
        with pytest.raises(ValueError, match=r"[0-9]+ non-finite values \(NaN or \+?inf\) in"):
            call()


def test_precision_recall_by_hand():
    # 1-D sets. Real points 0..3: each one's nearest other point is 1 away, its 2nd nearest 1 or 2 away.
    real, fake = np.array([[0.0], [1.0], [2.0], [3.0]]), np.array([[0.5], [3.9], [5.0]])
    # k = 1: 0.5 and 3.9 lie within 1 of a real point, 5 does not; the fake radii (3.4, 1.1, 1.1) cover every real
    # point (0.5's ball reaches 3.9).
    assert precision_recall(real, fake, k=1) == pytest.approx((2 / 3, 1.0))
    # k = 2: real radii (2, 1, 1, 2), so 5 is within 2 of 3: every fake point is inside.
    assert precision_recall(real, fake, k=2) == pytest.approx((1.0, 1.0))
    # A tight real cluster (radii 0.2 at k = 1): only the fake point 0 lies in it, and the fake balls (radius 1)
    # cover all of it; precision and recall are not interchangeable.
    tight = np.array([[0.0], [0.2], [0.4]])
    assert precision_recall(tight, real, k=1) == pytest.approx((0.25, 1.0))


@pytest.mark.parametrize("call, message", [
    (lambda f: kid(f, f, subsets=0), "KID needs subsets >= 1"),
    (lambda f: precision_recall(f, f, k=0), "needs k >= 1"),
    (lambda f: classifier_score(f, splits=0), "N >= splits >= 1"),
    (lambda f: classifier_score(np.vstack([f, np.full((1, 4), -np.inf)]), splits=1),
     r"1 row\(s\) of logits are all -inf .* row 10"),
])
def test_metric_arguments_that_cannot_give_a_number_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.random.default_rng(0).normal(size=(10, 4)))


def test_metrics_take_bfloat16_tensors():
    # numpy has no bfloat16: every metric failed on "Got unsupported ScalarType BFloat16"
    torch.manual_seed(0)
    x, y = torch.randn(60, 4), torch.randn(60, 4) + 0.5
    assert frechet_distance(*feature_stats(x.bfloat16()), *feature_stats(y.bfloat16())) == pytest.approx(
        frechet_distance(*feature_stats(x.bfloat16().float()), *feature_stats(y.bfloat16().float())))
    assert kid(x.bfloat16(), y.bfloat16(), subsets=2, subset_size=20)[0] == pytest.approx(
        kid(x.bfloat16().float(), y.bfloat16().float(), subsets=2, subset_size=20)[0])
