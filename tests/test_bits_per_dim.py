"""Image bits/dim (sampling.image_bits_per_dim): the flow's continuous likelihood against a Gaussian's
closed form, and the uniform-dequantisation bound against the exact discrete likelihood of 8-bit data
binned from the same Gaussian.

The "model" is the exact CondOT velocity of a Gaussian target N(mu, Sigma) in model space: x_t = t x1 +
(1 - t) eps ~ N(t mu, t^2 Sigma + (1 - t)^2 I) and u = mu + (t Sigma - (1 - t) I)(t^2 Sigma + (1 - t)^2 I)^-1
(x - t mu). For images, a Gaussian N(m, s^2) in pixel units v in [0, 256) is N(m / 128 - 1, (s / 128)^2)
in x = v / 128 - 1.
"""

import math

import pytest
import torch
from torch import nn

import sampling
from flow import expand_t, make_path
from sampling import DEQUANTIZATION_BITS_PER_DIM, FlowSampler, image_bits_per_dim

LN2 = math.log(2)


class GaussianVelocity(nn.Module):
    """Exact CondOT velocity for x1 ~ N(mean, Q diag(lam) Q^T) over the flattened sample [B, D]."""

    def __init__(self, mean, lam, rotation=None):
        super().__init__()
        self.mean, self.lam, self.rotation = mean, lam, rotation

    def forward(self, x, t, y=None):
        flat = x.flatten(1)
        t = expand_t(t, flat)
        lam = self.lam.to(flat)
        gain = (t * lam - (1 - t)) / (t**2 * lam + (1 - t) ** 2)
        centred = flat - t * self.mean.to(flat)
        if self.rotation is None:
            u = self.mean.to(flat) + gain * centred
        else:
            q = self.rotation.to(flat)
            u = self.mean.to(flat) + (centred @ q * gain) @ q.T
        return u.reshape(x.shape)

    def log_prob(self, x1):
        """log N(x1; mean, Sigma) [B] in float64, x1 [B, ...]."""
        flat = x1.flatten(1).double()
        if self.rotation is None:
            normal = torch.distributions.Normal(self.mean.double(), self.lam.double().sqrt())
            return normal.log_prob(flat).sum(1)
        q = self.rotation.double()
        covariance = q @ torch.diag(self.lam.double()) @ q.T
        return torch.distributions.MultivariateNormal(self.mean.double(), covariance).log_prob(flat)


def pixel_gaussian(pixel_mean, pixel_std, rotation=None):
    """FlowSampler for v ~ N(pixel_mean, Q diag(pixel_std^2) Q^T) in pixel units, as a model-space flow."""
    model = GaussianVelocity(pixel_mean / 128 - 1, (pixel_std / 128) ** 2, rotation)
    return FlowSampler(model, make_path())


def sample_images(pixel_mean, pixel_std, batch, side, seed, rotation=None):
    """y = floor(v) for v from the pixel-space Gaussian, [B, 1, side, side] uint8 (the tests keep the mass
    outside [0, 256) negligible, so the clamp is never hit)."""
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(batch, side * side, generator=gen, dtype=torch.float64) * pixel_std.double()
    if rotation is not None:
        eps = eps @ rotation.double().T
    v = pixel_mean.double() + eps
    assert v.min() >= 0 and v.max() < 256
    return v.floor().to(torch.uint8).reshape(batch, 1, side, side)


def discrete_bits_per_dim(images, pixel_mean, pixel_std):
    """-log2 P(y) / D [B] for the diagonal Gaussian binned into [y, y + 1): the exact discrete likelihood,
    float64."""
    y = images.flatten(1).double()
    normal = torch.distributions.Normal(pixel_mean.double(), pixel_std.double())
    mass = normal.cdf(y + 1) - normal.cdf(y)
    return -mass.log().sum(1) / (y.shape[1] * LN2)


def expected_dequantised_bits_per_dim(images, pixel_mean, pixel_std, rotation=None):
    """E_u[-log2 p_v(y + u)] / D [B], u ~ U[0, 1)^D: what image_bits_per_dim estimates, in closed form.
    With r = y + 1/2 - m, E_u[(v - m)^T P (v - m)] = r^T P r + tr(P) / 12 for the precision P."""
    y = images.flatten(1).double()
    dim = y.shape[1]
    variance = pixel_std.double() ** 2 * torch.ones(dim, dtype=torch.float64)
    r = y + 0.5 - pixel_mean.double()
    if rotation is not None:
        r = r @ rotation.double()  # coordinates in the eigenbasis
    quadratic = (r.square() / variance).sum(1) + (1 / variance).sum() / 12
    nats = 0.5 * (torch.log(2 * math.pi * variance).sum() + quadratic)
    return nats / (dim * LN2)


def sem(values):
    return float(values.std() / math.sqrt(len(values)))


