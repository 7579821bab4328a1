import math

import pytest
import torch

import metrics


def test_sliced_wasserstein_of_a_translation_is_analytic():
    """Translating a cloud by d gives W2 = |theta.d| per direction, so SW2^2 = E(theta.d)^2 = |d|^2 / D."""
    torch.manual_seed(0)
    a = torch.randn(4000, 3)
    d = torch.tensor([0.3, -0.4, 1.2])
    sw = metrics.sliced_wasserstein(a, a + d, num_projections=4000)
    assert sw == pytest.approx(d.norm().item() / math.sqrt(3), rel=0.03)
    assert metrics.sliced_wasserstein(a, a) == pytest.approx(0.0, abs=1e-9)


def test_sliced_wasserstein_in_one_dimension_is_w2():
    """In 1-D every projection is +-identity: SW2 = W2 = sqrt(mean (sorted a - sorted b)^2)."""
    torch.manual_seed(0)
    a, b = torch.randn(500, 1), 2 * torch.randn(500, 1) + 1
    exact = ((a.sort(0).values - b.sort(0).values) ** 2).mean().sqrt().item()
    assert metrics.sliced_wasserstein(a, b, num_projections=8) == pytest.approx(exact, rel=1e-2)


def test_sliced_wasserstein_handles_unequal_sizes():
    torch.manual_seed(0)
    a, b = torch.randn(3000, 2), torch.randn(1000, 2)
    assert metrics.sliced_wasserstein(a, b) < 0.1
    assert metrics.sliced_wasserstein(a, b + 1) > 0.9


def test_nearest_moon_labels_points_on_each_crescent():
    theta = torch.linspace(0.1, 3.0, 50)
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
    lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], 1)
    assert metrics.nearest_moon(upper).eq(0).all() and metrics.nearest_moon(lower).eq(1).all()


# --- Frechet distance -------------------------------------------------------------------------------


def random_covariance(dim: int, generator: torch.Generator, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(dim, rank or dim, generator=generator, dtype=torch.float64)
    return a @ a.T / (rank or dim) + (0 if rank else 0.05) * torch.eye(dim, dtype=torch.float64)


def scipy_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The reference FID code's formula: scipy.linalg.sqrtm of the product S1 S2."""
    import numpy as np
    from scipy import linalg

    mu1, sigma1, mu2, sigma2 = (np.asarray(v, dtype=np.float64) for v in (mu1, sigma1, mu2, sigma2))
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def test_feature_statistics_match_numpy_cov():
    import numpy as np

    features = torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    mu, sigma = metrics.feature_statistics(features)
    assert mu.dtype == sigma.dtype == torch.float64 and sigma.shape == (5, 5)
    np.testing.assert_allclose(sigma.numpy(), np.cov(features.double().numpy(), rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(mu.numpy(), features.double().numpy().mean(0), rtol=1e-12)


def test_frechet_distance_of_a_set_to_itself_is_zero():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(500, 64, generator=generator) @ torch.randn(64, 64, generator=generator)
    stats = metrics.feature_statistics(features)
    assert metrics.frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_diagonal_gaussians_is_analytic_and_grows_with_the_mean_shift():
    """Diagonal S1 = diag(s1), S2 = diag(s2): d^2 = |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))."""
    generator = torch.Generator().manual_seed(0)
    s1 = torch.rand(16, generator=generator, dtype=torch.float64) + 0.1
    s2 = torch.rand(16, generator=generator, dtype=torch.float64) + 0.1
    direction = torch.randn(16, generator=generator, dtype=torch.float64)
    previous = -1.0
    for k in range(5):
        mu2 = k * 0.5 * direction
        expected = mu2.square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum()
        fd = metrics.frechet_distance(torch.zeros(16), torch.diag(s1), mu2, torch.diag(s2))
        assert fd == pytest.approx(expected.item(), rel=1e-10)
        assert fd > previous
        previous = fd


def test_frechet_distance_matches_the_scipy_sqrtm_reference():
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        mu1, mu2 = (torch.randn(64, generator=generator, dtype=torch.float64) for _ in range(2))
        sigma1, sigma2 = random_covariance(64, generator), random_covariance(64, generator)
        fd = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
        assert fd == pytest.approx(scipy_frechet_distance(mu1, sigma1, mu2, sigma2), rel=1e-6)
        # numpy inputs are accepted too
        assert metrics.frechet_distance(mu1.numpy(), sigma1.numpy(), mu2.numpy(), sigma2.numpy()) == fd


def test_frechet_distance_is_exact_for_rank_deficient_covariances():
    """N < F samples give singular covariances S = A^T A (A: centred features / sqrt(N - 1)). Then
    tr((S1 S2)^(1/2)) is the nuclear norm of A1 A2^T (its singular values squared are the nonzero
    eigenvalues of S1^(1/2) S2 S1^(1/2)): an exact reference without any F x F square root."""
    generator = torch.Generator().manual_seed(0)
    f1 = torch.randn(20, 64, generator=generator, dtype=torch.float64)
    f2 = torch.randn(30, 64, generator=generator, dtype=torch.float64) * 1.5 + 0.3
    (mu1, sigma1), (mu2, sigma2) = metrics.feature_statistics(f1), metrics.feature_statistics(f2)
    a1, a2 = ((f - f.mean(0)) / math.sqrt(len(f) - 1) for f in (f1, f2))
    exact = (
        (mu1 - mu2).square().sum()
        + sigma1.trace()
        + sigma2.trace()
        - 2 * torch.linalg.matrix_norm(a1 @ a2.T, ord="nuc")
    ).item()
    fd = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert math.isfinite(fd) and fd == pytest.approx(exact, rel=1e-6)
    stats = metrics.feature_statistics(f1)
    assert metrics.frechet_distance(*stats, *stats) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes do not match"):
        metrics.frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
