import math

import torch

import datasets


def test_moons_shape_labels_and_determinism():
    a = datasets.load_moons()
    b = datasets.load_moons()
    assert a.x.shape == (8000, 2) and a.x.dtype == torch.float32 and a.num_classes == 2
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)  # fixed data seed
    assert a.y.bincount().tolist() == [4000, 4000]
    assert not torch.equal(a.x, datasets.load_moons(data_seed=1).x)


def test_moons_geometry_matches_make_moons():
    """Noise-free points lie on the two crescents; labels are the crescent."""
    points, labels = datasets.make_moons(1000, noise=0.0, generator=torch.Generator().manual_seed(0))
    upper, lower = points[labels == 0], points[labels == 1]
    torch.testing.assert_close(upper.norm(dim=1), torch.ones(len(upper)))
    torch.testing.assert_close((lower - torch.tensor([1.0, 0.5])).norm(dim=1), torch.ones(len(lower)))
    assert (upper[:, 1] >= -1e-6).all() and (lower[:, 1] <= 0.5 + 1e-6).all()


def test_moons_model_space_is_roughly_standardised_and_invertible():
    data = datasets.load_moons()
    assert data.x.mean(0).abs().max() < 0.05
    assert ((data.x.std(0) - 1).abs() < 0.05).all()
    raw, _ = datasets.make_moons(8000, 0.05, torch.Generator().manual_seed(0))
    torch.testing.assert_close(datasets.moons_to_data_space(datasets.moons_to_model_space(raw)), raw)


def test_epoch_permutation_depends_only_on_seed_and_epoch():
    p = datasets.epoch_permutation(100, seed=0, epoch=3, device="cpu")
    assert sorted(p.tolist()) == list(range(100))
    assert torch.equal(p, datasets.epoch_permutation(100, seed=0, epoch=3, device="cpu"))
    assert not torch.equal(p, datasets.epoch_permutation(100, seed=0, epoch=4, device="cpu"))
    assert not torch.equal(p, datasets.epoch_permutation(100, seed=1, epoch=3, device="cpu"))


def test_derive_seed_is_stable_and_spreads():
    assert datasets.derive_seed(1, 2, 3) == datasets.derive_seed(1, 2, 3)
    seeds = {datasets.derive_seed(0, step, j) for step in range(200) for j in range(4)}
    assert len(seeds) == 800 and all(0 <= s < 2**63 for s in seeds)
    assert datasets.derive_seed(1, 2) != datasets.derive_seed(2, 1)


def test_batch_by_index():
    data = datasets.load_moons(num_samples=10)
    x, y = data.batch(torch.tensor([3, 7]))
    assert torch.equal(x, data.x[[3, 7]]) and torch.equal(y, data.y[[3, 7]])
    assert data.sample_shape == (2,) and len(data) == 10 and math.isfinite(x.sum().item())
