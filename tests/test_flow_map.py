"""Flow maps (flow_map.py): the JVP against a finite difference, the MeanFlow target and loss against a
Gaussian flow whose average velocity is known in closed form, the interval draws, and flow-map sampling."""

import math

import pytest
import torch

import flow
import flow_map
from models import MLP
from ode_solvers import time_grid
from sampling import FlowSampler


@pytest.fixture(autouse=True)
def float64():
    """float64 inside each test of this file only (analytic comparisons to 1e-9 and below)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class GaussianFlow(torch.nn.Module):
    """The exact flow of a path between N(0, I) noise and N(m, s^2 I) data, as a model(z, t, y, r=r).

    coupling "independent" (CondOT path): the marginal p_t = N(t m, g(t)^2 I), g(t)^2 = t^2 s^2 + (1 - t)^2,
    and the ODE keeps each point's standard score xi = (z - t m) / g(t), so z_r = r m + g(r) xi and
    u(z, r, t) = (z_r - z) / (r - t); u(z, t, t) = v = m + g'(t) xi.
    coupling "deterministic" (x1 = m + s eps, any scheduler): z_t = alpha m + (alpha s + sigma) eps, a
    path that is curved unless the scheduler is CondOT, with the conditional velocity equal to the
    marginal one (eps is a function of z_t), so the MeanFlow loss of the exact u is zero."""

    def __init__(self, m, s, scheduler, coupling):
        super().__init__()
        self.m, self.s, self.scheduler, self.coupling = m, s, scheduler, coupling
        self.interval_conditioning = True

    def scale(self, t):
        """(a(t), g(t), a'(t), g'(t)) with z_t = a(t) m + g(t) xi at fixed xi."""
        if self.coupling == "independent":
            g = (t**2 * self.s**2 + (1 - t) ** 2).sqrt()
            return t, g, torch.ones_like(t), (t * self.s**2 - (1 - t)) / g
        sch = self.scheduler
        alpha, sigma, d_alpha, d_sigma = sch.alpha(t), sch.sigma(t), sch.d_alpha(t), sch.d_sigma(t)
        return alpha, alpha * self.s + sigma, d_alpha, d_alpha * self.s + d_sigma

    def velocity(self, z, t):
        """v(z, t) [B, D] = a' m + g' xi."""
        a, g, da, dg = (v[:, None] for v in self.scale(t))
        return da * self.m + dg * (z - a * self.m) / g

    def forward(self, z, t, y=None, r=None):
        if r is None:
            return self.velocity(z, t)
        a_t, g_t = (v[:, None] for v in self.scale(t)[:2])
        a_r, g_r = (v[:, None] for v in self.scale(r)[:2])
        xi = (z - a_t * self.m) / g_t
        z_r = a_r * self.m + g_r * xi
        gap = (r - t)[:, None]
        # r = t rows: the limit, v; elsewhere the chord
        return torch.where(gap == 0, self.velocity(z, t), (z_r - z) / torch.where(gap == 0, 1.0, gap))


def small_mlp():
    torch.manual_seed(0)
    model = MLP(dim=3, hidden_dim=16, num_blocks=1, time_freq_dim=8, interval_conditioning=True).double()
    for p in model.parameters():  # move every layer off its init (the zero layers would hide terms)
        torch.nn.init.normal_(p, std=0.3)
    return model


def test_jvp_matches_a_central_finite_difference_along_v_1_0():
    model = small_mlp()
    g = torch.Generator().manual_seed(1)
    z, dz = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.rand(5, generator=g) * 0.5
    r = t + 0.4

    def u(z_, t_, r_):
        return model(z_, t_, None, r=r_)

    value, dudt = flow_map.total_derivative(u, z, t, r, dz)
    torch.testing.assert_close(value, u(z, t, r))
    # the sinusoidal time features reach frequency 1000 (models.timestep_embedding), so h must be small
    # against 1e-3; float64 keeps the rounding error (~1e-16 |u| / h) far below the tolerance
    for h in (1e-6, 1e-7):
        fd = flow_map.finite_difference_derivative(u, z, t, r, dz, h)
        torch.testing.assert_close(dudt, fd, rtol=1e-5, atol=1e-6)
    # the tangent holds r fixed and moves t: a difference in r instead must disagree
    moved_r = (u(z + 1e-5 * dz, t, r + 1e-5) - u(z - 1e-5 * dz, t, r - 1e-5)) / 2e-5
    assert (moved_r - dudt).abs().max() > 1e-3


def objective(path, **kwargs):
    sampler = flow.make_time_sampler("uniform")
    return flow_map.MeanFlowObjective(path, flow_map.IntervalSampler(sampler, 0.0), **kwargs)


def times(batch=64, seed=2):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(batch, generator=g) * 0.98 + 0.01, torch.rand(batch, generator=g) * 0.98 + 0.01
    t, r = torch.minimum(a, b), torch.maximum(a, b)
    r[:8] = t[:8]  # some r = t rows
    return t, r


@pytest.mark.parametrize(
    "scheduler, tangent", [("condot", "conditional"), ("cosine", "conditional"), ("condot", "model")]
)
def test_the_target_with_the_marginal_velocity_is_the_analytic_average_velocity(scheduler, tangent):
    """tangent=model takes the JVP along the network's own u(z, t, t), here the exact v."""
    path = flow.make_path(scheduler)
    exact = GaussianFlow(torch.tensor([1.5, -0.5, 0.2]), 0.4, path.scheduler, "independent")
    t, r = times()
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(3))
    v = exact(z, t)  # the marginal velocity, which the conditional one estimates without bias
    target = objective(path, tangent=tangent).target(exact, z, v, t, r, None, None)
    torch.testing.assert_close(target, exact(z, t, r=r), rtol=1e-9, atol=1e-9)
    # the sign of the (r - t) du/dt term: flipping it is far off wherever r > t
    _, dudt = flow_map.total_derivative(lambda a, b, c: exact(a, b, r=c), z, t, r, v)
    wrong = v - (r - t)[:, None] * dudt
    assert (wrong - exact(z, t, r=r)).abs().max() > 0.1
    if tangent == "model":  # a noisy v moves the target by the noise alone: the JVP follows the model's v
        noise = torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
        noisy = objective(path, tangent=tangent).target(exact, z, v + noise, t, r, None, None)
        torch.testing.assert_close(noisy - target, noise, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("derivative", ["jvp", "finite_difference", "split"])
def test_the_exact_average_velocity_has_zero_loss_and_a_wrong_one_does_not(derivative):
    path = flow.make_path("cosine")  # curved paths: du/dt along them is far from zero
    m, s = torch.tensor([1.0, -2.0, 0.5]), 0.5
    exact = GaussianFlow(m, s, path.scheduler, "deterministic")
    g = torch.Generator().manual_seed(4)
    eps = torch.randn(64, 3, generator=g)
    x1 = m + s * eps
    t, r = times()
    kwargs = dict(weight_p=0.0, derivative=derivative, fd_step=1e-5)
    loss, per_sample = objective(path, **kwargs).loss(exact, exact, x1, eps, t, r)
    tolerance = 1e-12 if derivative == "finite_difference" else 1e-20
    assert float(loss) < tolerance and per_sample.shape == (64,)
    z = path.sample(x1, eps, t)[0]
    _, dudt = flow_map.total_derivative(lambda a, b, c: exact(a, b, r=c), z, t, r, exact(z, t))
    assert dudt.abs().max() > 0.1  # the identity's du/dt term is exercised, not zero

    class Instantaneous(torch.nn.Module):  # right at r = t, wrong elsewhere: u(z, r, t) = v(z, t)
        def forward(self, z, t, y=None, r=None):
            return exact(z, t)

    wrong = Instantaneous()
    loss, per_sample = objective(path, **kwargs).loss(wrong, wrong, x1, eps, t, r)
    assert float(per_sample[:8].max()) < 1e-20 and float(per_sample[8:].min()) > 0


def test_adaptive_weighting_is_a_stop_gradient_weight():
    path = flow.make_path("condot")
    model = small_mlp()
    g = torch.Generator().manual_seed(5)
    x1, eps = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    t, r = times(16)
    plain = objective(path, weight_p=0.0).loss(model, model, x1, eps, t, r)[1]
    weighted = objective(path, weight_p=0.5, weight_c=1e-3).loss(model, model, x1, eps, t, r)[1]
    torch.testing.assert_close(weighted, plain / (3 * plain + 1e-3) ** 0.5)
    # d(sg(w) e^2) = sg(w) d(e^2): the gradient is the plain one scaled per sample
    model.zero_grad()
    objective(path, weight_p=0.5).loss(model, model, x1[:1], eps[:1], t[:1], r[:1])[0].backward()
    weighted_grad = model.out[-1].bias.grad.clone()
    model.zero_grad()
    objective(path, weight_p=0.0).loss(model, model, x1[:1], eps[:1], t[:1], r[:1])[0].backward()
    torch.testing.assert_close(weighted_grad, model.out[-1].bias.grad / (3 * plain[0] + 1e-3) ** 0.5)


def test_interval_draws_are_ordered_equal_at_the_fraction_and_capped_by_the_curriculum():
    sampler = flow_map.IntervalSampler(flow.make_time_sampler("logit_normal", mean=0.4), equal_fraction=0.25)
    g = torch.Generator().manual_seed(6)
    t0 = flow.make_time_sampler("logit_normal", mean=0.4)(20000, g)
    state = g.get_state()
    t, r = sampler(t0, g)
    assert bool((r >= t).all())
    assert abs(float((r == t).double().mean()) - 0.25) < 0.02
    equal = r == t
    assert torch.equal(t[equal], t0[equal])  # r = t rows keep the flow-matching draw
    _, r_capped = sampler(t0, torch.Generator().manual_seed(7), max_gap=0.1)
    assert float((r_capped - torch.minimum(t0, r_capped)).max()) <= 0.1 + 1e-6
    assert flow_map.curriculum_gap(0, 100, 0.2) == pytest.approx(0.2)
    assert flow_map.curriculum_gap(50, 100, 0.2) == pytest.approx(0.6)
    assert flow_map.curriculum_gap(500, 100, 0.2) == 1.0 and flow_map.curriculum_gap(7, 0, 0.0) == 1.0
    # the same generator state gives the same draws (exact resume)
    g.set_state(state)
    again = sampler(t0, g)
    assert torch.equal(again[0], t) and torch.equal(again[1], r)


def test_endpoint_fraction_moves_that_share_of_the_moving_draws_to_the_whole_interval():
    time_sampler = flow.make_time_sampler("uniform")
    t0 = time_sampler(20000, torch.Generator().manual_seed(8))
    plain = flow_map.IntervalSampler(time_sampler, equal_fraction=0.5)
    ends = flow_map.IntervalSampler(time_sampler, equal_fraction=0.5, endpoint_fraction=0.3)
    t, r = ends(t0, torch.Generator().manual_seed(9))
    moving = r != t
    whole = (t == 0) & (r == 1)
    assert abs(float(whole[moving].double().mean()) - 0.3) < 0.02
    assert abs(float(moving.double().mean()) - 0.5) < 0.02  # the r = t share is unchanged
    # the other moving rows are the plain sampler's draws (the endpoint draw comes after them)
    t_plain, r_plain = plain(t0, torch.Generator().manual_seed(9))
    keep = ~whole
    assert torch.equal(t[keep], t_plain[keep]) and torch.equal(r[keep], r_plain[keep])
    # endpoint_fraction = 0 draws nothing more: the generator ends where the plain sampler's does
    g_plain, g_zero = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    plain(t0, g_plain)
    flow_map.IntervalSampler(time_sampler, equal_fraction=0.5, endpoint_fraction=0.0)(t0, g_zero)
    assert torch.equal(g_plain.get_state(), g_zero.get_state())
    # the curriculum still caps the gap of the endpoint rows
    t_cap, r_cap = ends(t0, torch.Generator().manual_seed(9), max_gap=0.25)
    assert float((r_cap - t_cap).max()) <= 0.25 + 1e-6


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_flow_map_sampling_of_the_exact_map_is_the_exact_ode_solution(steps):
    path = flow.make_path("condot")
    m, s = torch.tensor([1.5, -0.5, 0.2]), 0.4
    exact = GaussianFlow(m, s, path.scheduler, "independent")
    noise = torch.randn(32, 3, generator=torch.Generator().manual_seed(7))
    solution = FlowSampler(exact, path).sample(noise, solver="flow_map", num_steps=steps)
    assert solution.nfe == steps
    # the ODE keeps the standard score: noise xi at t = 0 ends at m + s xi
    torch.testing.assert_close(solution.x, m + s * noise, rtol=1e-10, atol=1e-10)
    # many-step ODE on u(z, t, t) = v still works through the same sampler
    ode = FlowSampler(exact, path).sample(noise, solver="rk4", num_steps=64)
    torch.testing.assert_close(ode.x, m + s * noise, rtol=1e-6, atol=1e-6)


def test_flow_map_sampling_steps_through_the_grid_with_r_the_next_time():
    calls = []

    class Recorder(torch.nn.Module):
        interval_conditioning = True

        def forward(self, z, t, y=None, r=None):
            calls.append((float(t[0]), float(r[0])))
            return torch.ones_like(z)

    noise = torch.zeros(2, 3)
    out = FlowSampler(Recorder(), flow.make_path()).sample(
        noise, solver="flow_map", num_steps=3, grid="shifted", shift=3.0
    )
    grid = time_grid(3, "shifted", 3.0).tolist()
    expected = [x for pair in zip(grid[:-1], grid[1:]) for x in pair]
    assert [x for call in calls for x in call] == pytest.approx(expected)
    torch.testing.assert_close(out.x, torch.ones(2, 3))  # the jumps add up to (1 - 0) * 1


def test_a_velocity_model_refuses_the_flow_map_sampler_and_a_target_time():
    model = MLP(dim=2, hidden_dim=8, num_blocks=1, time_freq_dim=8)
    with pytest.raises(ValueError, match="interval_conditioning"):
        FlowSampler(model, flow.make_path()).sample(torch.zeros(2, 2), solver="flow_map", num_steps=1)
    with pytest.raises(ValueError, match="interval_conditioning"):
        model(torch.zeros(2, 2), torch.zeros(2), None, r=torch.ones(2))
    assert math.isfinite(float(model(torch.zeros(2, 2), torch.zeros(2)).sum()))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["flow.objective=mean_flow"],
            "flow.objective = 'mean_flow' is not allowed; choose one of: flow_matching, meanflow",
        ),
        (
            ["experiment=moons", "flow.objective=meanflow"],
            "model.interval_conditioning = False: must be true with flow.objective=meanflow",
        ),
        (["experiment=moons", "solver.method=flow_map"], "must be true with solver.method=flow_map"),
        (["flow.prediction=data"], "flow.prediction = 'data': must be velocity with flow.objective=meanflow"),
        (["flow.weighting.name=snr"], "flow.weighting.name = 'snr': must be uniform"),
        (
            ["flow.meanflow.tangent=model_free"],
            "flow.meanflow.tangent = 'model_free': must be one of: conditional, model",
        ),
        (["flow.meanflow.equal_fraction=1.5"], "flow.meanflow.equal_fraction = 1.5: must be in [0, 1]"),
        (["flow.meanflow.endpoint_fraction=-0.1"], "flow.meanflow.endpoint_fraction = -0.1: must be in [0, 1]"),
        (
            ["flow.meanflow.guidance_scale=2.0"],
            "training.p_uncond = 0.0: must be > 0 with flow.meanflow.guidance_scale",
        ),
        (["solver.method=flow_mapp"], "solver.method = 'flow_mapp' is not allowed"),
        (
            ["experiment=digits_meanflow_guided", "model.guidance_conditioning=false"],
            "model.guidance_conditioning = False: must be true with flow.objective=meanflow and "
            "flow.meanflow.guidance_condition=true",
        ),
        (
            ["experiment=digits_meanflow", "+model.guidance_conditioning=true"],
            "model.guidance_conditioning = True: must be false with flow.objective=meanflow and "
            "flow.meanflow.guidance_condition=false",
        ),
        (
            ["experiment=digits_meanflow_guided", "flow.meanflow.guidance_scale=2.0"],
            "flow.meanflow.guidance_scale = 2.0: must be 1 with flow.meanflow.guidance_condition=true",
        ),
        (
            ["experiment=digits_meanflow_guided", "training.p_uncond=0.0"],
            "training.p_uncond = 0.0: must be > 0 with flow.meanflow.guidance_condition=true",
        ),
        (
            ["experiment=digits_meanflow_guided", "flow.meanflow.guidance_range=[3.0,1.0]"],
            "flow.meanflow.guidance_range = [3.0, 1.0]: must be [lo, hi] with 1 <= lo <= hi",
        ),
        (
            ["experiment=digits_meanflow_guided", "flow.meanflow.guidance_range=[0.5,2.0]"],
            "flow.meanflow.guidance_range = [0.5, 2.0]: must be [lo, hi] with 1 <= lo <= hi",
        ),
        (
            ["experiment=digits_meanflow_guided", "solver.ep_cfg=true"],
            "solver.ep_cfg = True: must be false with model.guidance_conditioning=true",
        ),
    ],
)
def test_flow_map_settings_fail_with_one_line_naming_the_key(overrides, message):
    from config import ConfigError, load_config

    base = [] if any(o.startswith("experiment=") for o in overrides) else ["experiment=moons_meanflow"]
    torch.set_default_dtype(torch.float32)
    try:
        with pytest.raises(ConfigError) as error:
            load_config([*base, *overrides])
    finally:
        torch.set_default_dtype(torch.float64)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["flow.meanflow.guidance_scale=2.0"], "flow.meanflow.guidance_scale = 2.0 folds CFG into the target"),
        (
            ["flow.meanflow.guidance_condition=true", "+model.guidance_conditioning=true"],
            "flow.meanflow.guidance_condition = true folds CFG into the target, which needs a class-conditional",
        ),
    ],
)
def test_folded_guidance_needs_a_class_conditional_model(tmp_path, overrides, message):
    import runtime
    import trainer
    from config import ConfigError, load_config

    torch.set_default_dtype(torch.float32)
    try:
        cfg = load_config(["experiment=moons_meanflow", "training.p_uncond=0.1", *overrides])
        with pytest.raises(ConfigError, match=message) as error:
            trainer.Trainer(cfg, runtime.Runtime(device=torch.device("cpu")), tmp_path / "run")
    finally:
        torch.set_default_dtype(torch.float64)
    assert "\n" not in str(error.value)


