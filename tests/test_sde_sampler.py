"""Flow-GRPO rollouts (rl/sde_sampler.py): Gaussian log-probs, marginals of the SDE rollout, stored vs
recomputed log-probs, exact reproducibility and the timestep subset."""

import math

import pytest
import torch
from torch import nn

from flow import expand_t, make_path
from rl.sde_sampler import (
    Rollout,
    cps_step,
    gaussian_log_prob,
    sde_rollout,
    select_timesteps,
    transition_log_prob,
    window_steps,
)
from sampling import FlowSampler

MEAN = torch.tensor([1.0, -2.0])
STD = 0.5


class GaussianVelocity(nn.Module):
    """Exact CondOT velocity for data N(MEAN, STD^2 I) (as tests/test_sampling.py's GaussianFlow):
    x_t ~ N(t m, (t^2 s^2 + (1 - t)^2) I) and u(x, t) = m + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t m).
    Ignores y. `gain` (1 = exact) is a parameter to differentiate."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, t, y=None):
        t = expand_t(t, x)
        var = STD**2
        u = MEAN + (t * var - (1 - t)) / (t**2 * var + (1 - t) ** 2) * (x - t * MEAN)
        return self.gain * u


class ToyConditional(nn.Module):
    """a[y] x + b[y] + t on images [B, C, H, W] (label 3 = null), recording the rows of every call."""

    def __init__(self, num_classes=3):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(0.3 * torch.randn(num_classes + 1, generator=gen))
        self.b = nn.Parameter(torch.randn(num_classes + 1, generator=gen))
        self.batch_sizes = []

    def forward(self, x, t, y):
        self.batch_sizes.append(x.shape[0])
        return expand_t(self.a[y], x) * x + expand_t(self.b[y] + t, x)


def noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def conditional_rollout(num_steps=6, batch=5, guidance_scale=3.0, seed=1, **kwargs):
    model = ToyConditional()
    sampler = FlowSampler(model, make_path(), num_classes=3)
    labels = torch.arange(batch) % 3
    rollout = sde_rollout(
        sampler,
        noise((batch, 1, 4, 4)),
        labels,
        num_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )
    return model, sampler, rollout


# ---------------------------------------------------------------------------------------------- log-prob


def test_gaussian_log_prob_matches_torch_normal():
    x, mean = noise((4, 3, 5, 5), 0), noise((4, 3, 5, 5), 1)
    std = torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(2)) + 0.1
    reference = torch.distributions.Normal(mean, std).log_prob(x).flatten(1)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, "sum"), reference.sum(1))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), reference.mean(1))  # mean is the default
    out = gaussian_log_prob(x.bfloat16(), mean.bfloat16(), std.bfloat16())
    assert out.shape == (4,) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(x, mean, std, "max")


# ---------------------------------------------------------------------------------------------- rollouts


@pytest.mark.parametrize("num_steps", [10, 50, 200])
def test_rollout_reproduces_gaussian(num_steps):
    # A wrong time direction, score sign or noise scale ends far from the data std.
    sampler = FlowSampler(GaussianVelocity(), make_path())
    rollout = sde_rollout(
        sampler, noise((20_000, 2)), None, num_steps, noise_level=0.7, generator=torch.Generator().manual_seed(1)
    )
    x = rollout.samples
    rel = 0.06 if num_steps == 10 else 0.03
    assert (x.mean(0) - MEAN).abs().max() < 0.03, x.mean(0)
    assert (x.std(0) / STD - 1).abs().max() < rel, x.std(0)


def test_rollout_shapes_and_bookkeeping():
    model, sampler, rollout = conditional_rollout(num_steps=6, batch=5)
    assert isinstance(rollout, Rollout) and rollout.num_steps == 6
    assert rollout.states.shape == rollout.next_states.shape == rollout.means.shape == (6, 5, 1, 4, 4)
    assert rollout.stds.shape == (6, 5, 1, 1, 1) and rollout.log_probs.shape == (6, 5)
    assert rollout.times.shape == rollout.next_times.shape == (6,)
    assert rollout.means.dtype == rollout.stds.dtype == rollout.log_probs.dtype == torch.float32
    torch.testing.assert_close(rollout.times, torch.linspace(0, 1, 7)[:-1])
    torch.testing.assert_close(rollout.next_times, torch.linspace(0, 1, 7)[1:])
    assert torch.equal(rollout.states[0], noise((5, 1, 4, 4)))
    assert torch.equal(rollout.states[1:], rollout.next_states[:-1])
    assert torch.equal(rollout.samples, rollout.next_states[-1])
    assert torch.equal(rollout.labels, torch.arange(5) % 3)
    assert (rollout.stds > 0).all() and torch.isfinite(rollout.log_probs).all()
    # One batched CFG forward per step: [x; x] with labels [y; null].
    assert model.batch_sizes == [10] * 6


def test_stored_log_probs_equal_recomputed_with_frozen_policy():
    model, sampler, rollout = conditional_rollout(num_steps=8, batch=5, guidance_scale=3.0)
    for steps in (None, torch.tensor([0, 3, 7])):
        flat = rollout.transitions(steps)
        model.batch_sizes.clear()
        log_probs, means, stds = transition_log_prob(
            sampler,
            flat.states,
            flat.times,
            flat.next_times,
            flat.next_states,
            flat.labels,
            noise_level=0.7,
            guidance_scale=3.0,
        )
        assert model.batch_sizes == [2 * flat.states.shape[0]]  # one forward for all N transitions
        torch.testing.assert_close(log_probs, flat.log_probs, rtol=0, atol=1e-5)
        torch.testing.assert_close(means, flat.means, rtol=0, atol=1e-6)
        torch.testing.assert_close(stds, flat.stds)
    # Row order is step-major: row k' * B + b is step steps[k'] of sample b.
    flat = rollout.transitions(torch.tensor([2, 5]))
    assert torch.equal(flat.sample_index, torch.arange(5).repeat(2))
    assert torch.equal(flat.states[5:], rollout.states[5])
    assert torch.equal(flat.log_probs, rollout.log_probs[[2, 5]].flatten())
    assert torch.equal(flat.times, rollout.times[[2, 2, 2, 2, 2, 5, 5, 5, 5, 5]])


def test_guidance_interval_guides_only_inside_it_and_recomputes_exactly():
    """CFG on [0, 0.5] only: each stored mean is the guided step's inside the interval (t <= 0.5, closed)
    and the plain conditional step's outside, and the recomputed log-probs match the stored ones."""
    model, sampler, rollout = conditional_rollout(
        num_steps=6, batch=5, guidance_scale=3.0, guidance_interval=(0.0, 0.5)
    )
    labels = rollout.labels
    for k in range(6):
        t = rollout.times[k].item()
        scale = 3.0 if t <= 0.5 else 1.0
        expected, _ = sampler.sde_step(rollout.states[k], rollout.times[k], rollout.next_times[k], labels, 0.7, scale)
        torch.testing.assert_close(rollout.means[k], expected, rtol=0, atol=1e-6)
    guided = conditional_rollout(num_steps=6, batch=5, guidance_scale=3.0)[2]
    assert not torch.allclose(rollout.samples, guided.samples)  # the interval changed the rollout
    flat = rollout.transitions()
    log_probs, _, _ = transition_log_prob(
        sampler,
        flat.states,
        flat.times,
        flat.next_times,
        flat.next_states,
        flat.labels,
        0.7,
        3.0,
        guidance_interval=(0.0, 0.5),
    )
    torch.testing.assert_close(log_probs, flat.log_probs, rtol=0, atol=1e-5)
    unguided_tail, _, _ = transition_log_prob(
        sampler, flat.states, flat.times, flat.next_times, flat.next_states, flat.labels, 0.7, 3.0
    )  # guided everywhere: differs after t = 0.5
    late = flat.times > 0.5
    assert not torch.allclose(unguided_tail[late], flat.log_probs[late])
    torch.testing.assert_close(unguided_tail[~late], flat.log_probs[~late], rtol=0, atol=1e-5)


