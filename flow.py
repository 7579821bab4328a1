"""Flow-matching maths: probability paths, prediction conversions, time samplers, loss weightings, loss.

Convention (README.md, "Conventions"): t = 0 is noise, t = 1 is data, and every path is affine,

    x_t = alpha(t) x1 + sigma(t) eps,    u_t = d_alpha(t) x1 + d_sigma(t) eps,

with eps ~ N(0, I) and u_t = dx_t/dt the conditional velocity: the affine conditional flows of the Flow
Matching guide (Lipman et al. 2024), which share this time direction. CondOT: alpha = t, sigma = 1 - t,
u = x1 - eps. Times are float tensors of shape [B], one per sample. Pure tensor maths: no models, data
or devices; outputs follow the inputs' device and (promoted) dtype.
"""

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTIONS = ("velocity", "data", "noise")


def _check_name(name: str, allowed, kind: str) -> None:
    """A ValueError listing the allowed names unless name is one of them."""
    if name not in allowed:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join(allowed)}")


def _require(condition: bool, owner: str, arg: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"{owner}: {arg}={value!r} is not allowed; {arg} must be {allowed}")


def expand_t(t: Tensor, x: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] with x.ndim dims, so per-sample times broadcast against x [B, ...]."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


# ----------------------------------------------------------------------------- schedulers


class Scheduler(ABC):
    """alpha(t), sigma(t) and their time derivatives; each maps a tensor t to a tensor of t's shape.

    All schedulers here have alpha rising from 0 to 1 and sigma falling from 1 to 0 on [0, 1].
    """

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def d_alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def d_sigma(self, t: Tensor) -> Tensor: ...

    def snr(self, t: Tensor) -> Tensor:
        """alpha^2 / sigma^2: 0 at t = 0, inf at t = 1."""
        return (self.alpha(t) / self.sigma(t)).square()


@dataclass(frozen=True)
class CondOTScheduler(Scheduler):
    """Conditional optimal transport (Lipman et al. 2023, with sigma_min = 0): alpha = t, sigma = 1 - t."""

    def alpha(self, t):
        return t

    def sigma(self, t):
        return 1 - t

    def d_alpha(self, t):
        return torch.ones_like(t)

    def d_sigma(self, t):
        return -torch.ones_like(t)


@dataclass(frozen=True)
class PolynomialScheduler(Scheduler):
    """alpha = t^n, sigma = 1 - t^n; n > 1 spends longer near noise, n = 1 is CondOT.

    For n < 1 the derivatives are infinite at t = 0.
    """

    n: float = 2.0

    def __post_init__(self):
        _require(self.n > 0, "PolynomialScheduler", "n", self.n, "> 0")

    def alpha(self, t):
        return t**self.n

    def sigma(self, t):
        return 1 - t**self.n

    def d_alpha(self, t):
        return self.n * t ** (self.n - 1)

    def d_sigma(self, t):
        return -self.n * t ** (self.n - 1)


@dataclass(frozen=True)
class CosineScheduler(Scheduler):
    """alpha = sin(pi t / 2), sigma = cos(pi t / 2): variance preserving, alpha^2 + sigma^2 = 1."""

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t):
        # cos(pi t / 2) written as sin(pi (1 - t) / 2), which is exactly 0 at t = 1 in floating point.
        return torch.sin(0.5 * math.pi * (1 - t))

    def d_alpha(self, t):
        return 0.5 * math.pi * self.sigma(t)

    def d_sigma(self, t):
        return -0.5 * math.pi * self.alpha(t)


@dataclass(frozen=True)
class LinearVPScheduler(Scheduler):
    """alpha = t, sigma = sqrt(1 - t^2): variance preserving with a linear signal coefficient."""

    def alpha(self, t):
        return t

    def sigma(self, t):
        return (1 - t**2).sqrt()

    def d_alpha(self, t):
        return torch.ones_like(t)

    def d_sigma(self, t):
        # -t / sqrt(1 - t^2) diverges at t = 1; flooring the radicand at machine eps keeps it finite.
        return -t / (1 - t**2).clamp_min(torch.finfo(t.dtype).eps).sqrt()


SCHEDULERS: dict[str, type[Scheduler]] = {
    "condot": CondOTScheduler,
    "polynomial": PolynomialScheduler,
    "cosine": CosineScheduler,
    "linear_vp": LinearVPScheduler,
}


# ----------------------------------------------------------------------------- path