def test_a_masked_dit_cannot_train_a_flow_map():
    from config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.mask_ratio = 0.5: must be 0 with flow.objective=meanflow"):
        load_config(
            [
                "experiment=imagenet256_latent_dit_smoke",
                "flow.objective=meanflow",
                "+model.interval_conditioning=true",
                "solver.method=flow_map",
            ]
        )


def test_guidance_folded_into_the_target_uses_the_null_branch_for_labelled_rows_only():
    """v_g = w v + (1 - w) u(z, t, t | null) (MeanFlow eq. 19, kappa = 0); a dropped label keeps v."""

    class Labelled(torch.nn.Module):  # u = 0 for the null label (3), else 5; no dependence on z, t, r
        def forward(self, z, t, y=None, r=None):
            return torch.where((y == 3)[:, None], 0.0, 5.0).expand_as(z)

    z, v = torch.randn(4, 2), torch.randn(4, 2)
    t = r = torch.full((4,), 0.3)
    y = torch.tensor([0, 1, 3, 2])
    target = objective(flow.make_path(), guidance_scale=2.5).target(Labelled(), z, v, t, r, y, 3)
    expected = 2.5 * v  # + (1 - 2.5) * 0 from the null branch
    expected[2] = v[2]
    torch.testing.assert_close(target, expected)