def test_transition_log_prob_is_differentiable_and_sum_is_d_times_mean():
    model = GaussianVelocity()
    sampler = FlowSampler(model, make_path())
    rollout = sde_rollout(sampler, noise((64, 2)), None, 10, generator=torch.Generator().manual_seed(3))
    flat = rollout.transitions()
    args = (sampler, flat.states, flat.times, flat.next_times, flat.next_states, None, 0.7, 1.0)
    log_probs, _, _ = transition_log_prob(*args, log_prob_reduce="mean")
    log_probs.sum().backward()
    assert model.gain.grad is not None and model.gain.grad != 0
    with torch.no_grad():
        summed, _, _ = transition_log_prob(*args, log_prob_reduce="sum")
        torch.testing.assert_close(summed, 2 * log_probs)
        # Under the sampling policy the actions are mean + std z: mean-reduced log pi = E[-z^2/2] - log std
        # - log(2 pi)/2 on average.
        z = (flat.next_states - flat.means) / flat.stds
        expected = -0.5 * z.square().mean(1) - flat.stds.flatten().log() - 0.5 * math.log(2 * math.pi)
        torch.testing.assert_close(log_probs, expected, rtol=0, atol=1e-4)


def test_same_generator_seed_gives_identical_rollouts():
    _, _, first = conditional_rollout(seed=7)
    _, _, again = conditional_rollout(seed=7)
    _, _, other = conditional_rollout(seed=8)
    for name in ("states", "next_states", "means", "stds", "log_probs", "samples"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.samples, other.samples)
    assert torch.equal(first.states[0], other.states[0])  # the initial noise is the caller's