class AffinePath:
    """The affine probability path of a scheduler, and conversions between what a network may predict."""

    def __init__(self, scheduler: Scheduler, denominator_min: float = 0.05):
        _require(denominator_min > 0, "AffinePath", "denominator_min", denominator_min, "> 0")
        self.scheduler = scheduler
        # Floor on sigma when dividing for a data prediction and on alpha for a noise prediction; JiT
        # (Li & He 2025, Alg. 1) clips 1 - t at 0.05 so x-prediction gives finite velocities near t = 1.
        self.denominator_min = denominator_min

    def __repr__(self):
        return f"AffinePath({self.scheduler!r}, denominator_min={self.denominator_min})"

    def target_velocity(self, x1: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """u_t = d_alpha x1 + d_sigma eps. x1, eps: [B, ...], t: [B] -> [B, ...]."""
        t = expand_t(t, x1)
        return self.scheduler.d_alpha(t) * x1 + self.scheduler.d_sigma(t) * eps

    def sample(self, x1: Tensor, eps: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, u_t) for data x1 and noise eps: [B, ...], t: [B]."""
        tb = expand_t(t, x1)
        x_t = self.scheduler.alpha(tb) * x1 + self.scheduler.sigma(tb) * eps
        return x_t, self.target_velocity(x1, eps, t)

    def _coefficients(self, prediction: str, t: Tensor):
        """(c1, c2) with prediction = c1 x1 + c2 eps on the path."""
        if prediction == "data":
            return 1.0, 0.0
        if prediction == "noise":
            return 0.0, 1.0
        return self.scheduler.d_alpha(t), self.scheduler.d_sigma(t)

    def convert(self, output: Tensor, x_t: Tensor, t: Tensor, src: str, dst: str) -> Tensor:
        """A prediction of kind src at (x_t, t) as kind dst. output, x_t: [B, ...], t: [B] -> [B, ...].

        x_t = (alpha, sigma) and each prediction = (p1, p2) are linear in (x1, eps) (see _coefficients).
        Cramer's rule on [x_t, output] = [[alpha, sigma], [p1, p2]] [x1, eps] and dst = q1 x1 + q2 eps give

            dst = ((q1 p2 - q2 p1) x_t + (q2 alpha - q1 sigma) output) / (alpha p2 - sigma p1),

        one formula for all six pairs. The denominator is -sigma for a data source, alpha for a noise
        source (each floored at denominator_min) and alpha d_sigma - sigma d_alpha for a velocity source,
        which vanishes only where the path stalls (polynomial n > 1 at t = 0). For CondOT, data ->
        velocity is JiT's (x1 - x_t) / max(1 - t, denominator_min).
        """
        _check_name(src, PREDICTIONS, "prediction")
        _check_name(dst, PREDICTIONS, "prediction")
        if src == dst:
            return output
        t = expand_t(t, x_t)
        alpha, sigma = self.scheduler.alpha(t), self.scheduler.sigma(t)
        p1, p2 = self._coefficients(src, t)
        q1, q2 = self._coefficients(dst, t)
        if src == "data":
            denominator = -sigma.clamp_min(self.denominator_min)
        elif src == "noise":
            denominator = alpha.clamp_min(self.denominator_min)
        else:
            denominator = alpha * p2 - sigma * p1
        return ((q1 * p2 - q2 * p1) * x_t + (q2 * alpha - q1 * sigma) * output) / denominator

    def to_velocity(self, output: Tensor, x_t: Tensor, t: Tensor, prediction: str) -> Tensor:
        """The velocity implied by a network output of kind prediction. [B, ...] -> [B, ...]."""
        return self.convert(output, x_t, t, src=prediction, dst="velocity")


def make_path(scheduler: str = "condot", denominator_min: float = 0.05, **scheduler_kwargs) -> AffinePath:
    """AffinePath(SCHEDULERS[scheduler](**scheduler_kwargs), denominator_min)."""
    _check_name(scheduler, SCHEDULERS, "scheduler")
    return AffinePath(SCHEDULERS[scheduler](**scheduler_kwargs), denominator_min)


# ----------------------------------------------------------------------------- time samplers


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Resolution shift t -> t / (t + shift (1 - t)), any shape; shift > 1 moves t towards noise.

    SD3 (Esser et al. 2024, eq. 23) writes it as shift s / (1 + (shift - 1) s) for s = 1 - t (s = 1 is
    noise there); substituting gives this form. In logit space it is logit(t) - log(shift), so log-SNR
    (= 2 logit t for CondOT) moves by -2 log(shift): the Simple Diffusion (Hoogeboom et al. 2023) / JiT
    rule with shift = resolution / base_resolution. Fixes 0 and 1.
    """
    _require(shift > 0, "shift_time", "shift", shift, "> 0")
    return t / (t + shift * (1 - t))


class TimeSampler(ABC):
    """Callable (batch_size, generator, device=None) -> t [B] float32 strictly inside (0, 1).

    Draws only from the given generator, on its device (torch refuses a CPU generator for a CUDA draw),
    so a resumed run replays exactly; device (default: the generator's) is where t goes.
    """

    @abstractmethod
    def draw(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """t [B] in [0, 1] on generator.device."""

    def __call__(self, batch_size: int, generator: torch.Generator, device=None) -> Tensor:
        t = self.draw(batch_size, generator)
        # Keep off the endpoints, where SNR and 1/sigma are infinite: a clamp into [eps, 1 - eps].
        eps = torch.finfo(t.dtype).eps
        return t.clamp(eps, 1 - eps).to(generator.device if device is None else device)


def _uniform(batch_size: int, generator: torch.Generator) -> Tensor:
    return torch.rand(batch_size, generator=generator, device=generator.device, dtype=torch.float32)


@dataclass(frozen=True)
class UniformTimeSampler(TimeSampler):
    """t ~ U(0, 1) (Lipman et al. 2023)."""

    def draw(self, batch_size, generator):
        return _uniform(batch_size, generator)


@dataclass(frozen=True)
class LogitNormalTimeSampler(TimeSampler):
    """t = shift_time(sigmoid(mean + std z), shift), z ~ N(0, 1); so logit(t) ~ N(mean - log(shift), std^2).

    SD3 (Esser et al. 2024, eq. 19) uses mean 0, std 1 in its own time s = 1 - t; since logit(1 - s) =
    -logit(s), a mean m there is -m here. JiT samples mean -0.8, std 0.8 (towards noise).
    """

    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0

    def __post_init__(self):
        _require(self.std > 0, "LogitNormalTimeSampler", "std", self.std, "> 0")
        _require(self.shift > 0, "LogitNormalTimeSampler", "shift", self.shift, "> 0")

    def draw(self, batch_size, generator):
        z = torch.randn(batch_size, generator=generator, device=generator.device, dtype=torch.float32)
        # The shift applied in logit space equals shift_time after the sigmoid, with one rounding less.
        return torch.sigmoid(self.mean - math.log(self.shift) + self.std * z)


@dataclass(frozen=True)
class StratifiedTimeSampler(TimeSampler):
    """One uniform draw in each of the B strata [i/B, (i+1)/B), in random order: a lower-variance U(0, 1)."""

    def draw(self, batch_size, generator):
        u = _uniform(batch_size, generator)
        stratum = torch.randperm(batch_size, generator=generator, device=generator.device)
        return (stratum + u) / batch_size


@dataclass(frozen=True)
class PowerTimeSampler(TimeSampler):
    """t = u^(1 / exponent), u ~ U(0, 1): CDF t^exponent, density exponent t^(exponent - 1) (Beta(exponent, 1)).

    exponent > 1 puts more mass near data (t = 1), < 1 near noise; 1 is uniform.
    """

    exponent: float = 1.0

    def __post_init__(self):
        _require(self.exponent > 0, "PowerTimeSampler", "exponent", self.exponent, "> 0")

    def draw(self, batch_size, generator):
        return _uniform(batch_size, generator) ** (1 / self.exponent)


@dataclass(frozen=True)
class DiscreteTimeSampler(TimeSampler):
    """t uniform on the num_steps grid times {0, 1/k, ..., (k-1)/k}: where a k-step uniform Euler sampler
    queries the model. On reflow pairs this is k-step distillation (Liu et al. 2022, arXiv 2209.03003,
    sec. 2.3); k = 1 is the one-step objective E ||(x1 - x0) - v(x0, 0)||^2."""

    num_steps: int = 1

    def __post_init__(self):
        _require(self.num_steps >= 1, "DiscreteTimeSampler", "num_steps", self.num_steps, ">= 1")

    def draw(self, batch_size, generator):
        j = torch.randint(0, self.num_steps, (batch_size,), generator=generator, device=generator.device)
        return j.float() / self.num_steps


TIME_SAMPLERS: dict[str, type[TimeSampler]] = {
    "uniform": UniformTimeSampler,
    "logit_normal": LogitNormalTimeSampler,
    "stratified": StratifiedTimeSampler,
    "power": PowerTimeSampler,
    "discrete": DiscreteTimeSampler,
}


# ----------------------------------------------------------------------------- loss weightings
# Callables (t [B], path) -> w [B] that multiply the per-sample velocity MSE.


@dataclass(frozen=True)
class UniformWeighting:
    """w = 1: the plain conditional flow-matching loss."""

    def __call__(self, t: Tensor, path: AffinePath) -> Tensor:
        return torch.ones_like(t)


@dataclass(frozen=True)
class SNRWeighting:
    """w = min(SNR(t), max_weight) on the velocity MSE; the cap keeps it finite as SNR -> inf at t = 1.

    The name says what w is, not what it multiplies: it weights the velocity error, which already equals
    (D / sigma)^2 times the data error, so it is not Min-SNR's data-error weighting (MinSNRWeighting)."""

    max_weight: float = 5.0

    def __post_init__(self):
        _require(self.max_weight > 0, "SNRWeighting", "max_weight", self.max_weight, "> 0")

    def __call__(self, t: Tensor, path: AffinePath) -> Tensor:
        return path.scheduler.snr(t).clamp(max=self.max_weight)


@dataclass(frozen=True)
class MinSNRWeighting:
    """Min-SNR-gamma (Hang et al. 2023): weight min(SNR(t), gamma) on the data error |x1_hat - x1|^2.

    At fixed x_t, u = (d_sigma x_t - D x1) / sigma with D = alpha d_sigma - sigma d_alpha (AffinePath.convert),
    so |u_hat - u|^2 = (D / sigma)^2 |x1_hat - x1|^2 and the weight on the velocity MSE is
    min(SNR, gamma) (sigma / D)^2; for CondOT min(SNR, gamma) (1 - t)^2. This is the same objective as
    Hang et al.'s eps-loss weight min(SNR, gamma) / SNR, written for a velocity loss.
    """

    gamma: float = 5.0

    def __post_init__(self):
        _require(self.gamma > 0, "MinSNRWeighting", "gamma", self.gamma, "> 0")

    def __call__(self, t: Tensor, path: AffinePath) -> Tensor:
        s = path.scheduler
        alpha, sigma = s.alpha(t), s.sigma(t)
        velocity_per_data = (alpha * s.d_sigma(t) - sigma * s.d_alpha(t)) / sigma
        return s.snr(t).clamp(max=self.gamma) / velocity_per_data.square()


@dataclass(frozen=True)
class EndpointWeighting:
    """w = 1 + strength (2t - 1)^2: 1 at t = 1/2, 1 + strength at both ends.

    A symmetric form of the 'endpoint emphasis' weights t^2 and (1 - t)^2 of flow-matching training guides
    (seed 003): both the noise end (coarse layout) and the data end (fine detail) get up-weighted.
    """

    strength: float = 1.0

    def __post_init__(self):
        _require(self.strength >= 0, "EndpointWeighting", "strength", self.strength, ">= 0")

    def __call__(self, t: Tensor, path: AffinePath) -> Tensor:
        return 1 + self.strength * (2 * t - 1).square()


LOSS_WEIGHTINGS: dict[str, type] = {
    "uniform": UniformWeighting,
    "snr": SNRWeighting,
    "min_snr": MinSNRWeighting,
    "endpoint": EndpointWeighting,
}


def make_time_sampler(name: str, **kwargs) -> TimeSampler:
    """TIME_SAMPLERS[name](**kwargs); a ValueError lists the allowed names."""
    _check_name(name, TIME_SAMPLERS, "time sampler")
    return TIME_SAMPLERS[name](**kwargs)


def make_loss_weighting(name: str, **kwargs):
    """LOSS_WEIGHTINGS[name](**kwargs); a ValueError lists the allowed names."""
    _check_name(name, LOSS_WEIGHTINGS, "loss weighting")
    return LOSS_WEIGHTINGS[name](**kwargs)


# ----------------------------------------------------------------------------- loss


def flow_matching_loss(
    path: AffinePath,
    model_output: Tensor,
    x1: Tensor,
    eps: Tensor,
    x_t: Tensor,
    t: Tensor,
    prediction: str = "velocity",
    weighting=None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Conditional flow-matching loss on velocity, whatever the network predicts.

    model_output, x1, eps, x_t: [B, ...]; t: [B]; mask: 0/1, broadcastable to x1 (e.g. [B, N, 1] for
    tokens [B, N, D]), 1 = the element counts. Returns (loss [], per_sample [B]), per_sample being
    the mean squared velocity error over the counted elements (0 if none) times weighting(t, path).
    Computed in float32 (or wider) whatever the output dtype.
    """
    dtype = torch.promote_types(model_output.dtype, torch.float32)
    model_output, x1, eps, x_t, t = (v.to(dtype) for v in (model_output, x1, eps, x_t, t))
    pred = path.to_velocity(model_output, x_t, t, prediction)
    # The target is the true quantity of the same kind pushed through the same conversion: u_t itself
    # wherever no denominator is clipped, while in the clipped region both sides share the clip (as in
    # JiT Alg. 1), so the loss is a fixed multiple of |x1_hat - x1|^2 and its minimiser stays the true x1.
    truth = {"velocity": path.target_velocity(x1, eps, t), "data": x1, "noise": eps}[prediction]
    sq_err = (pred - path.to_velocity(truth, x_t, t, prediction)).square()
    if mask is None:
        per_sample = sq_err.flatten(1).mean(1)
    else:
        # Multiplying by the mask gives masked elements exactly zero gradient; the count's floor of 1
        # makes a sample with nothing counted contribute 0 rather than 0/0.
        mask = mask.to(dtype).expand_as(sq_err)
        per_sample = (mask * sq_err).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    if weighting is not None:
        per_sample = per_sample * weighting(t, path)
    return per_sample.mean(), per_sample
