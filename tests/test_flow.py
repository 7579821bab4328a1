import itertools
import math

import pytest
import torch

import flow

SCHEDULERS = {
    "condot": flow.CondOTScheduler(),
    "poly_half": flow.PolynomialScheduler(0.5),
    "poly_2": flow.PolynomialScheduler(2.0),
    "poly_3": flow.PolynomialScheduler(3.0),
    "cosine": flow.CosineScheduler(),
    "linear_vp": flow.LinearVPScheduler(),
}
SCHEDULER_IDS = list(SCHEDULERS)
PAIRS = list(itertools.permutations(flow.PREDICTIONS, 2))
N_DRAWS = 200_000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _batch(scheduler, shape=(6, 3, 4, 4), t_range=(0.4, 0.8), dtype=torch.float64, seed=0):
    """(path, x1, eps, t) with t spread over t_range, where no scheduler here hits the 0.05 clip."""
    g = _gen(seed)
    x1 = torch.randn(shape, generator=g, dtype=dtype)
    eps = torch.randn(shape, generator=g, dtype=dtype)
    t = torch.linspace(*t_range, shape[0], dtype=dtype)
    return flow.AffinePath(scheduler), x1, eps, t


# ----------------------------------------------------------------------------- schedulers


@pytest.mark.parametrize("name", SCHEDULER_IDS)
def test_derivatives_match_autograd(name):
    s = SCHEDULERS[name]
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64, requires_grad=True)
    for value, derivative in ((s.alpha, s.d_alpha), (s.sigma, s.d_sigma)):
        (grad,) = torch.autograd.grad(value(t).sum(), t)
        torch.testing.assert_close(derivative(t.detach()), grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", SCHEDULER_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_values(name, dtype):
    s = SCHEDULERS[name]
    t = torch.tensor([0.0, 1.0], dtype=dtype)
    assert s.alpha(t).tolist() == [0.0, 1.0]
    assert s.sigma(t).tolist() == [1.0, 0.0]
    assert s.snr(t).tolist() == [0.0, math.inf]
    assert s.alpha(t).dtype == dtype


@pytest.mark.parametrize("name", ["cosine", "linear_vp"])
def test_variance_preserving(name):
    s, t = SCHEDULERS[name], torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(s.alpha(t) ** 2 + s.sigma(t) ** 2, torch.ones_like(t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_vp_derivative_finite_at_data_end(dtype):
    d_sigma = flow.LinearVPScheduler().d_sigma(torch.tensor([1.0], dtype=dtype))
    assert torch.isfinite(d_sigma).all() and d_sigma.item() < -1e3


@pytest.mark.parametrize(
    "make, arg",
    [
        (lambda: flow.PolynomialScheduler(n=0), "n"),
        (lambda: flow.PolynomialScheduler(n=-1.0), "n"),
        (lambda: flow.make_path("nope"), "scheduler"),
        (lambda: flow.make_path("condot", denominator_min=0.0), "denominator_min"),
        (lambda: flow.make_time_sampler("nope"), "time sampler"),
        (lambda: flow.make_time_sampler("logit_normal", std=0.0), "std"),
        (lambda: flow.make_time_sampler("logit_normal", shift=-2.0), "shift"),
        (lambda: flow.make_time_sampler("power", exponent=0.0), "exponent"),
        (lambda: flow.make_loss_weighting("nope"), "loss weighting"),
        (lambda: flow.make_loss_weighting("min_snr", gamma=0.0), "gamma"),
        (lambda: flow.make_loss_weighting("snr", max_weight=-1.0), "max_weight"),
        (lambda: flow.make_loss_weighting("endpoint", strength=-0.5), "strength"),
        (lambda: flow.shift_time(torch.rand(3), 0.0), "shift"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(make, arg):
    with pytest.raises(ValueError, match=arg):
        make()


def test_factories_and_registries():
    path = flow.make_path("polynomial", denominator_min=0.1, n=3.0)
    assert path.scheduler == flow.PolynomialScheduler(3.0) and path.denominator_min == 0.1
    assert set(flow.SCHEDULERS) == {"condot", "polynomial", "cosine", "linear_vp"}
    assert set(flow.TIME_SAMPLERS) == {"uniform", "logit_normal", "stratified", "power", "discrete"}
    assert set(flow.LOSS_WEIGHTINGS) == {"uniform", "snr", "min_snr", "endpoint"}
    assert flow.make_time_sampler("power", exponent=2.0) == flow.PowerTimeSampler(2.0)
    assert flow.make_loss_weighting("min_snr", gamma=3.0) == flow.MinSNRWeighting(3.0)
    with pytest.raises(ValueError, match="condot, polynomial, cosine, linear_vp"):
        flow.make_path("ot")


# ----------------------------------------------------------------------------- path


def test_expand_t():
    t, x = torch.arange(4.0), torch.zeros(4, 3, 5, 6)
    assert flow.expand_t(t, x).shape == (4, 1, 1, 1)
    assert flow.expand_t(t, torch.zeros(4)).shape == (4,)


@pytest.mark.parametrize("name", SCHEDULER_IDS)
def test_sample_endpoints_and_velocity_is_time_derivative(name):
    path, x1, eps, _ = _batch(SCHEDULERS[name])
    x_0, _ = path.sample(x1, eps, torch.zeros(6, dtype=torch.float64))
    x_1, _ = path.sample(x1, eps, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(x_0, eps, rtol=0, atol=1e-15)
    torch.testing.assert_close(x_1, x1, rtol=0, atol=1e-15)

    t, h = torch.linspace(0.05, 0.95, 6, dtype=torch.float64), 1e-6
    _, u = path.sample(x1, eps, t)
    x_plus, _ = path.sample(x1, eps, t + h)
    x_minus, _ = path.sample(x1, eps, t - h)
    torch.testing.assert_close(u, (x_plus - x_minus) / (2 * h), rtol=1e-6, atol=1e-6)


def test_condot_sample_is_interpolation():
    path, x1, eps, t = _batch(flow.CondOTScheduler())
    x_t, u = path.sample(x1, eps, t)
    tb = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, tb * x1 + (1 - tb) * eps)
    torch.testing.assert_close(u, x1 - eps)


@pytest.mark.parametrize("name", SCHEDULER_IDS)
@pytest.mark.parametrize("src, dst", PAIRS)
def test_conversions_of_the_truth_and_round_trip(name, src, dst):
    path, x1, eps, t = _batch(SCHEDULERS[name])
    x_t, u = path.sample(x1, eps, t)
    truth = {"velocity": u, "data": x1, "noise": eps}
    converted = path.convert(truth[src], x_t, t, src, dst)
    torch.testing.assert_close(converted, truth[dst])

    arbitrary = torch.randn(x1.shape, generator=_gen(1), dtype=x1.dtype)
    there = path.convert(arbitrary, x_t, t, src, dst)
    torch.testing.assert_close(path.convert(there, x_t, t, dst, src), arbitrary)


@pytest.mark.parametrize("prediction", flow.PREDICTIONS)
def test_to_velocity_and_identity_conversion(prediction):
    path, x1, eps, t = _batch(flow.CosineScheduler())
    x_t, u = path.sample(x1, eps, t)
    truth = {"velocity": u, "data": x1, "noise": eps}[prediction]
    torch.testing.assert_close(path.to_velocity(truth, x_t, t, prediction), u)
    assert path.convert(truth, x_t, t, prediction, prediction) is truth


def test_data_to_velocity_is_jit_formula_with_clip():
    path = flow.make_path("condot", denominator_min=0.05)
    t = torch.tensor([0.2, 0.9, 0.97, 1.0])
    x_t, x1_hat = torch.randn(4, 2, generator=_gen()), torch.randn(4, 2, generator=_gen(1))
    expected = (x1_hat - x_t) / (1 - t).clamp_min(0.05)[:, None]
    torch.testing.assert_close(path.to_velocity(x1_hat, x_t, t, "data"), expected)
    # and a noise prediction divides by t clipped the same way: u = (x_t - eps) / max(t, 0.05)
    t0 = torch.tensor([0.0, 0.01, 0.5, 1.0])
    expected = (x_t - x1_hat) / t0.clamp_min(0.05)[:, None]
    torch.testing.assert_close(path.to_velocity(x1_hat, x_t, t0, "noise"), expected)


@pytest.mark.parametrize("name", SCHEDULER_IDS)
@pytest.mark.parametrize("src", ["data", "noise"])
def test_conversions_finite_at_both_ends(name, src):
    path = flow.AffinePath(SCHEDULERS[name])
    t = torch.tensor([1e-7, 0.5, 1.0])
    out = path.convert(torch.randn(3, 4), torch.randn(3, 4), t, src, "velocity")
    assert torch.isfinite(out).all()


def test_unknown_prediction_raises():
    path, x1, eps, t = _batch(flow.CondOTScheduler())
    with pytest.raises(ValueError, match="prediction 'score'.*velocity, data, noise"):
        path.convert(x1, x1, t, "score", "velocity")
    with pytest.raises(ValueError, match="prediction 'eps'"):
        flow.flow_matching_loss(path, x1, x1, eps, x1, t, prediction="eps")


# ----------------------------------------------------------------------------- time samplers


def _ks_distance(samples, cdf):
    """sup |empirical CDF - cdf| for 1-D float64 samples."""
    x = samples.double().sort().values
    n = x.numel()
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    return torch.maximum((grid - cdf(x)).abs(), (grid - 1 / n - cdf(x)).abs()).max().item()


# Kolmogorov-Smirnov: sup-distance above 1.95 / sqrt(n) has probability < 0.1%.
KS_TOL = 1.95 / math.sqrt(N_DRAWS)


def test_uniform_sampler_distribution():
    t = flow.UniformTimeSampler()(N_DRAWS, _gen())
    assert _ks_distance(t, lambda x: x) < KS_TOL
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(torch.quantile(t[:100_000], q), q, rtol=0, atol=5e-3)


@pytest.mark.parametrize("mean, std, shift", [(0.0, 1.0, 1.0), (-0.8, 0.8, 1.0), (0.5, 1.5, 4.0)])
def test_logit_normal_sampler_distribution(mean, std, shift):
    t = flow.LogitNormalTimeSampler(mean, std, shift)(N_DRAWS, _gen()).double()
    logit = torch.log(t) - torch.log1p(-t)
    assert abs(logit.mean().item() - (mean - math.log(shift))) < 0.01
    assert abs(logit.std().item() - std) < 0.01
    normal = torch.distributions.Normal(mean - math.log(shift), std)
    assert _ks_distance(logit, normal.cdf) < KS_TOL


def test_logit_normal_shift_equals_shift_time():
    unshifted = flow.LogitNormalTimeSampler(0.3, 0.7)(1000, _gen(5))
    shifted = flow.LogitNormalTimeSampler(0.3, 0.7, shift=3.0)(1000, _gen(5))
    torch.testing.assert_close(shifted, flow.shift_time(unshifted, 3.0))


@pytest.mark.parametrize("exponent", [0.5, 1.0, 3.0])
def test_power_sampler_distribution(exponent):
    t = flow.PowerTimeSampler(exponent)(N_DRAWS, _gen())
    assert _ks_distance(t, lambda x: x**exponent) < KS_TOL
    assert abs(t.mean().item() - exponent / (exponent + 1)) < 3e-3


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_stratified_sampler_one_draw_per_stratum(batch_size):
    sampler = flow.StratifiedTimeSampler()
    g = _gen()
    for _ in range(20):
        t = sampler(batch_size, g)
        strata = (t * batch_size).floor().long()
        assert sorted(strata.tolist()) == list(range(batch_size))
    if batch_size == 64:
        assert not torch.equal(strata, torch.arange(64))  # randomly permuted, not in stratum order
    pooled = torch.cat([sampler(batch_size, g) for _ in range(N_DRAWS // batch_size // 20)])
    assert abs(pooled.mean().item() - 0.5) < 5e-3


SAMPLER_CASES = {
    "uniform": {},
    "logit_normal": {"mean": 0.5, "std": 20.0, "shift": 3.0},  # std 20 saturates the sigmoid
    "stratified": {},
    "power": {"exponent": 0.05},  # u^20 underflows towards 0
}


@pytest.mark.parametrize("name", list(SAMPLER_CASES))
def test_samplers_reproducible_open_interval_and_generator_only(name):
    sampler = flow.make_time_sampler(name, **SAMPLER_CASES[name])
    torch.manual_seed(1)
    a = sampler(10_000, _gen(123))
    torch.manual_seed(2)  # the global RNG must not matter
    b = sampler(10_000, _gen(123), device="cpu")
    c = sampler(10_000, _gen(124))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (10_000,) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert (a > 0).all() and (a < 1).all()


def test_shift_time():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(flow.shift_time(t, 1.0), t)
    torch.testing.assert_close(flow.shift_time(flow.shift_time(t, 3.0), 1 / 3.0), t)
    assert flow.shift_time(t, 3.0)[[0, -1]].tolist() == [0.0, 1.0]
    assert (flow.shift_time(t[1:-1], 2.0) < t[1:-1]).all()  # shift > 1 moves towards noise
    # SD3 eq. 23 in its own time s = 1 - t: s' = shift s / (1 + (shift - 1) s)
    s = 1 - t
    torch.testing.assert_close(1 - flow.shift_time(t, 2.5), 2.5 * s / (1 + 1.5 * s))
    inner = t[1:-1]
    logit = lambda x: torch.log(x) - torch.log1p(-x)
    torch.testing.assert_close(logit(flow.shift_time(inner, 4.0)), logit(inner) - math.log(4.0))


# ----------------------------------------------------------------------------- weightings

T_POINTS = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)


def test_weightings_against_hand_formulas_condot():
    path, t = flow.make_path("condot"), T_POINTS
    snr = (t / (1 - t)) ** 2
    cases = {
        flow.UniformWeighting(): torch.ones_like(t),
        flow.SNRWeighting(max_weight=5.0): snr.clamp(max=5.0),
        flow.MinSNRWeighting(gamma=5.0): torch.minimum(snr, torch.tensor(5.0)) * (1 - t) ** 2,
        flow.EndpointWeighting(strength=3.0): 1 + 3.0 * (2 * t - 1) ** 2,
    }
    for weighting, expected in cases.items():
        torch.testing.assert_close(weighting(t, path), expected.double())


def test_min_snr_linear_vp_and_endpoint_shape():
    path, t = flow.make_path("linear_vp"), T_POINTS
    expected = torch.minimum(t**2 / (1 - t**2), torch.tensor(2.0)) * (1 - t**2) ** 2
    torch.testing.assert_close(flow.MinSNRWeighting(gamma=2.0)(t, path), expected.double())
    w = flow.EndpointWeighting()(torch.tensor([0.0, 0.5, 1.0]), path)
    assert w.tolist() == [2.0, 1.0, 2.0]


@pytest.mark.parametrize("name", list(flow.LOSS_WEIGHTINGS))
@pytest.mark.parametrize("scheduler", SCHEDULER_IDS)
def test_weightings_finite_nonnegative(name, scheduler):
    path = flow.AffinePath(SCHEDULERS[scheduler])
    t = torch.tensor([1e-6, 0.3, 0.999999, 1.0])
    w = flow.make_loss_weighting(name)(t, path)
    assert w.shape == (4,) and torch.isfinite(w).all() and (w >= 0).all()


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("name", SCHEDULER_IDS)
@pytest.mark.parametrize("prediction", flow.PREDICTIONS)
def test_loss_zero_for_the_true_output(name, prediction):
    path, x1, eps, t = _batch(SCHEDULERS[name])
    x_t, u = path.sample(x1, eps, t)
    output = {"velocity": u, "data": x1, "noise": eps}[prediction]
    loss, per_sample = flow.flow_matching_loss(path, output, x1, eps, x_t, t, prediction)
    assert per_sample.shape == (6,)
    assert loss.item() < 1e-20 and per_sample.abs().max().item() < 1e-20


def test_loss_values_and_defaults():
    path, x1, eps, t = _batch(flow.CondOTScheduler())
    x_t, u = path.sample(x1, eps, t)
    output = u + 0.5
    loss, per_sample = flow.flow_matching_loss(path, output, x1, eps, x_t, t)
    torch.testing.assert_close(per_sample, torch.full((6,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(loss, torch.tensor(0.25, dtype=torch.float64))

    weighting = flow.EndpointWeighting(2.0)
    _, weighted = flow.flow_matching_loss(path, output, x1, eps, x_t, t, weighting=weighting)
    torch.testing.assert_close(weighted, per_sample * weighting(t, path))


def test_data_prediction_loss_is_jit_near_data_end():
    """Near t = 1 the data loss is |x1_hat - x1|^2 / max(1 - t, 0.05)^2, finite, zero at the truth."""
    path = flow.make_path("condot")
    t = torch.tensor([0.5, 0.96, 0.999, 1.0])
    x1, eps = torch.randn(4, 8, generator=_gen()), torch.randn(4, 8, generator=_gen(1))
    x_t, _ = path.sample(x1, eps, t)
    x1_hat = (x1 + 0.1 * torch.randn(4, 8, generator=_gen(2))).requires_grad_()
    _, per_sample = flow.flow_matching_loss(path, x1_hat, x1, eps, x_t, t, prediction="data")
    expected = ((x1_hat - x1) ** 2).mean(1) / (1 - t).clamp_min(0.05) ** 2
    torch.testing.assert_close(per_sample, expected)
    per_sample.sum().backward()
    assert torch.isfinite(x1_hat.grad).all()
    _, at_truth = flow.flow_matching_loss(path, x1, x1, eps, x_t, t, prediction="data")
    assert at_truth.abs().max().item() < 1e-10


def test_mask_hand_example_and_empty_row():
    path = flow.make_path("condot")
    t = torch.tensor([0.5, 0.5, 0.5])
    zeros = torch.zeros(3, 2, 2)
    output = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [2.0, 2.0]], [[5.0, 5.0], [5.0, 5.0]]])
    mask = torch.tensor([[[1.0], [0.0]], [[1.0], [1.0]], [[0.0], [0.0]]])  # [B, N, 1] over tokens [B, N, D]
    loss, per_sample = flow.flow_matching_loss(path, output, zeros, zeros, zeros, t, mask=mask)
    # sample 0: (1 + 4) / 2; sample 1: (1 + 1 + 4 + 4) / 4; sample 2: nothing counted -> 0
    torch.testing.assert_close(per_sample, torch.tensor([2.5, 2.5, 0.0]))
    torch.testing.assert_close(loss, torch.tensor(5.0 / 3))
    _, bool_mask = flow.flow_matching_loss(path, output, zeros, zeros, zeros, t, mask=mask.bool())
    torch.testing.assert_close(bool_mask, per_sample)


@pytest.mark.parametrize("prediction", flow.PREDICTIONS)
def test_mask_gradients_and_all_ones(prediction):
    path = flow.make_path("cosine")
    g = _gen()
    x1, eps = torch.randn(4, 5, 3, generator=g), torch.randn(4, 5, 3, generator=g)
    t = torch.tensor([0.02, 0.3, 0.7, 0.999])
    x_t, _ = path.sample(x1, eps, t)
    mask = (torch.rand(4, 5, 1, generator=g) > 0.5).float()
    mask[0] = 0.0
    mask[1, 0] = 1.0
    output = torch.randn(4, 5, 3, generator=g, requires_grad=True)

    loss, per_sample = flow.flow_matching_loss(path, output, x1, eps, x_t, t, prediction, mask=mask)
    loss.backward()
    masked = mask.expand_as(output) == 0
    assert (output.grad[masked] == 0).all()
    assert (output.grad[~masked] != 0).all()
    assert per_sample[0].item() == 0.0 and torch.isfinite(per_sample).all()

    weighting = flow.MinSNRWeighting()
    ones = torch.ones(4, 5, 1)
    with_ones = flow.flow_matching_loss(path, output, x1, eps, x_t, t, prediction, weighting, mask=ones)
    without = flow.flow_matching_loss(path, output, x1, eps, x_t, t, prediction, weighting)
    torch.testing.assert_close(with_ones, without)


def test_loss_computed_in_float32_for_bf16_output():
    path = flow.make_path("condot")
    x1, eps = torch.randn(2, 3, 4, 4, generator=_gen()), torch.randn(2, 3, 4, 4, generator=_gen(1))
    t = torch.tensor([0.3, 0.9])
    x_t, u = path.sample(x1, eps, t)
    output = u.bfloat16().requires_grad_()
    loss, per_sample = flow.flow_matching_loss(path, output, x1, eps, x_t, t, prediction="velocity")
    assert loss.dtype == per_sample.dtype == torch.float32
    expected = ((output.float() - u) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(per_sample, expected)
    loss.backward()
    assert output.grad.dtype == torch.bfloat16