# ---------------------------------------------------------------------------------------------- continuous


def test_log_likelihood_matches_gaussian_density_exact_divergence():
    dim = 4
    gen = torch.Generator().manual_seed(0)
    model = GaussianVelocity(torch.randn(dim, generator=gen), torch.rand(dim, generator=gen) + 0.2)
    x1 = model.mean + model.lam.sqrt() * torch.randn(128, dim, generator=gen)
    estimate = FlowSampler(model, make_path()).log_likelihood(x1, num_steps=32)
    truth = -model.log_prob(x1) / (dim * LN2)
    error = (estimate.double() - truth).abs().max()
    print(f"exact D={dim}: max |estimate - truth| = {error:.2e} bits/dim, mean truth {truth.mean():.4f}")
    assert error < 1e-3


def test_log_likelihood_matches_gaussian_density_hutchinson():
    # A rotated, anisotropic Gaussian in D = 64: a non-diagonal Jacobian, so the Rademacher estimate is noisy.
    dim = 64
    gen = torch.Generator().manual_seed(1)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    model = GaussianVelocity(torch.randn(dim, generator=gen), torch.rand(dim, generator=gen) + 0.1, rotation)
    x1 = model.mean + (torch.randn(64, dim, generator=gen) * model.lam.sqrt()) @ rotation.T
    estimate = FlowSampler(model, make_path()).log_likelihood(
        x1, num_steps=16, hutchinson_samples=4, generator=torch.Generator().manual_seed(2)
    )
    truth = -model.log_prob(x1) / (dim * LN2)
    error = estimate.double() - truth
    print(
        f"hutchinson x4 D={dim}: mean error {error.mean():+.4f} +- {sem(error):.4f} bits/dim "
        f"(per-sample std {error.std():.4f})"
    )
    assert error.std() > 1e-3  # the probes are genuinely noisy here
    assert abs(float(error.mean())) < 3 * sem(error) + 2e-3


# ---------------------------------------------------------------------------------------------- 8-bit images


def run_bound(pixel_std, num_steps, batch=256, side=2, seed=0, **kwargs):
    dim = side * side
    pixel_mean = torch.linspace(90.0, 170.0, dim)
    std = torch.tensor(float(pixel_std))
    images = sample_images(pixel_mean, std, batch, side, seed)
    result = image_bits_per_dim(
        pixel_gaussian(pixel_mean, std),
        images,
        generator=torch.Generator().manual_seed(seed + 1),
        num_steps=num_steps,
        **kwargs,
    )
    truth = discrete_bits_per_dim(images, pixel_mean, std)
    bound = expected_dequantised_bits_per_dim(images, pixel_mean, std)
    return result, truth, bound


def report(name, result, truth, bound):
    gap = result["bits_per_dim"].double() - truth
    print(
        f"{name}: estimate {result['mean']:.4f} +- {result['sem']:.4f} (sem), "
        f"true discrete {truth.mean():.4f}, "
        f"E_u bound {bound.mean():.4f}; estimate - truth {gap.mean():+.4f} +- {sem(gap):.4f} (paired), "
        f"{result['estimator']}, nfe {result['nfe']}"
    )
    return gap


def test_uniform_dequantisation_is_a_tight_bound_for_a_wide_gaussian():
    # s = 16 pixels: the density is smooth on the scale of a bin, so E_u[-log p] ~ -log P(y).
    result, truth, bound = run_bound(pixel_std=16.0, num_steps=16, solver="rk4")
    gap = report("wide s=16px D=4", result, truth, bound)
    assert result["estimator"] == "exact" and result["nfe"] == 16 * 4 and result["num_images"] == 256
    assert result["bits_per_dim"].shape == (256,)
    assert result["mean"] == pytest.approx(float(result["bits_per_dim"].mean()))
    assert result["sem"] == pytest.approx(sem(result["bits_per_dim"]))
    assert (bound >= truth).all()  # Jensen, per image
    assert (bound - truth).max() < 1e-3
    assert result["mean"] >= float(truth.mean()) - 3 * result["sem"]
    assert float(gap.mean()) >= -3 * sem(gap) - 1e-3
    assert abs(float(gap.mean())) < 0.05
    # The estimator is unbiased for the E_u bound (the only noise is the one u per image).
    error = result["bits_per_dim"].double() - bound
    assert abs(float(error.mean())) < 3 * sem(error) + 1e-3


