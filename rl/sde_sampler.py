"""SDE rollouts and per-transition Gaussian log-probs for Flow-GRPO (Liu et al. 2025, arXiv 2505.05470).

A rollout is T Euler-Maruyama steps of `FlowSampler.sde_step` (the SDE is derived once, there; CFG comes
from the shared `FlowSampler.velocity`), noise at t = 0 -> data at t = 1. Step k is an MDP transition
with state (x_k, t_k, y) and action x_{k+1} ~ pi(. | x_k) = N(mu_k, sigma_k^2 I) (Flow-GRPO eqs. 8-9 in our
time direction). `transition_log_prob` recomputes log pi(x_{k+1} | x_k) under the current parameters, with
grad, for any flattened batch of stored transitions, in one batched forward pass.

Log-prob reduction over the D = prod(x.shape[1:]) dimensions: "mean" (default) or "sum".
- "sum" is the true log-density. Its ratios rho = exp(logp_new - logp_old) multiply D per-dimension
  ratios: with D = 784 a mean shift of a few hundredths of sigma per dimension already moves log rho by
  O(1-10), so rho leaves [1 - eps, 1 + eps] at once and PPO clipping zeroes almost every gradient (or
  exp overflows).
- "mean" divides log pi by D: rho becomes the geometric mean of the per-dimension ratios, O(1) away from 1
  for the same per-dimension shift whatever the resolution, so one clip_eps works from 2-D moons to 784-D
  digits. The gradient is the true one divided by D (absorbed by the learning rate / advantage_scale);
  the optimum of the clipped objective moves, which Flow-GRPO accepts. It is what the reference code
  does: flow_grpo/diffusers_patch/sd3_sde_with_logprob.py (github.com/yifan123/flow_grpo) ends
  `sde_step_with_logprob` with `log_prob.mean(dim=tuple(range(1, log_prob.ndim)))`, "mean along all but
  batch dimension", and its KL term is likewise `.mean(dim=(1, 2, 3))` over dims (`rl.grpo.gaussian_kl`
  takes the same `reduce`; use one setting for both).

Noise: the initial noise comes from the caller; every injected step noise is drawn from `generator` (on
the noise's device) in step order, so equal (noise, generator state) give bitwise-equal rollouts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from flow import expand_t
from ode_solvers import time_grid
from sampling import FlowSampler, noise_prediction

LOG_PROB_REDUCTIONS = ("mean", "sum")
SAMPLERS = ("sde", "cps")


def cps_step(
    sampler: FlowSampler,
    x: Tensor,
    t: Tensor,
    t_next: Tensor,
    y: Tensor | None = None,
    noise_level: float = 0.7,
    *guidance,
    **guidance_kw,
) -> tuple[Tensor, Tensor]:
    """One coefficients-preserving step (CPS; Wang & Yu 2025, arXiv 2509.05952, as flow_grpo's
    sde_type="cps"), the same signature and returns as `FlowSampler.sde_step`: from the velocity's data and
    noise predictions (x1_hat, eps_hat) at t,
        x_next = alpha(t') x1_hat + sqrt(sigma(t')^2 - s^2) eps_hat + s z,   s = sigma(t') sin(a pi / 2),
    so the sample keeps the path's coefficients (alpha, sigma) at t' (DDIM with eta, Song et al. 2021): the
    injected noise replaces part of the predicted one instead of adding to it, which Euler-Maruyama's
    discretisation does. It keeps the coefficients, not the marginals: with a fixed fraction of fresh noise
    and the posterior-mean x1_hat the samples are under-dispersed, the more so the larger a (on a Gaussian,
    std 0.84x the data's at a = 0.7, 0.99x at a = 0.1, 200 steps; tests/test_sde_sampler.py).
    a = noise_level in (0, 1]. The step into t' = 1 (sigma = 0) is deterministic (s = 0). guidance:
    sde_step's guidance_scale, guidance_interval, ep_cfg, detach_uncond (by position or name), passed on to
    `FlowSampler.velocity` as sde_step does. Returns (mean [B, ...], std [B, 1, ..., 1])."""
    u = sampler.velocity(x, t, y, *guidance, **guidance_kw)
    x = x.to(u.dtype)
    t, t_next = (torch.as_tensor(v, device=x.device).to(u.dtype).expand(x.shape[0]) for v in (t, t_next))
    scheduler, path = sampler.path.scheduler, sampler.path
    eps_hat = noise_prediction(path, u, x, t)  # exact x / sigma where x is pure noise (alpha = 0)
    data_hat = path.convert(u, x, t, "velocity", "data")
    alpha_next, sigma_next = expand_t(scheduler.alpha(t_next), x), expand_t(scheduler.sigma(t_next), x)
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    mean = alpha_next * data_hat + (sigma_next.square() - std.square()).clamp_min(0).sqrt() * eps_hat
    return mean, std


def transition_step(sampler: FlowSampler, kind: str = "sde"):
    """The stochastic step of a rollout policy: FlowSampler.sde_step ("sde", Euler-Maruyama of the
    marginal-preserving SDE) or `cps_step` ("cps"), both (x, t, t_next, y, noise_level, guidance_scale,
    guidance_interval, ep_cfg, detach_uncond) -> (mean, std)."""
    if kind not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {kind!r}")
    return sampler.sde_step if kind == "sde" else functools.partial(cps_step, sampler)


@dataclass
class Rollout:
    """T stored SDE transitions of a batch of B samples (index [k, b] = step k of sample b)."""

    states: Tensor  # x_k, k = 0..T-1 [T, B, ...]
    next_states: Tensor  # x_{k+1} [T, B, ...]
    times: Tensor  # t_k [T]
    next_times: Tensor  # t_{k+1} [T]
    means: Tensor  # transition means mu_k [T, B, ...] float32
    stds: Tensor  # transition stds sigma_k [T, B, 1, ..., 1] float32
    log_probs: Tensor  # log pi(x_{k+1} | x_k) [T, B] float32, reduced as log_prob_reduce
    samples: Tensor  # x at t = 1 [B, ...] (= next_states[-1])
    labels: Tensor | None  # [B]

    @property
    def num_steps(self) -> int:
        return self.states.shape[0]

    def transitions(self, steps: Tensor | None = None) -> Transitions:
        """The transitions at step indices `steps` [K] (all T if None), flattened step-major to N = K * B
        rows: row k' * B + b is step steps[k'] of sample b (sample_index[row] = b, for gathering [B]
        advantages)."""
        if steps is None:
            steps = torch.arange(self.num_steps)
        steps = steps.to(self.states.device)
        batch, k = self.states.shape[1], steps.numel()

        def flat(v: Tensor) -> Tensor:
            return v[steps].flatten(0, 1)

        return Transitions(
            states=flat(self.states),
            next_states=flat(self.next_states),
            times=self.times[steps].repeat_interleave(batch),
            next_times=self.next_times[steps].repeat_interleave(batch),
            means=flat(self.means),
            stds=flat(self.stds),
            log_probs=flat(self.log_probs),
            labels=None if self.labels is None else self.labels.repeat(k),
            sample_index=torch.arange(batch, device=self.states.device).repeat(k),
        )


@dataclass
class Transitions:
    """A flat batch of N transitions (from `Rollout.transitions`): every field has N rows."""

    states: Tensor  # [N, ...]
    next_states: Tensor  # [N, ...]
    times: Tensor  # [N]
    next_times: Tensor  # [N]
    means: Tensor  # [N, ...]
    stds: Tensor  # [N, 1, ..., 1]
    log_probs: Tensor  # [N]
    labels: Tensor | None  # [N]
    sample_index: Tensor  # [N] long, the rollout sample b of each row


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduce: str = "mean") -> Tensor:
    """log N(x; mean, std^2 I) per sample, averaged or summed over all non-batch dims, in float32.
    x, mean [B, ...], std broadcastable to them (e.g. [B, 1, ..., 1]); std must be > 0 -> [B]."""
    if reduce not in LOG_PROB_REDUCTIONS:
        raise ValueError(f"reduce must be one of {LOG_PROB_REDUCTIONS}, got {reduce!r}")
    # float32 at least: in bf16 (x - mean)^2 / std^2 loses the small per-step differences that make rho.
    dtype = torch.promote_types(torch.promote_types(x.dtype, mean.dtype), torch.float32)
    x, mean, std = x.to(dtype), mean.to(dtype), std.to(dtype)
    log_density = -(x - mean).square() / (2 * std.square()) - std.log() - 0.5 * math.log(2 * math.pi)
    log_density = log_density.expand_as(x).flatten(1)
    return log_density.mean(1) if reduce == "mean" else log_density.sum(1)


def _check_noise_level(noise_level: float) -> None:
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 (a zero std has no log-density), got {noise_level}")


@torch.no_grad()
def sde_rollout(
    sampler: FlowSampler,
    noise: Tensor,
    labels: Tensor | None,
    num_steps: int,
    noise_level: float = 0.7,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    grid: str = "uniform",
    shift: float = 1.0,
    log_prob_reduce: str = "mean",
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    sde_steps: Tensor | None = None,
    kind: str = "sde",
) -> Rollout:
    """`num_steps` (T_rollout) `sde_step`s from noise [B, ...] at t = 0 to samples at t = 1 on
    `time_grid(num_steps, grid, shift)`, storing every transition and its log-prob under the sampling
    policy. Step noise comes from `generator` (on noise's device). CFG applies on `guidance_interval`
    (FlowSampler.velocity), so rollouts can follow the sampler a checkpoint is deployed with. The model
    should be in eval mode.

    sde_steps (windowed Flow-GRPO, `window_steps`): the step indices [K] that are SDE steps; the others are
    deterministic Euler ODE steps (the SDE step at noise level 0: std 0, no noise drawn), stored with log-prob
    0 and never to be trained. None: every step is an SDE step. kind: the stochastic step
    (`transition_step`); a step whose std is 0 everywhere (CPS into t = 1) is stored as an ODE step."""
    _check_noise_level(noise_level)
    dtype = torch.promote_types(noise.dtype, torch.float32)
    # Grid on the CPU in float64 (time_grid), then cast before moving: MPS has no float64.
    grid_times = time_grid(num_steps, grid, shift).to(dtype).to(noise.device)
    times, next_times = grid_times[:-1], grid_times[1:]
    x = noise.to(dtype)
    stochastic = set(range(num_steps)) if sde_steps is None else set(sde_steps.tolist())
    step = transition_step(sampler, kind)
    states, next_states, means, stds, log_probs = [], [], [], [], []
    for k, (t, t_next) in enumerate(zip(times, next_times)):
        mean = std = None
        if k in stochastic:
            mean, std = step(x, t, t_next, labels, noise_level, guidance_scale, guidance_interval)
        if k not in stochastic or (kind == "cps" and not bool((std > 0).any())):  # ODE (window), CPS's last
            if mean is None:
                mean, std = sampler.sde_step(x, t, t_next, labels, 0.0, guidance_scale, guidance_interval)
            x_next = mean
            log_probs.append(torch.zeros(x.shape[0], device=x.device, dtype=torch.float32))
            states.append(x)
            next_states.append(x_next)
            means.append(mean.float())
            stds.append(std.float())
            x = x_next
            continue
        x_next = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=mean.dtype)
        # The log-prob of the stored action (not of the drawn noise), so the recomputation in
        # transition_log_prob follows the same arithmetic.
        log_probs.append(gaussian_log_prob(x_next, mean, std, log_prob_reduce))
        states.append(x)
        next_states.append(x_next)
        means.append(mean.float())
        stds.append(std.float())
        x = x_next
    return Rollout(
        states=torch.stack(states),
        next_states=torch.stack(next_states),
        times=times,
        next_times=next_times,
        means=torch.stack(means),
        stds=torch.stack(stds),
        log_probs=torch.stack(log_probs),
        samples=x,
        labels=labels,
    )


def transition_log_prob(
    sampler: FlowSampler,
    states: Tensor,
    times: Tensor,
    next_times: Tensor,
    next_states: Tensor,
    labels: Tensor | None,
    noise_level: float = 0.7,
    guidance_scale: float = 1.0,
    log_prob_reduce: str = "mean",
    detach_uncond: bool = True,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    kind: str = "sde",
) -> tuple[Tensor, Tensor, Tensor]:
    """log pi_theta(next_states | states) under the sampler's current model, for a flat batch of N
    transitions: states, next_states [N, ...], times, next_times [N] (or 0-dim), labels [N] | None.
    One `sde_step` = one batched forward pass (2N rows with CFG). Differentiable when grad is enabled.
    detach_uncond (Flow-GRPO's train_sd3.py `compute_log_prob`): with CFG the gradient flows through the
    conditional branch only; False also trains the shared null-label model, with weight 1 - s (s = the
    guidance scale: -2 at s = 3). kind: the rollout's stochastic step (`transition_step`). Returns
    (log_probs [N] float32, means [N, ...], stds [N, 1, ..., 1])."""
    _check_noise_level(noise_level)
    mean, std = transition_step(sampler, kind)(
        states, times, next_times, labels, noise_level, guidance_scale, guidance_interval, detach_uncond=detach_uncond
    )
    # next_states are actions sampled earlier: constants here, the gradient flows through the mean only.
    return gaussian_log_prob(next_states.detach(), mean, std, log_prob_reduce), mean, std


TIMESTEP_SELECTIONS = ("first", "last", "random")


def select_timesteps(
    num_steps: int,
    num_train_steps: int | None,
    generator: torch.Generator | None = None,
    selection: str = "first",
) -> Tensor:
    """The transition indices in [0, num_steps) one update trains on, sorted -> [K] long.

    "first" (Flow-GRPO's train_sd3.py: `timestep_fraction` of the steps, in order): steps 0..K-1 with
    K = num_train_steps, None meaning num_steps - 1, so the final step into t = 1 is never trained
    (its transition std g(t) sqrt(dt) is the smallest, so its log-prob gradient is the largest, and it
    sets the pixels the reward reads). "random": K distinct steps drawn from all num_steps, the final
    one included (None or K = num_steps: all of them, without drawing). "last": the K steps just before
    the final one, T-1-K..T-2 (the low-noise end, where details rather than layout form). Draws only
    from `generator`."""
    device = generator.device if generator is not None else "cpu"
    if selection not in TIMESTEP_SELECTIONS:
        raise ValueError(f"selection must be one of {TIMESTEP_SELECTIONS}, got {selection!r}")
    if selection in ("first", "last"):
        most = max(1, num_steps - 1)
        count = most if num_train_steps is None else num_train_steps
        if not 1 <= count <= most:
            raise ValueError(
                f"num_train_steps must lie in [1, num_steps - 1 = {num_steps - 1}] for selection "
                f"{selection!r}, got {num_train_steps}"
            )
        return torch.arange(count, device=device) + (most - count if selection == "last" else 0)
    if num_train_steps is None or num_train_steps == num_steps:
        return torch.arange(num_steps, device=device)
    if not 1 <= num_train_steps <= num_steps:
        raise ValueError(f"num_train_steps must lie in [1, num_steps={num_steps}], got {num_train_steps}")
    return torch.randperm(num_steps, generator=generator, device=device)[:num_train_steps].sort().values


WINDOW_MODES = ("fixed", "sliding")


def window_steps(
    num_steps: int, size: int, mode: str = "fixed", start: int = 0, stride: int = 1, every: int = 1, iteration: int = 0
) -> Tensor:
    """Windowed Flow-GRPO (Flow-GRPO-Fast's fixed window; MixGRPO's sliding one, Li et al. 2025, arXiv
    2507.21802): the `size` consecutive step indices [size] of a rollout of num_steps that are SDE steps and
    trained; the rest are ODE steps. Windows lie in [0, num_steps - 1): the final step into t = 1 is never
    trained (as select_timesteps' "first"). "fixed": start..start+size-1. "sliding": the start moves by
    `stride` every `every` iterations and wraps around the num_steps - size possible positions."""
    if mode not in WINDOW_MODES:
        raise ValueError(f"mode must be one of {WINDOW_MODES}, got {mode!r}")
    positions = num_steps - size  # starts 0 .. num_steps - 1 - size keep the window off the final step
    if size < 1 or positions < 1 or not 0 <= start < positions:
        raise ValueError(
            f"a window of size {size} starting at {start} does not fit a rollout of {num_steps} steps without "
            f"its final step (size in [1, {num_steps - 1}], start in [0, {num_steps - 1 - size}])"
        )
    if mode == "sliding":
        start = (start + (iteration // every) * stride) % positions
    return torch.arange(start, start + size)
