"""Every data source -> batches of (x, y).

Small datasets live on the training device as one tensor; the trainer draws batches by index
(`InMemoryDataset.batch`) from an epoch permutation, so there is no per-sample Python and no
worker process in the training loop.
"""

import math
from dataclasses import dataclass

import torch


@dataclass
class InMemoryDataset:
    """A whole dataset as tensors on one device.

    x: [N, ...] float32 in model space; y: [N] long in [0, num_classes).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None):
        """indices [B] long on the dataset's device -> (x [B, ...], y [B])."""
        return self.x[indices], self.y[indices]


def epoch_permutation(num_items: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The order of one epoch: a function of (seed, epoch) only, so every rank and every
    resumed run agrees on it without saving any sampler state."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0x5EED))
    return torch.randperm(num_items, generator=generator).to(device)


def derive_seed(*values: int) -> int:
    """Deterministic 63-bit hash of integers (splitmix64-style), for seeding generators."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


# --- two moons ---------------------------------------------------------------------------------

# make_moons spans x in [-1, 2], y in [-0.5, 1]; this fixed affine map centres it and gives each
# coordinate roughly unit variance, matching the N(0, I) source so neither end of the path dominates.
MOONS_CENTER = (0.5, 0.25)
MOONS_SCALE = (1 / 0.87, 1 / 0.50)


def moons_to_model_space(points: torch.Tensor) -> torch.Tensor:
    return (points - torch.tensor(MOONS_CENTER)) * torch.tensor(MOONS_SCALE)


def moons_to_data_space(points: torch.Tensor) -> torch.Tensor:
    return points / torch.tensor(MOONS_SCALE, device=points.device) + torch.tensor(MOONS_CENTER, device=points.device)


def make_moons(num_samples: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's two interleaving half circles, drawn in torch (no sklearn import at start-up).

    Crescent 0: (cos a, sin a), crescent 1: (1 - cos a, 1/2 - sin a), a evenly spaced on [0, pi];
    plus N(0, noise^2) jitter. Returns points [N, 2] float32 (data space) and labels [N] long.
    """
    upper = num_samples // 2
    lower = num_samples - upper
    a_upper = torch.linspace(0, math.pi, upper, dtype=torch.float64)
    a_lower = torch.linspace(0, math.pi, lower, dtype=torch.float64)
    points = torch.cat([
        torch.stack([torch.cos(a_upper), torch.sin(a_upper)], dim=1),
        torch.stack([1 - torch.cos(a_lower), 0.5 - torch.sin(a_lower)], dim=1),
    ])
    points += noise * torch.randn(points.shape, generator=generator, dtype=torch.float64)
    labels = torch.cat([torch.zeros(upper, dtype=torch.long), torch.ones(lower, dtype=torch.long)])
    return points.float(), labels


def load_moons(
    device="cpu",
    num_samples: int = 8000,  # points in the training set
    noise: float = 0.05,  # std of the Gaussian jitter (in data units)
    data_seed: int = 0,  # fixed, so every run and every rank sees the same 8k points
    root: str | None = None,  # accepted so `dataset.root` works with every preset; unused
) -> InMemoryDataset:
    """Two moons; the label is the crescent (0 = upper, 1 = lower)."""
    points, labels = make_moons(num_samples, noise, torch.Generator().manual_seed(data_seed))
    x = moons_to_model_space(points)
    return InMemoryDataset(x=x.to(device), y=labels.to(device), num_classes=2, name="moons")


DATASETS = {"moons": load_moons}


def build_dataset(name: str, device, **kwargs) -> InMemoryDataset:
    return DATASETS[name](device=device, **kwargs)
