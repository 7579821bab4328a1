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