def test_uniform_dequantisation_bound_holds_but_is_loose_for_a_narrow_gaussian():
    # s = 0.5 pixel: most of a pixel's mass sits in one bin, the density is far from flat across it, and
    # the bound is loose by a known amount. Narrow in model space (s = 0.0039) makes the ODE stiff near
    # t = 1 (|du/dx| up to 1 / (2 s) = 128): hence the many steps.
    result, truth, bound = run_bound(pixel_std=0.5, num_steps=256, solver="rk4")
    gap = report("narrow s=0.5px D=4", result, truth, bound)
    assert (bound >= truth).all()
    assert float((bound - truth).mean()) > 0.1  # loose
    assert result["mean"] >= float(truth.mean()) - 3 * result["sem"]
    assert float(gap.mean()) >= -3 * sem(gap)
    error = result["bits_per_dim"].double() - bound
    assert abs(float(error.mean())) < 3 * sem(error) + 5e-3


def test_image_bits_per_dim_with_hutchinson_at_64_dims():
    # 8x8 images from a rotated, anisotropic pixel Gaussian (stds 8..24 pixels): Hutchinson by default
    # (D = 64 > 16) with a noisy estimate; compared with the closed-form E_u bound, which (wide Gaussian)
    # is within a hair of the discrete likelihood.
    side, dim, batch = 8, 64, 64
    gen = torch.Generator().manual_seed(3)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    pixel_mean = torch.full((dim,), 128.0) + 10 * torch.randn(dim, generator=gen)
    pixel_std = 8.0 + 16.0 * torch.rand(dim, generator=gen)
    images = sample_images(pixel_mean, pixel_std, batch, side, seed=4, rotation=rotation)
    result = image_bits_per_dim(
        pixel_gaussian(pixel_mean, pixel_std, rotation),
        images,
        generator=torch.Generator().manual_seed(5),
        num_steps=16,
        hutchinson_samples=4,
        batch_size=32,
    )
    bound = expected_dequantised_bits_per_dim(images, pixel_mean, pixel_std, rotation)
    error = result["bits_per_dim"].double() - bound
    print(
        f"hutchinson D=64: estimate {result['mean']:.4f} +- {result['sem']:.4f} (sem), E_u bound "
        f"{bound.mean():.4f}; estimate - bound {error.mean():+.4f} +- {sem(error):.4f} (paired), "
        f"{result['estimator']}, nfe {result['nfe']}"
    )
    assert result["estimator"] == "hutchinson x4"
    assert result["nfe"] == 2 * 16 * 4  # two batches of 32, rk4
    assert abs(result["mean"] - float(bound.mean())) < 3 * result["sem"]
    assert abs(float(error.mean())) < 3 * sem(error) + 0.01


# ---------------------------------------------------------------------------------------------- the constant


class UniformDensity(FlowSampler):
    """A stand-in whose model-space density is uniform on [-1, 1)^D: -log2 p_x(x) / D = 1 bit for every x.
    Records what image_bits_per_dim feeds it."""

    seen = []

    def log_likelihood(self, x1, y=None, **kwargs):
        UniformDensity.seen.append((x1, y, kwargs))
        return torch.ones(x1.shape[0])


def test_uniform_model_density_gives_eight_bits_and_the_dequantisation_map():
    assert DEQUANTIZATION_BITS_PER_DIM == 7.0
    images = torch.tensor([0, 1, 128, 254, 255], dtype=torch.uint8).repeat(6, 3, 1, 1).permute(3, 0, 1, 2)
    labels = torch.arange(5)
    UniformDensity.seen.clear()
    result = image_bits_per_dim(
        UniformDensity(nn.Identity(), make_path()),
        images,
        labels,
        generator=torch.Generator().manual_seed(7),
        num_steps=3,
        solver="euler",
    )
    # Uniform over 256 levels: log2(256) = 8 bits/dim, with no spread.
    torch.testing.assert_close(result["bits_per_dim"], torch.full((5,), 8.0))
    assert result["mean"] == 8.0 and result["sem"] == 0.0 and result["nfe"] == 0
    ((x, y, kwargs),) = UniformDensity.seen
    u = torch.rand(images.shape, generator=torch.Generator().manual_seed(7))  # one draw per image element
    torch.testing.assert_close(x, (images.float() + u) / 128 - 1)
    assert x.min() >= -1 and x.max() <= 1 and torch.equal(y, labels)
    assert kwargs["num_steps"] == 3 and kwargs["solver"] == "euler" and kwargs["exact_divergence"] is False
    assert result["estimator"] == "hutchinson x1"  # D = 90 > 16


def test_rejects_float_images_and_unknown_dequantisation():
    sampler = pixel_gaussian(torch.full((4,), 128.0), torch.tensor(16.0))
    images = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        image_bits_per_dim(sampler, images.float())
    with pytest.raises(ValueError, match="variational"):
        image_bits_per_dim(sampler, images, dequantization="variational")
    with pytest.raises(ValueError, match="labels"):
        image_bits_per_dim(sampler, images, torch.zeros(3, dtype=torch.long))


def test_sampler_module_still_imports_only_flow_ode_solvers_and_torch():
    import ast

    tree = ast.parse(open(sampling.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "math", "functools", "torch", "flow", "ode_solvers"}