def test_guidance_folds_only_at_times_in_its_interval_the_ends_included():
    """With guidance_interval [0.2, 0.6], rows at t = 0.2 and 0.6 (closed ends) and 0.4 fold CFG in, rows at
    0.1 and 0.7 keep v, the flow map of a sampler that guides on that interval alone."""

    class Labelled(torch.nn.Module):  # u = 0 for the null label (3), else 5
        def forward(self, z, t, y=None, r=None):
            return torch.where((y == 3)[:, None], 0.0, 5.0).expand_as(z)

    z, v = torch.randn(5, 2), torch.randn(5, 2)
    t = r = torch.tensor([0.1, 0.2, 0.4, 0.6, 0.7])
    y = torch.zeros(5, dtype=torch.long)
    target = objective(flow.make_path(), guidance_scale=2.5, guidance_interval=(0.2, 0.6)).target(
        Labelled(), z, v, t, r, y, 3
    )
    expected = v.clone()
    expected[1:4] = 2.5 * v[1:4]
    torch.testing.assert_close(target, expected)
    whole = objective(flow.make_path(), guidance_scale=2.5).target(Labelled(), z, v, t, r, y, 3)
    torch.testing.assert_close(whole, 2.5 * v)  # the default [0, 1] folds at every t


@pytest.mark.parametrize("interval", [[0.5, 0.2], [-0.1, 0.5], [0.0, 1.5], [0.3]])
def test_a_fold_interval_outside_zero_one_is_refused_naming_the_key(interval):
    from config import ConfigError, load_config

    value = "[" + ",".join(str(x) for x in interval) + "]"
    with pytest.raises(ConfigError, match=r"flow\.meanflow\.guidance_interval.*0 <= t_lo <= t_hi <= 1"):
        load_config(["experiment=digits_meanflow", f"flow.meanflow.guidance_interval={value}"])