def test_rollout_on_a_shifted_grid_and_bad_noise_level():
    _, _, rollout = conditional_rollout(num_steps=4, grid="shifted", shift=3.0)
    assert rollout.times[0] == 0 and rollout.next_times[-1] == 1
    assert rollout.times[1] < 0.25  # shift > 1 spends the steps near noise
    with pytest.raises(ValueError, match="noise_level"):
        conditional_rollout(noise_level=0.0)


# ---------------------------------------------------------------------------------------------- timesteps


def test_select_timesteps_first_never_trains_the_final_step():
    """Flow-GRPO's choice (the default): the first K transitions in order, K = T - 1 by default, no draw."""
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert torch.equal(select_timesteps(10, None, gen), torch.arange(9))
    assert torch.equal(select_timesteps(10, 4, gen), torch.arange(4))
    assert torch.equal(gen.get_state(), state)  # consumed nothing: exact resume does not depend on it
    assert torch.equal(select_timesteps(1, None), torch.arange(1))  # a 1-step rollout has only the final step
    for bad in (0, 10):
        with pytest.raises(ValueError, match="num_train_steps"):
            select_timesteps(10, bad, gen)
    # "last": the K steps just before the final one (the low-noise end)
    assert torch.equal(select_timesteps(10, 4, gen, "last"), torch.arange(5, 9))
    assert torch.equal(select_timesteps(10, None, gen, "last"), torch.arange(9))
    with pytest.raises(ValueError, match="selection"):
        select_timesteps(10, 4, gen, "middle")


def test_select_timesteps_is_deterministic_distinct_and_sorted():
    def draw(seed):
        return select_timesteps(20, 6, torch.Generator().manual_seed(seed), "random")

    steps = draw(0)
    assert steps.dtype == torch.long and steps.shape == (6,)
    assert torch.equal(steps, draw(0))
    assert torch.equal(steps, steps.sort().values) and steps.unique().numel() == 6
    assert 0 <= steps.min() and steps.max() < 20
    assert any(not torch.equal(steps, draw(seed)) for seed in range(1, 5))
    # Consecutive draws from one generator continue its stream (exact resume from the generator state).
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(select_timesteps(20, 6, gen, "random"), steps)
    assert torch.equal(select_timesteps(20, 20, gen, "random"), torch.arange(20))
    assert torch.equal(select_timesteps(20, None, selection="random"), torch.arange(20))
    with pytest.raises(ValueError, match="num_train_steps"):
        select_timesteps(20, 0, gen, "random")


