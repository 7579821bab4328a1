"""sampling.py: FlowSampler (ODE and SDE sampling, likelihood, CFG) against Gaussian closed forms, and
generate / sample_kwargs / straightness against hand computations."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import sampling
from config import SolverConfig
from flow import expand_t, make_path
from sampling import FlowSampler

MEAN = torch.tensor([1.0, -2.0])
STD = 0.5


@pytest.fixture(autouse=True)
def single_thread():
    # Every tensor here is tiny: on a busy 2-core machine, intra-op worker threads only add spin-waiting
    # (10-50x slower matmuls measured), so these tests run single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class GaussianFlow(nn.Module):
    """The exact CondOT velocity (or data prediction) for data x1 ~ N(mean, Q diag(lam) Q^T).

    x_t = t x1 + (1 - t) eps ~ N(t m, t^2 Sigma + (1 - t)^2 I), and u = E[x1 - eps | x_t] is
        u = m + (t Sigma - (1 - t) I) (t^2 Sigma + (1 - t)^2 I)^-1 (x - t m),
    diagonal in Sigma's eigenbasis Q. The data prediction is x1_hat = x + (1 - t) u. Ignores y and records
    the batch size of every call.
    """

    def __init__(self, mean, lam, rotation=None, prediction="velocity"):
        super().__init__()
        self.mean, self.lam, self.rotation = mean, lam, rotation
        self.prediction = prediction
        self.batch_sizes = []

    def forward(self, x, t, y=None):
        self.batch_sizes.append(x.shape[0])
        t = expand_t(t, x)
        lam = self.lam.to(x)
        gain = (t * lam - (1 - t)) / (t**2 * lam + (1 - t) ** 2)
        centred = x - t * self.mean.to(x)
        if self.rotation is None:
            u = self.mean.to(x) + gain * centred
        else:
            q = self.rotation.to(x)
            u = self.mean.to(x) + (centred @ q * gain) @ q.T
        return x + (1 - t) * u if self.prediction == "data" else u

    def log_prob(self, x1):
        q = torch.eye(len(self.mean)) if self.rotation is None else self.rotation
        covariance = q @ torch.diag(self.lam) @ q.T
        return torch.distributions.MultivariateNormal(self.mean, covariance).log_prob(x1)


def isotropic(prediction="velocity"):
    return GaussianFlow(MEAN, torch.full((2,), STD**2), prediction=prediction)


def noise(n=20_000, dim=2, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def assert_matches_data(x, rel=0.03):
    assert (x.mean(0) - MEAN).abs().max() < 0.03, x.mean(0)
    assert ((x.std(0) / STD) - 1).abs().max() < rel, x.std(0)


def bits_per_dim(log_p, dim):
    return -log_p / (dim * math.log(2))


# ---------------------------------------------------------------------------------------------- ODE / SDE


@pytest.mark.parametrize("solver, num_steps", [("heun", 16), ("rk4", 8), ("dopri5", 1)])
def test_ode_sampling_reproduces_gaussian(solver, num_steps):
    model = isotropic()
    solution = FlowSampler(model, make_path()).sample(noise(), solver=solver, num_steps=num_steps)
    assert_matches_data(solution.x)
    assert solution.nfe == len(model.batch_sizes)


def test_ode_sampling_with_data_prediction():
    # A small denominator floor keeps the x1 -> velocity conversion exact except right at t = 1.
    sampler = FlowSampler(isotropic("data"), make_path(denominator_min=1e-3), prediction="data")
    assert_matches_data(sampler.sample(noise(), solver="heun", num_steps=32, grid="edm").x)


@pytest.mark.parametrize("num_steps", [10, 50, 200])
def test_sde_sampling_reproduces_gaussian(num_steps):
    # Catches a wrong time direction or score sign, which end far from the data std.
    sampler = FlowSampler(isotropic(), make_path())
    x = sampler.sample_sde(noise(), num_steps=num_steps, generator=torch.Generator().manual_seed(1))
    assert_matches_data(x, rel=0.06 if num_steps == 10 else 0.03)


def test_sde_step_shapes_endpoints_and_gradients():
    scale = nn.Parameter(torch.tensor(1.0))
    model = isotropic()
    sampler = FlowSampler(lambda x, t, y: scale * model(x, t, y), make_path())
    x = noise(4)
    mean, std = sampler.sde_step(x, torch.tensor(0.0), torch.tensor(0.1))  # g(0) is infinite
    assert mean.shape == x.shape and std.shape == (4, 1)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()
    mean.sum().backward()  # GRPO differentiates the transition mean
    assert scale.grad is not None and scale.grad != 0
    # Per-sample times, including the last step into t = 1.
    t, t_next = torch.tensor([0.0, 0.3, 0.5, 0.9]), torch.tensor([0.1, 0.4, 0.6, 1.0])
    mean, std = sampler.sde_step(x, t, t_next)
    assert torch.isfinite(mean).all() and torch.isfinite(std).all()
    # noise_level = 0 is the Euler step of the ODE.
    mean, std = sampler.sde_step(x, t, t_next, noise_level=0.0)
    torch.testing.assert_close(mean, x + expand_t(t_next - t, x) * model(x, t))
    assert (std == 0).all()


# ---------------------------------------------------------------------------------------------- likelihood


@pytest.mark.parametrize("solver", ["rk4", "dopri5"])
def test_exact_log_likelihood_matches_closed_form(solver):
    model = isotropic()
    x1 = MEAN + STD * noise(64)
    bpd = FlowSampler(model, make_path()).log_likelihood(x1, solver=solver, num_steps=32)
    torch.testing.assert_close(bpd, bits_per_dim(model.log_prob(x1), 2), rtol=0, atol=2e-3)


def test_log_likelihood_with_data_prediction():
    # At t = 1 exactly, x1_hat - x = 0 carries no velocity (the conversion divides by the floored 1 - t),
    # so the first step backwards from the data is off by O(step): a looser tolerance than above.
    model = isotropic("data")
    x1 = MEAN + STD * noise(64)
    sampler = FlowSampler(model, make_path(denominator_min=1e-3), prediction="data")
    bpd = sampler.log_likelihood(x1, num_steps=64)
    torch.testing.assert_close(bpd, bits_per_dim(model.log_prob(x1), 2), rtol=0, atol=0.03)


def test_hutchinson_log_likelihood_matches_closed_form():
    # A rotated, anisotropic Gaussian in D = 20 > 16 (Hutchinson by default) has a non-diagonal
    # Jacobian, so the Rademacher estimate is genuinely noisy.
    dim = 20
    gen = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen))
    model = GaussianFlow(torch.randn(dim, generator=gen), torch.rand(dim, generator=gen) + 0.1, rotation)
    x1 = model.mean + (noise(32, dim) * model.lam.sqrt()) @ rotation.T
    sampler = FlowSampler(model, make_path())
    expected = bits_per_dim(model.log_prob(x1), dim)
    exact = sampler.log_likelihood(x1, num_steps=8, exact_divergence=True)
    torch.testing.assert_close(exact, expected, rtol=0, atol=1e-3)
    # With 16 probes the per-sample error has std ~0.05 bits/dim; the estimate is unbiased.
    estimate = sampler.log_likelihood(
        x1, num_steps=8, hutchinson_samples=16, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(estimate, expected, rtol=0, atol=0.25)
    assert (estimate.mean() - expected.mean()).abs() < 0.03


# ---------------------------------------------------------------------------------------------- CFG


class ToyConditional(nn.Module):
    """Output a[y] x + b[y]: cond and uncond (label 3 = null) velocities are known in closed form."""

    def __init__(self, num_classes=3, dim=5):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(num_classes + 1, dim, generator=gen)
        self.b = torch.randn(num_classes + 1, dim, generator=gen)
        self.batch_sizes = []

    def forward(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        return self.reference(x, t, y)

    def reference(self, x, t, y):
        return self.a[y] * x + self.b[y] + t[:, None]


def cfg_setup(batch=4):
    model = ToyConditional()
    x = torch.randn(batch, 5, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 1])
    return model, FlowSampler(model, make_path(), num_classes=3), x, y


def test_cfg_is_one_batched_forward():
    model, sampler, x, y = cfg_setup()
    t = torch.full((4,), 0.4)
    u = sampler.velocity(x, t, y, guidance_scale=3.0)
    cond, uncond = model.reference(x, t, y), model.reference(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(u, uncond + 3.0 * (cond - uncond))
    assert model.batch_sizes == [8]


@pytest.mark.parametrize("scale, t", [(1.0, 0.5), (3.0, 0.1), (3.0, 0.9)])
def test_no_guidance_is_one_conditional_forward(scale, t):
    model, sampler, x, y = cfg_setup()
    u = sampler.velocity(x, torch.tensor(t), y, guidance_scale=scale, guidance_interval=(0.3, 0.8))
    torch.testing.assert_close(u, model.reference(x, torch.full((4,), t), y))
    assert model.batch_sizes == [4]


def test_guidance_interval_is_per_sample():
    model, sampler, x, y = cfg_setup()
    t = torch.tensor([0.1, 0.5, 0.9, 0.3])
    u = sampler.velocity(x, t, y, guidance_scale=2.0, guidance_interval=(0.3, 0.8))
    cond, uncond = model.reference(x, t, y), model.reference(x, t, torch.full_like(y, 3))
    inside = torch.tensor([False, True, False, True])
    expected = torch.where(inside[:, None], uncond + 2.0 * (cond - uncond), cond)
    torch.testing.assert_close(u, expected)
    assert model.batch_sizes == [4 + 2]


def test_ep_cfg_keeps_conditional_norm_and_cfg_direction():
    model, sampler, x, y = cfg_setup()
    t = torch.full((4,), 0.6)
    u = sampler.velocity(x, t, y, guidance_scale=4.0, ep_cfg=True)
    cond, uncond = model.reference(x, t, y), model.reference(x, t, torch.full_like(y, 3))
    cfg = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(u.norm(dim=1), cond.norm(dim=1))
    torch.testing.assert_close(u / u.norm(dim=1, keepdim=True), cfg / cfg.norm(dim=1, keepdim=True))


@pytest.mark.parametrize("solver", ["euler", "heun", "dopri5"])
def test_sample_nfe_counts_model_calls(solver):
    model, sampler, x, y = cfg_setup()
    solution = sampler.sample(x, y, solver=solver, num_steps=5, guidance_scale=2.0, guidance_interval=(0.2, 0.9))
    assert solution.nfe == len(model.batch_sizes) > 0
    assert set(model.batch_sizes) <= {4, 8}


class GuidanceConditioned(nn.Module):
    """A flow map built with guidance_conditioning: records each call's (B, t, r, w) and returns
    w (a [B] scale) broadcast as the velocity, so the sampled output shows which w each row got."""

    guidance_conditioning = interval_conditioning = True

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y, r=None, w=None):
        self.calls.append((x.shape[0], t.clone(), None if r is None else r.clone(), None if w is None else w.clone()))
        return (torch.ones_like(t) if w is None else w)[:, None].expand_as(x).clone()


@pytest.mark.parametrize("solver", ["flow_map", "euler", "heun"])
def test_a_guidance_conditioned_model_is_one_forward_per_step_given_w_inside_the_interval(solver):
    """Guidance as a model condition (flow_map.py): CFG is the model's input w = guidance_scale for rows
    whose t is inside the interval and 1 outside, in one B-row forward per evaluation (no null branch)."""
    model = GuidanceConditioned()
    sampler = FlowSampler(model, make_path(), num_classes=3)
    x, y = torch.zeros(4, 5), torch.tensor([0, 1, 2, 1])
    solution = sampler.sample(x, y, solver=solver, num_steps=4, guidance_scale=2.5, guidance_interval=(0.3, 0.8))
    assert solution.nfe == len(model.calls) == (8 if solver == "heun" else 4)  # one B-row forward per evaluation
    for batch, t, r, w in model.calls:
        assert batch == 4 and (r is None) == (solver != "flow_map")
        inside = (t >= 0.3) & (t <= 0.8)
        assert torch.equal(w, torch.where(inside, 2.5, 1.0))
    assert any(bool(((t >= 0.3) & (t <= 0.8)).any()) for _, t, _, _ in model.calls)
    assert any(bool((t < 0.3).any()) for _, t, _, _ in model.calls)
    # the velocity is the model's output at that w: per row, velocity(x, t) = w(t)
    t = torch.tensor([0.1, 0.5, 0.9, 0.3])
    u = sampler.velocity(x, t, y, guidance_scale=2.5, guidance_interval=(0.3, 0.8))
    torch.testing.assert_close(u, torch.tensor([1.0, 2.5, 1.0, 2.5])[:, None].expand(4, 5))
    # guidance 1: the model is called without w (= 1); ep_cfg has no conditional branch to rescale to
    model.calls.clear()
    sampler.velocity(x, t, y, guidance_scale=1.0)
    assert len(model.calls) == 1 and model.calls[0][3] is None
    with pytest.raises(ValueError, match="ep_cfg"):
        sampler.velocity(x, t, y, guidance_scale=2.0, ep_cfg=True)


def test_a_guidance_conditioned_unet_samples_in_one_forward_per_jump():
    """The real model through the real sampler: a ClassCondUNet flow map with guidance_conditioning."""
    import models

    torch.manual_seed(0)
    model = models.ClassCondUNet(
        num_classes=3, base_ch=8, depth=1, emb_dim=16, interval_conditioning=True, guidance_conditioning=True
    ).eval()
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs.get("w")), with_kwargs=True)
    sampler = FlowSampler(model, make_path(), num_classes=3)
    solution = sampler.sample(
        torch.randn(2, 1, 8, 8), torch.tensor([0, 2]), solver="flow_map", num_steps=2, guidance_scale=1.5
    )
    assert solution.nfe == 2 and [w.tolist() for w in calls] == [[1.5, 1.5], [1.5, 1.5]]


def test_guidance_needs_labels_and_null_class():
    with pytest.raises(ValueError, match="num_classes"):
        FlowSampler(isotropic(), make_path()).velocity(noise(4), torch.tensor(0.5), None, guidance_scale=2.0)
    with pytest.raises(ValueError, match="prediction"):
        FlowSampler(isotropic(), make_path(), prediction="score")


# ---------------------------------------------------------------------------------------------- generate


@pytest.mark.parametrize("num_samples, expected", [(20, [k for k in range(10) for _ in range(2)]), (4, [0, 2, 5, 7])])
def test_generate_spreads_labels_over_the_classes(num_samples, expected):
    """num_samples >= classes: equal counts, class-major; fewer (ImageNet's 1000): evenly spaced classes,
    not one sample of every class."""
    from omegaconf import OmegaConf

    from config import SolverConfig

    sampler = FlowSampler(lambda x, t, y: torch.zeros_like(x), make_path("condot"), "velocity", num_classes=10)
    solver = OmegaConf.structured(SolverConfig(method="euler", num_steps=1))
    samples, labels = sampling.generate(sampler, solver, (2,), num_samples)
    assert labels.tolist() == expected and samples.shape == (num_samples, 2)


def solver_cfg(**values):
    return OmegaConf.structured(SolverConfig(**values))


class Elementwise(nn.Module):
    """u = -x + t + y (per sample, elementwise: no batch coupling); records each call's labels."""

    def __init__(self):
        super().__init__()
        self.labels = []

    def forward(self, x, t, y=None):
        self.labels.append(None if y is None else y.clone())
        shift = 0.0 if y is None else expand_t(y.to(x.dtype), x)
        return -x + expand_t(t, x) + shift


def test_sample_kwargs_maps_every_solver_field():
    cfg = solver_cfg(
        method="rk4",
        num_steps=7,
        grid="shifted",
        shift=3.0,
        rtol=1e-3,
        atol=2e-4,
        guidance_scale=2.5,
        guidance_interval=[0.1, 0.9],
        ep_cfg=True,
    )
    kwargs = sampling.sample_kwargs(cfg)
    assert kwargs == dict(
        solver="rk4",
        num_steps=7,
        grid="shifted",
        shift=3.0,
        rtol=1e-3,
        atol=2e-4,
        guidance_scale=2.5,
        guidance_interval=(0.1, 0.9),
        ep_cfg=True,
    )
    # every SolverConfig field reaches FlowSampler.sample (method under its name there, solver)
    import dataclasses
    import inspect

    fields = {f.name for f in dataclasses.fields(SolverConfig)}
    assert set(kwargs) == (fields - {"method"}) | {"solver"}
    assert set(kwargs) <= set(inspect.signature(FlowSampler.sample).parameters)


def test_generate_draws_its_noise_from_the_seed_on_the_cpu():
    """With a zero velocity the samples are the noise: torch.randn from Generator().manual_seed(seed)."""
    sampler = FlowSampler(lambda x, t, y: torch.zeros_like(x), make_path())
    samples, labels = sampling.generate(sampler, solver_cfg(method="euler", num_steps=2), (3, 2, 2), 5, seed=11)
    assert labels is None and samples.dtype == torch.float32
    torch.testing.assert_close(
        samples, torch.randn((5, 3, 2, 2), generator=torch.Generator().manual_seed(11)), rtol=0, atol=0
    )


def test_generate_is_deterministic_per_seed_and_independent_of_the_batch_size():
    sampler = FlowSampler(Elementwise(), make_path(), num_classes=3)
    cfg = solver_cfg(method="heun", num_steps=4)
    a, labels = sampling.generate(sampler, cfg, (2,), 12, seed=3)
    sizes = []
    b, _ = sampling.generate(sampler, cfg, (2,), 12, seed=3, batch_size=5, progress=sizes.append)
    c, _ = sampling.generate(sampler, cfg, (2,), 12, seed=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert sizes == [5, 5, 2]
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # class-balanced, class-major
    # the labels reach the model: u = -x + t + y, so the class shifts the samples
    assert (a[labels == 2].mean() - a[labels == 0].mean()) > 1.0


def test_generate_with_given_labels_uses_them():
    sampler = FlowSampler(Elementwise(), make_path(), num_classes=3)
    given = torch.tensor([2, 2, 0])
    samples, labels = sampling.generate(sampler, solver_cfg(method="euler", num_steps=1), (1,), 10, labels=given)
    assert torch.equal(labels, given) and samples.shape == (3, 1)  # the labels set the count
    assert torch.equal(sampler.model.labels[0], given)


def test_generate_refuses_non_finite_samples_naming_the_sample_and_label():
    def model(x, t, y):
        return torch.where(expand_t(y == 1, x), torch.full_like(x, float("nan")), torch.zeros_like(x))

    sampler = FlowSampler(model, make_path(), num_classes=2)
    with pytest.raises(
        sampling.NonFiniteSamplesError,
        match=r"2 of 4 samples .* sample 2 \(label 1\) is first "
        r"non-finite after solver step 1 of 3",
    ):
        sampling.generate(sampler, solver_cfg(method="euler", num_steps=3), (2,), 4)


def test_velocity_converts_data_and_noise_predictions_by_the_closed_form():
    """CondOT x_t = t x1 + (1 - t) eps, u = x1 - eps: from x1_hat u = (x1_hat - x) / (1 - t); from eps_hat
    u = (x - eps_hat) / t."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    c = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(0.25)
    data = FlowSampler(lambda x, t, y: c, make_path(), prediction="data").velocity(x, t)
    torch.testing.assert_close(data, (c - x) / 0.75)
    noise_pred = FlowSampler(lambda x, t, y: c, make_path(), prediction="noise").velocity(x, t)
    torch.testing.assert_close(noise_pred, (x - c) / 0.25)


def test_velocity_is_float32_for_a_bf16_model_output():
    sampler = FlowSampler(lambda x, t, y: x.to(torch.bfloat16), make_path())
    assert sampler.velocity(torch.ones(2, 2), torch.tensor(0.5)).dtype == torch.float32


def test_guidance_scale_zero_is_the_unconditional_velocity_and_one_the_conditional():
    model, sampler, x, y = cfg_setup()
    t = torch.full((4,), 0.3)
    torch.testing.assert_close(
        sampler.velocity(x, t, y, guidance_scale=0.0), model.reference(x, t, torch.full_like(y, 3))
    )
    torch.testing.assert_close(sampler.velocity(x, t, y, guidance_scale=1.0), model.reference(x, t, y))


def test_sample_sde_is_deterministic_for_a_generator():
    sampler = FlowSampler(isotropic(), make_path())
    x = noise(8)
    a = sampler.sample_sde(x, num_steps=5, generator=torch.Generator().manual_seed(1))
    b = sampler.sample_sde(x, num_steps=5, generator=torch.Generator().manual_seed(1))
    c = sampler.sample_sde(x, num_steps=5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------- straightness


def test_straightness_of_a_parabola_by_hand():
    """x(t) = x0 + t^2 c on the uniform 4-step grid: step k's slope is (t_k + t_{k+1}) c and X1 - X0 = c, so
    S = sum_k h (1 - t_k - t_{k+1})^2 |c|^2 = 0.25 (0.5625 + 0.0625 + 0.0625 + 0.5625) |c|^2 = 0.3125 |c|^2."""
    times = torch.linspace(0, 1, 5, dtype=torch.float64)
    x0 = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    c = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # |c|^2 = 25 and 1
    trajectory = [x0 + float(t) ** 2 * c for t in times]
    torch.testing.assert_close(
        sampling.straightness(trajectory, times), torch.tensor([0.3125 * 25, 0.3125], dtype=torch.float64)
    )


def test_straightness_of_a_straight_path_is_zero_on_any_grid():
    times = torch.tensor([0.0, 0.1, 0.5, 0.6, 1.0], dtype=torch.float64)
    trajectory = [torch.tensor([[1.0, -1.0]]) + float(t) * torch.tensor([[2.0, 5.0]]) for t in times]
    assert float(sampling.straightness(trajectory, times)) == pytest.approx(0.0, abs=1e-10)  # float32 states


def test_measure_straightness_constant_field_is_zero_and_a_rotation_is_not():
    cfg = solver_cfg(method="euler", num_steps=8)
    constant = FlowSampler(lambda x, t, y: torch.ones_like(x), make_path())
    assert sampling.measure_straightness(constant, cfg, (2,), 16, seed=0) == pytest.approx(0.0, abs=1e-12)
    rotation = FlowSampler(lambda x, t, y: torch.stack([-x[:, 1], x[:, 0]], 1), make_path())
    assert sampling.measure_straightness(rotation, cfg, (2,), 16, seed=0) > 0.05