def guided_mlp():
    """A class-conditional flow map with a guidance embedding, every layer moved off its init except the
    guidance embedding's zero last layer: a real network that ignores w (as at init)."""
    from models import ClassCondMLP

    torch.manual_seed(0)
    model = ClassCondMLP(
        num_classes=3,
        dim=3,
        hidden_dim=16,
        num_blocks=1,
        time_freq_dim=8,
        interval_conditioning=True,
        guidance_conditioning=True,
    )
    for name, p in model.named_parameters():
        if not name.startswith("guidance_embed.mlp.2"):
            torch.nn.init.normal_(p, std=0.3)
    return model


@pytest.mark.parametrize("derivative, tangent", [("jvp", "conditional"), ("jvp", "model"), ("split", "conditional")])
def test_a_constant_drawn_guidance_scale_is_the_fixed_scale_objective_while_the_model_ignores_w(derivative, tangent):
    """guidance_range [w, w] on a model that ignores w: the same target and loss, bit for bit, as the
    fixed-scale fold at w; and the (t, r) draws are those of the run without it (w is drawn after them)."""
    model, path, scale = guided_mlp(), flow.make_path(), 2.25
    fixed = objective(path, guidance_scale=scale, derivative=derivative, tangent=tangent)
    drawn = objective(path, guidance_range=(scale, scale), derivative=derivative, tangent=tangent)
    g = torch.Generator().manual_seed(5)
    x1, eps, t0 = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g), torch.rand(16, generator=g)
    y = torch.tensor([0, 1, 2, 3] * 4)  # 3: the null label
    t, r, w_off = fixed.draw(t0, torch.Generator().manual_seed(1), 0)
    t_on, r_on, w = drawn.draw(t0, torch.Generator().manual_seed(1), 0)
    assert w_off is None and torch.equal(t_on, t) and torch.equal(r_on, r) and bool((r > t).any())
    assert torch.equal(w, torch.full_like(t, scale))
    r = torch.where(torch.arange(16) < 6, t, r)  # some r = t rows, where the split target is the folded v
    x_t, v = path.sample(x1, eps, t)
    target = fixed.target(model, x_t, v, t, r, y, 3)
    assert torch.equal(drawn.target(model, x_t, v, t, r, y, 3, torch.where(y == 3, 1.0, w)), target)
    unguided = objective(path, derivative=derivative, tangent=tangent)
    assert not torch.equal(unguided.target(model, x_t, v, t, r, y, 3), target)
    loss_fixed, per_fixed = fixed.loss(model, model, x1, eps, t, r, y, 3)
    loss_drawn, per_drawn = drawn.loss(model, model, x1, eps, t, r, y, 3, w=w)
    assert torch.equal(per_drawn, per_fixed) and torch.equal(loss_drawn, loss_fixed)