class FiniteVelocity(nn.Module):
    """u = gain (m - x): a finite velocity everywhere, as a trained velocity-predicting network gives."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.0))

    def forward(self, x, t, y=None):
        return self.gain * (MEAN - x)


@pytest.mark.parametrize("n", [0.5, 2.0])
def test_polynomial_sde_is_finite_and_exact_at_the_noise_end(n):
    """Polynomial alpha = t^n gave NaN SDE rollouts for n = 0.5 and 2: the velocity -> noise conversion
    divides by alpha d_sigma - sigma d_alpha, infinite (n < 1) or 0 (n > 1) at t = 0. At alpha = 0 the
    state is pure noise, so eps_hat = x / sigma and the score is -x (sigma(0) = 1)."""
    model = FiniteVelocity()
    sampler = FlowSampler(model, make_path("polynomial", n=n))
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    mean, std = sampler.sde_step(x, torch.tensor(0.0), torch.tensor(0.1), noise_level=0.7)
    g_squared = 0.7**2 * (1 - 0.1**n) / 0.1**n  # g evaluated at t_next (g is infinite at t = 0)
    torch.testing.assert_close(mean, x + 0.1 * (model(x, None) - 0.5 * g_squared * x))
    torch.testing.assert_close(std, torch.full((64, 1), math.sqrt(g_squared * 0.1)))
    mean.sum().backward()
    assert torch.isfinite(model.gain.grad)
    rollout = sde_rollout(sampler, x, None, 10, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(rollout.samples).all() and torch.isfinite(rollout.log_probs).all()


def test_window_steps_fixed_and_sliding():
    assert window_steps(6, 2, "fixed", start=1).tolist() == [1, 2]
    # sliding: 6 - 2 = 4 positions (the window never covers the final step 5), moving every 2 iterations
    starts = [int(window_steps(6, 2, "sliding", stride=1, every=2, iteration=i)[0]) for i in range(10)]
    assert starts == [0, 0, 1, 1, 2, 2, 3, 3, 0, 0]
    for size, start in ((0, 0), (6, 0), (2, 4)):
        with pytest.raises(ValueError, match="does not fit"):
            window_steps(6, size, "fixed", start=start)
    with pytest.raises(ValueError, match="mode"):
        window_steps(6, 2, "random")


def test_a_windowed_rollout_is_ode_outside_its_window():
    """Outside the window: std 0, the next state is the mean (an Euler step), log-prob 0, and no noise is drawn,
    so two generators give the same path up to the window; inside, the stored log-probs recompute exactly."""
    window = torch.tensor([1, 2])
    _, sampler, rollout = conditional_rollout(num_steps=5, sde_steps=window)
    _, _, other = conditional_rollout(num_steps=5, seed=7, sde_steps=window)
    for k in (0, 3, 4):
        assert rollout.stds[k].abs().max() == 0 and rollout.log_probs[k].abs().max() == 0
        torch.testing.assert_close(rollout.next_states[k], rollout.means[k].to(rollout.next_states.dtype))
    assert torch.equal(rollout.next_states[0], other.next_states[0])  # before the window: deterministic
    assert not torch.equal(rollout.next_states[1], other.next_states[1])
    for k in window.tolist():
        assert rollout.stds[k].min() > 0
        log_probs, _, _ = transition_log_prob(
            sampler,
            rollout.states[k],
            rollout.times[k],
            rollout.next_times[k],
            rollout.next_states[k],
            rollout.labels,
            0.7,
            3.0,
        )
        torch.testing.assert_close(log_probs, rollout.log_probs[k], rtol=0, atol=1e-6)


def test_cps_rollout_ends_on_the_data_and_recomputes_exactly():
    """Coefficients-preserving steps with the exact velocity of N(MEAN, STD^2 I): at a small noise level the
    rollout reproduces the data; at a = 0.7 the mean stays but the samples are under-dispersed (CPS keeps the
    path's coefficients, not its marginals: the fresh noise replaces part of the posterior-mean prediction's;
    measured std 0.42 of 0.50 at 200 steps). The final step into t = 1 is deterministic (std 0, log-prob 0),
    and every other stored log-prob recomputes exactly."""
    sampler = FlowSampler(GaussianVelocity(), make_path())
    small = sde_rollout(
        sampler, noise((20_000, 2)), None, 200, 0.1, generator=torch.Generator().manual_seed(1), kind="cps"
    )
    assert (small.samples.mean(0) - MEAN).abs().max() < 0.03 and (small.samples.std(0) / STD - 1).abs().max() < 0.02
    rollout = sde_rollout(
        sampler, noise((20_000, 2)), None, 10, 0.7, generator=torch.Generator().manual_seed(1), kind="cps"
    )
    x = rollout.samples
    assert (x.mean(0) - MEAN).abs().max() < 0.03, x.mean(0)
    assert ((x.std(0) / STD) < 0.9).all(), x.std(0)
    assert rollout.stds[-1].abs().max() == 0 and rollout.log_probs[-1].abs().max() == 0
    assert rollout.stds[:-1].min() > 0
    k = 5
    log_probs, _, _ = transition_log_prob(
        sampler, rollout.states[k], rollout.times[k], rollout.next_times[k], rollout.next_states[k], None, kind="cps"
    )
    torch.testing.assert_close(log_probs, rollout.log_probs[k], rtol=0, atol=1e-6)


def test_cps_keeps_the_paths_coefficients():
    """With the exact data and noise predictions, x_next = alpha' x1 + sqrt(sigma'^2 - s^2) eps + s z has exactly
    the path's noise scale sigma': the injected noise s = sigma' sin(a pi / 2) replaces part of the predicted."""
    sampler = FlowSampler(GaussianVelocity(), make_path())
    x = noise((4, 2))
    t, t_next = torch.tensor(0.4), torch.tensor(0.6)
    mean, std = cps_step(sampler, x, t, t_next, None, noise_level=0.7)
    sigma_next = 1 - 0.6  # CondOT: sigma(t) = 1 - t
    torch.testing.assert_close(std, torch.full((4, 1), sigma_next * math.sin(0.7 * math.pi / 2)))
    u = sampler.velocity(x, t)
    data_hat = sampler.path.convert(u, x, t.expand(4), "velocity", "data")
    eps_hat = sampler.path.convert(u, x, t.expand(4), "velocity", "noise")
    expected = 0.6 * data_hat + math.sqrt(sigma_next**2 - std[0, 0].item() ** 2) * eps_hat
    torch.testing.assert_close(mean, expected)
    with pytest.raises(ValueError, match="sampler must be one of"):
        sde_rollout(sampler, x, None, 4, kind="ddim")
