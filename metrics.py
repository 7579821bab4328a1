"""Sample-quality numbers that are cheap enough to log during training.

2-D data: sliced Wasserstein distance to the training set and, for two moons, the fraction of
class-k samples that land nearer crescent k than the other crescent.
"""

import math

import torch


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between point sets a [N, D] and b [M, D].

    SW2^2 = E_theta W2^2(theta.a, theta.b) over uniform unit directions theta (Bonneel et al. 2015);
    each 1-D W2 compares the two empirical quantile functions on a common grid of levels, which
    also handles N != M.
    """
    a, b = a.double().flatten(1), b.double().flatten(1)
    generator = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(a.device)
    levels = (torch.arange(max(len(a), len(b)), dtype=torch.float64, device=a.device) + 0.5) / max(len(a), len(b))
    qa = torch.quantile((a @ theta).sort(dim=0).values, levels, dim=0, interpolation="linear")
    qb = torch.quantile((b @ theta).sort(dim=0).values, levels, dim=0, interpolation="linear")
    return math.sqrt(((qa - qb) ** 2).mean().item())


def _moon_arcs(num_points: int = 2000) -> torch.Tensor:
    """The two noise-free crescents of sklearn's make_moons in data space: [2, num_points, 2]."""
    theta = torch.linspace(0, math.pi, num_points, dtype=torch.float64)
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], dim=-1)
    lower = torch.stack([1 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=-1)
    return torch.stack([upper, lower])


def nearest_moon(points_data_space: torch.Tensor) -> torch.Tensor:
    """Index (0 upper, 1 lower) of the crescent nearest to each point [N, 2] -> [N] long."""
    points = points_data_space.double().cpu()
    distances = torch.stack([torch.cdist(points, arc).min(dim=1).values for arc in _moon_arcs()], dim=1)
    return distances.argmin(dim=1)


def sample_metrics(samples: torch.Tensor, labels: torch.Tensor | None, dataset) -> dict[str, float]:
    """Metrics for generated samples in model space; which ones depends on the dataset."""
    metrics = {}
    if dataset.name == "moons":
        from datasets import moons_to_data_space

        metrics["sliced_w2"] = sliced_wasserstein(samples.cpu(), dataset.x.cpu())
        if labels is not None:
            points = moons_to_data_space(samples.cpu().float())
            metrics["class_accuracy"] = (nearest_moon(points) == labels.cpu()).double().mean().item()
    return metrics