def test_per_sample_guidance_scales_fold_row_by_row_and_every_pass_gets_w():
    """v_g = w_i v_i + (1 - w_i) u(z, t, t | null) row by row (a hand computation on a model whose output
    is constant in z, t, r, so du/dt = 0 and the target is v_g); the unconditional branch is called
    without w (= 1), every other pass and the trained forward with the row's w, null-label rows at 1."""
    seen = []

    class Labelled(torch.nn.Module):  # u = -1 for the null label (3), else 5 + w; no dependence on z, t, r
        def forward(self, z, t, y=None, r=None, w=None):
            seen.append(None if w is None else w.clone())
            out = torch.where(y == 3, -1.0, 5.0 + (0.0 if w is None else w))
            return out[:, None].expand_as(z) + 0 * z

    z, v = torch.randn(4, 2), torch.randn(4, 2)
    t, r = torch.full((4,), 0.3), torch.tensor([0.3, 0.8, 0.5, 0.9])
    y = torch.tensor([0, 1, 3, 2])
    w = torch.tensor([1.0, 2.0, 1.0, 3.5])
    target = objective(flow.make_path(), guidance_range=(1.0, 4.0)).target(Labelled(), z, v, t, r, y, 3, w)
    for i in range(4):
        wi = float(w[i])
        expected = v[i] if i == 2 else wi * v[i] + (1 - wi) * -1.0
        torch.testing.assert_close(target[i], expected, rtol=1e-12, atol=1e-12)
    # the null branch first (every row, at w = 1), then the derivative's passes on the rows with r != t
    assert seen[0] is None and len(seen) > 1 and all(torch.equal(s, w[1:]) for s in seen[1:])
    # through loss(): a row with the null label is trained at w = 1 whatever was drawn
    seen.clear()
    drawn = torch.tensor([2.0, 2.5, 3.0, 1.5])
    objective(flow.make_path(), guidance_range=(1.0, 4.0)).loss(
        Labelled(), Labelled(), torch.randn(4, 2), torch.randn(4, 2), t, r, y, 3, w=drawn
    )
    trained_w = torch.tensor([2.0, 2.5, 1.0, 1.5])
    assert seen[0] is None and all(torch.equal(s, trained_w[1:]) for s in seen[1:-1])
    assert torch.equal(seen[-1], trained_w)  # the trained forward: every row


def test_guidance_scales_are_drawn_per_sample_in_the_range_after_the_interval_draws():
    drawn = objective(flow.make_path(), guidance_range=(1.0, 3.0))
    t0 = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    g_on, g_off = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t, r, w = drawn.draw(t0, g_on, 0)
    t_off, r_off, _ = objective(flow.make_path()).draw(t0, g_off, 0)
    assert torch.equal(t, t_off) and torch.equal(r, r_off)
    assert float(w.min()) >= 1.0 and float(w.max()) <= 3.0 and abs(float(w.mean()) - 2.0) < 0.05
    torch.testing.assert_close(w, 1.0 + 2.0 * torch.rand(4096, generator=g_off))  # the next draw of the stream


def test_the_loss_runs_under_bf16_autocast_through_dit_attention():
    from functools import partial

    import models_dit

    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        model = models_dit.ClassCondDiT(
            input_size=8,
            in_channels=3,
            patch_size=2,
            hidden_size=32,
            depth=2,
            num_heads=4,
            num_classes=5,
            interval_conditioning=True,
        )
        g = torch.Generator().manual_seed(8)
        x1, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
        t, r = torch.tensor([0.1, 0.3, 0.5, 0.7]), torch.tensor([0.9, 0.3, 1.0, 0.8])
        autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16)
        loss, _ = objective(flow.make_path()).loss(model, model, x1, eps, t, r, torch.tensor([0, 1, 5, 2]), 5, autocast)
        loss.backward()
        assert torch.isfinite(loss) and loss.dtype == torch.float32
        assert model.final_layer.linear.weight.grad.abs().sum() > 0
    finally:
        torch.set_default_dtype(torch.float64)


def test_inference_samples_a_flow_map_checkpoint_in_k_jumps_and_still_runs_its_ode(tmp_path):
    """The one sampler: a trained flow map through inference.py (build.load_run, sampling.generate) with
    solver=flow_map (the preset's default, 1 jump) or num_steps=2, and the many-step ODE on u(z, t, t)."""
    import numpy as np

    import inference
    from conftest import run_train

    torch.set_default_dtype(torch.float32)
    try:
        run_dir = tmp_path / "run"
        assert run_train(run_dir, "experiment=moons_meanflow", "training.max_steps=20", "training.batch_size=64") == 0
        outputs = {}
        for name, keys in {"one": [], "two": ["num_steps=2"], "ode": ["solver=heun", "num_steps=8"]}.items():
            out = tmp_path / name
            args = [f"checkpoint={run_dir}", f"out={out}", "num_samples=16", "seed=3", *keys]
            assert inference.main(args) == 0
            outputs[name] = np.load(out / "samples.npz")["points"]
            assert outputs[name].shape == (16, 2) and np.isfinite(outputs[name]).all()
        assert not np.allclose(outputs["one"], outputs["two"]) and not np.allclose(outputs["two"], outputs["ode"])
    finally:
        torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize("derivative", ["jvp", "finite_difference", "split"])
def test_the_derivative_passes_run_on_the_rows_with_r_not_t_alone(derivative):
    """Rows at r = t get v exactly and cost no pass; the other rows' targets equal a whole-batch evaluation
    (the formula written out on every row, whose r = t rows drop out through the factor r - t)."""
    model = small_mlp()
    t, r = times(16)
    g = torch.Generator().manual_seed(5)
    z, v = torch.randn(16, 3, generator=g), torch.randn(16, 3, generator=g)
    batches = []

    class Recording(torch.nn.Module):
        def forward(self, z, t, y=None, r=None):
            batches.append(z.shape[0])
            return model(z, t, y, r=r)

    target = objective(flow.make_path(), derivative=derivative, tangent="model").target(
        Recording(), z, v, t, r, None, None
    )
    assert batches and set(batches) == {8}  # times() puts 8 of the 16 rows at r = t
    assert torch.equal(target[:8], v[:8])

    def u(z_, t_, r_):
        return model(z_, t_, r=r_)

    with torch.no_grad():
        if derivative == "split":
            whole = flow_map.split_target(u, z, v, t, r)
        else:
            dz = model(z, t)
            dudt = (
                flow_map.total_derivative(u, z, t, r, dz)[1]
                if derivative == "jvp"
                else flow_map.finite_difference_derivative(u, z, t, r, dz, 1e-3)
            )
            whole = v + (r - t)[:, None] * dudt
    torch.testing.assert_close(target, whole, rtol=1e-12, atol=1e-12)
    batches.clear()
    assert torch.equal(objective(flow.make_path()).target(Recording(), z, v, t, t, None, None), v) and not batches


def test_the_split_target_is_the_average_velocity_of_the_composed_halves():
    """Interval splitting on the independent Gaussian flow: exact u gives exact u (r > t) and v (r = t)."""
    path = flow.make_path("condot")
    exact = GaussianFlow(torch.tensor([1.5, -0.5, 0.2]), 0.4, path.scheduler, "independent")
    t, r = times()
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(10))
    target = objective(path, derivative="split").target(exact, z, exact(z, t), t, r, None, None)
    torch.testing.assert_close(target, exact(z, t, r=r), rtol=1e-10, atol=1e-10)
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, z, t, y=None, r=None):
            calls.append(r)
            return exact(z, t, r=r)

    objective(path, derivative="split").target(Counting(), z, exact(z, t), t, r, None, None)
    assert len(calls) == 2  # two forwards, no derivative


def test_conversion_from_1000x_time_features_uses_the_split_target_which_the_fast_ripple_in_t_leaves_alone():
    """A velocity network with 1000x sinusoidal time features (every model's default, so every trained
    teacher's) varies fast in t: the JVP's du/dt multiplies that by about 1000 and its target drifts far
    from u, while interval splitting only evaluates the network. The conversion preset therefore splits."""
    from config import load_config

    path = flow.make_path("condot")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(512, 2, generator=g)
    t = torch.rand(512, generator=g) * 0.5
    r = t + 0.5
    drift = {}
    for scale in (1.0, 1000.0):
        torch.manual_seed(0)
        model = MLP(interval_conditioning=True, time_scale=scale)
        torch.nn.init.normal_(model.out[-1].weight, std=0.05)  # a nonzero field (the output starts at zero)
        v = model(z, t).detach()
        for derivative in ("jvp", "split"):
            target = objective(path, derivative=derivative, tangent="model").target(model, z, v, t, r, None, None)
            drift[scale, derivative] = ((target - v).norm(dim=1).mean() / v.norm(dim=1).mean()).item()
    assert drift[1000.0, "jvp"] > 10 and drift[1000.0, "split"] < 0.5  # measured: 28 and 0.13
    assert drift[1.0, "jvp"] < 0.5  # the same network at scale 1: 0.08
    torch.set_default_dtype(torch.float32)
    try:
        cfg = load_config(["experiment=moons_meanflow_convert", "training.init.checkpoint=runs/moons"])
    finally:
        torch.set_default_dtype(torch.float64)
    assert cfg.flow.meanflow.derivative == "split" and cfg.model.time_scale == 1000.0


def test_the_fashion_conversion_folds_the_teachers_own_guided_sampler():
    """fashion_meanflow_convert starts from a fashion_cfg run: it keeps that model's time features, splits
    (no JVP), and folds CFG at the teacher's sampling scale on the teacher's guidance interval, so the flow
    map learns the sampler the teacher runs."""
    from config import load_config

    torch.set_default_dtype(torch.float32)
    try:
        student = load_config(["experiment=fashion_meanflow_convert", "training.init.checkpoint=runs/fashion_cfg"])
        teacher = load_config(["experiment=fashion_cfg"])
    finally:
        torch.set_default_dtype(torch.float64)
    m = student.flow.meanflow
    assert m.derivative == "split" and student.model.time_scale == teacher.model.get("time_scale", 1000.0)
    assert m.guidance_scale == teacher.solver.guidance_scale
    assert list(m.guidance_interval) == list(teacher.solver.guidance_interval) != [0.0, 1.0]
    assert student.solver.method == "flow_map" and student.solver.guidance_scale == 1.0
