"""Sampling from a flow model: the one sampler behind training-time sample grids, `inference.py`,
evaluation and Flow-GRPO rollouts.

`FlowSampler` turns (model, path, prediction) into a velocity field with classifier-free guidance, and
integrates it three ways, all in our convention (t = 0 noise, t = 1 data):

- `sample`: the probability-flow ODE, noise -> data, with any solver in `ode_solvers`, or, for a flow-map
  model (flow_map.py), `solver="flow_map"`: num_steps jumps z_r = z_t + (r - t) u(z_t, r, t) on the grid;
- `sde_step` / `sample_sde`: Euler-Maruyama steps of an SDE with the same marginals (Flow-GRPO rollouts);
- `log_likelihood`: the ODE backwards, data -> noise, with the divergence of the velocity (bits/dim).

`generate` draws N samples with a run's solver settings; `straightness` / `measure_straightness` score how
straight the ODE paths are (Liu et al. 2022). This module imports only flow, ode_solvers
and torch. Models are called as model(x [B, ...], t [B], y [B] | None), a flow map also with r=[B] by
solver="flow_map"; callers put them in eval mode.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn

from flow import PREDICTIONS, AffinePath, expand_t
from ode_solvers import FLOW_MAP, CountCalls, ODESolution, solve, solve_flow_map, time_grid

# On the CPU a smaller batch keeps the activations in cache: fashion_cfg's U-Net (32 Heun steps, CFG)
# samples about 2x faster at 64-128 images per batch than at 512-1024 (docs/benchmarks.md).
CPU_SAMPLE_BATCH = 128


class NonFiniteSamplesError(RuntimeError):
    """Sampling produced NaN or inf; the message names the sample, the first solver step that went
    non-finite and the settings. Entry points refuse to write such samples."""


# Below this many dimensions the likelihood uses the exact divergence (one backward pass per dimension);
# above it, Hutchinson's estimator.
EXACT_DIVERGENCE_MAX_DIM = 16


def _per_sample_norm(v: Tensor) -> Tensor:
    """L2 norm over all but the batch dim, shaped to broadcast: [B, ...] -> [B, 1, ..., 1]."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1).reshape(-1, *[1] * (v.dim() - 1))


def _divergence_exact(u: Tensor, x: Tensor) -> Tensor:
    """tr(du/dx) per sample. u [B, D] computed from x [B, ...] (samples independent) -> [B].

    Summing u[:, i] over the batch before differentiating gives every sample's d u_i / d x_i in one pass."""
    div = torch.zeros(u.shape[0], device=u.device, dtype=u.dtype)
    for i in range(u.shape[1]):
        (grad,) = torch.autograd.grad(u[:, i].sum(), x, retain_graph=True)
        div = div + grad.flatten(1)[:, i]
    return div


def _divergence_hutchinson(u: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson's estimate tr(J) ~ mean_k v_k^T J v_k (FFJORD, Grathwohl et al. 2019, eq. 7), each
    v_k^T J from one vector-Jacobian product. u [B, D] from x [B, ...], probes [K, B, D] -> [B]."""
    total = torch.zeros(u.shape[0], device=u.device, dtype=u.dtype)
    for v in probes:
        (v_jacobian,) = torch.autograd.grad(u, x, grad_outputs=v, retain_graph=True)
        total = total + (v_jacobian.flatten(1) * v).sum(1)
    return total / probes.shape[0]


def _guided_rows(t: Tensor, guidance_interval: tuple[float, float]) -> Tensor | None:
    """Indices [G] of the samples whose t [B] lies in the closed guidance interval (t_lo, t_hi); None when a
    narrowed interval holds none of them (one host sync). The full interval [0, 1] needs no mask or sync."""
    t_lo, t_hi = guidance_interval
    if not 0.0 <= t_lo <= t_hi <= 1.0:
        raise ValueError(f"guidance_interval must be (t_lo, t_hi), 0 <= t_lo <= t_hi <= 1; got {guidance_interval}")
    if t_lo == 0.0 and t_hi == 1.0:
        return torch.arange(t.shape[0], device=t.device)  # every t in [0, 1]: no mask, no host sync
    guided = ((t >= t_lo) & (t <= t_hi)).nonzero().squeeze(1)
    return guided if guided.numel() else None


def _rademacher_probes(num_probes: int, batch: int, dim: int, generator, device, dtype) -> Tensor:
    """Hutchinson's probe vectors, +-1 with equal odds: [num_probes, B, D], drawn from `generator` on `device`."""
    if num_probes < 1:
        raise ValueError(f"hutchinson_samples must be >= 1, got {num_probes}")
    bits = torch.randint(0, 2, (num_probes, batch, dim), generator=generator, device=device)
    return (2 * bits - 1).to(dtype)


def _velocity_and_divergence(sampler, shape, y, guidance_scale: float, probes, state: Tensor, t: Tensor) -> Tensor:
    """`FlowSampler.log_likelihood`'s augmented field: state [B, D + 1] = [x flattened, int div u] at t ->
    [u(x, t), div u(x, t)] [B, D + 1], x of `shape` [B, ...]. probes [K, B, D]: Hutchinson's estimate of the
    divergence; None: the exact divergence."""
    dim = state.shape[1] - 1
    with torch.enable_grad():
        x = state[:, :dim].reshape(shape).detach().requires_grad_(True)
        u = sampler.velocity(x, t, y, guidance_scale).flatten(1)
        div = _divergence_exact(u, x) if probes is None else _divergence_hutchinson(u, x, probes)
    return torch.cat([u.detach(), div.detach()[:, None]], dim=1)


def noise_prediction(path: AffinePath, u: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """The noise prediction eps_hat = E[eps | x_t] [B, ...] from the velocity u [B, ...] at x [B, ...], t [B].

    Where alpha(t) = 0 (t = 0 on every path in flow.py) x_t is pure noise, so eps_hat = x / sigma exactly;
    the velocity -> noise conversion is used only for t > 0, where its denominator alpha d_sigma - sigma
    d_alpha is nonzero (at t = 0 it is 0 for polynomial n > 1 and infinite for n < 1, which gave NaN)."""
    scheduler = path.scheduler
    # At alpha = 0 the conversion is 0/0-prone; evaluate it at a harmless t there and select x / sigma,
    # so neither the value nor its gradient sees a NaN.
    at_noise = scheduler.alpha(t) == 0
    converted = path.convert(u, x, torch.where(at_noise, torch.full_like(t, 0.5), t), "velocity", "noise")
    return torch.where(expand_t(at_noise, x), x / expand_t(scheduler.sigma(t), x), converted)


class FlowSampler:
    """A model that predicts `prediction` on `path`, seen as a velocity field.

    Class-conditional models (num_classes set) use label `num_classes` as the learned null label for CFG.
    """

    def __init__(self, model: nn.Module, path: AffinePath, prediction: str = "velocity", num_classes=None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {prediction!r}")
        self.model = model
        self.path = path
        self.prediction = prediction
        self.num_classes = num_classes

    def _model_velocity(
        self, x: Tensor, t: Tensor, y: Tensor | None, r: Tensor | None = None, w: Tensor | None = None
    ) -> Tensor:
        """One forward pass, converted to velocity in float32 (or wider). x [B, ...], t [B] -> [B, ...].
        r [B]: a flow map's target time; the output is then the average velocity over [t, r]. w [B]: the
        guidance scale a guidance-conditioned model is asked for (None: not passed, i.e. 1)."""
        condition = {} if w is None else {"w": w}
        if r is not None:
            if self.prediction != "velocity":
                raise ValueError(
                    f"a flow map predicts an average velocity; this sampler's prediction is {self.prediction!r}"
                )
            output = self.model(x, t, y, r=r, **condition)
            return output.to(torch.promote_types(output.dtype, torch.float32))
        output = self.model(x, t, y, **condition)
        dtype = torch.promote_types(output.dtype, torch.float32)
        return self.path.to_velocity(output.to(dtype), x.to(dtype), t.to(dtype), self.prediction)

    def velocity(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        ep_cfg: bool = False,
        detach_uncond: bool = False,
        r: Tensor | None = None,
    ) -> Tensor:
        """Guided velocity [B, ...] in float32 (or wider) at x [B, ...], t (0-dim or [B]), labels y [B];
        with r (0-dim or [B]) a flow map's guided average velocity over [t, r].

        CFG (Ho & Salimans 2022) u = u_uncond + s (u_cond - u_uncond), applied only where
        t_lo <= t <= t_hi (guidance interval, Kynkaanniemi et al. 2024; closed at both ends, so a solver
        step evaluated exactly at t_lo or t_hi is guided) and always in a single forward
        pass: the batch is [x; x[guided]] with labels [y; null], so an unguided call costs B rows, a
        fully guided one 2B. The interval is checked per sample; a narrowed interval costs one host sync.
        ep_cfg (EP-CFG, Zhang et al. 2024, arXiv 2412.09966) rescales each guided velocity to the L2 norm
        of its conditional velocity, which curbs the over-saturation of large scales. detach_uncond makes
        the unconditional branch a constant for autograd (Flow-GRPO's log-prob: only the conditional
        branch is trained; otherwise the shared null-label model is trained with weight 1 - s).
        A model built with guidance_conditioning (flow_map.py, guidance as a model condition) takes the scale
        as an input instead: one forward of B rows, w = s inside the interval and 1 outside (no ep_cfg).
        """
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device).to(torch.promote_types(x.dtype, torch.float32))
        t = t.expand(batch).contiguous()
        if r is not None:
            r = torch.as_tensor(r, device=x.device).to(t.dtype).expand(batch).contiguous()
        if guidance_scale == 1.0:
            return self._model_velocity(x, t, y, r)
        if y is None or self.num_classes is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs labels y and num_classes (the null label index); "
                f"got y={'None' if y is None else 'given'}, num_classes={self.num_classes}"
            )
        guided = _guided_rows(t, guidance_interval)
        if getattr(self.model, "guidance_conditioning", False):
            if ep_cfg:
                raise ValueError(
                    "ep_cfg rescales to the conditional branch, which a guidance-conditioned model "
                    "(guidance_conditioning) does not compute: sample it with ep_cfg off"
                )
            w = torch.ones_like(t)
            return self._model_velocity(x, t, y, r, w if guided is None else w.index_fill(0, guided, guidance_scale))
        if guided is None:
            return self._model_velocity(x, t, y, r)
        null = torch.full_like(y[guided], self.num_classes)
        r_both = None if r is None else torch.cat([r, r[guided]])
        u = self._model_velocity(torch.cat([x, x[guided]]), torch.cat([t, t[guided]]), torch.cat([y, null]), r_both)
        u_cond, u_uncond = u[:batch], u[batch:]
        if detach_uncond:
            u_uncond = u_uncond.detach()
        u_guided = u_uncond + guidance_scale * (u_cond[guided] - u_uncond)
        if ep_cfg:
            energy_ratio = _per_sample_norm(u_cond[guided]) / _per_sample_norm(u_guided).clamp_min(1e-12)
            u_guided = u_guided * energy_ratio
        return u_cond.index_copy(0, guided, u_guided)

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        y: Tensor | None = None,
        solver: str = "heun",
        num_steps: int = 32,
        grid: str = "uniform",
        shift: float = 1.0,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        ep_cfg: bool = False,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        return_trajectory: bool = False,
    ) -> ODESolution:
        """Integrate the ODE from noise [B, ...] at t = 0 to samples at t = 1 (`ode_solvers.solve`), or with
        solver="flow_map" jump along the same grid with a flow-map model (`ode_solvers.solve_flow_map`).
        NFE in the result equals the number of model forward passes (guided: CFG batches count once)."""
        if solver == FLOW_MAP:
            if getattr(self.model, "interval_conditioning", None) is False:
                raise ValueError(
                    f"solver={FLOW_MAP!r} needs a flow-map model (interval_conditioning); "
                    f"{type(self.model).__name__} has none: use an ODE solver"
                )
            dtype = torch.promote_types(noise.dtype, torch.float32)

            def average_velocity(x, t, t_next):
                return self.velocity(x, t, y, guidance_scale, guidance_interval, ep_cfg, r=t_next)

            times = time_grid(num_steps, grid, shift, device=noise.device).to(dtype)
            return solve_flow_map(average_velocity, noise.to(dtype), times, return_trajectory)
        velocity_fn = partial(
            self.velocity,
            y=y,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            ep_cfg=ep_cfg,
        )
        return solve(
            velocity_fn,
            noise,
            solver,
            num_steps,
            grid,
            shift,
            rtol,
            atol,
            return_trajectory=return_trajectory,
        )

    def sde_step(
        self,
        x: Tensor,
        t: Tensor,
        t_next: Tensor,
        y: Tensor | None = None,
        noise_level: float = 0.7,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        ep_cfg: bool = False,
        detach_uncond: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """One Euler-Maruyama step from t to t_next > t (0-dim or [B]) of an SDE whose marginals are the
        ODE's. Returns (mean [B, ...], std [B, 1, ..., 1]): x_next ~ N(mean, std^2 I), a Gaussian policy
        for GRPO. Differentiable in the model's parameters when called with grad enabled.

        Any diffusion g(t) keeps the marginals p_t if the drift gains g^2/2 times the score (Fokker-Planck):
            dx = [u(x, t) + g(t)^2 / 2 * grad log p_t(x)] dt + g(t) dW.
        The score comes from the velocity: grad log p_t(x) = -eps_hat / sigma(t) (Tweedie), with eps_hat
        = E[eps | x_t] the velocity converted to a noise prediction (x - t u for CondOT). Flow-GRPO (Liu
        et al. 2025, arXiv 2505.05470, eqs. 8-9) writes this with s = 1 - t, noise at s = 1, integrating
        s downwards: sigma_s = a sqrt(s / (1 - s)) and drift v + sigma_s^2 / (2 s) (x + (1 - s) v).
        Substituting s = 1 - t, v = -u, ds = -dt gives the equation above with g(t) = a sqrt((1 - t) / t)
        = a sqrt(sigma / alpha); we use a sqrt(sigma(t) / alpha(t)) for every affine path.

        g is infinite at t = 0 (alpha = 0); like Flow-GRPO at its s = 1 endpoint, it is then evaluated at
        the next grid time. Nothing is evaluated at t_next, so the last step into t = 1 (sigma = 0) is
        finite; its std, g(t) sqrt(dt), vanishes as the grid is refined. eps_hat: `noise_prediction`.
        """
        u = self.velocity(x, t, y, guidance_scale, guidance_interval, ep_cfg, detach_uncond)
        x = x.to(u.dtype)
        t, t_next = (torch.as_tensor(v, device=x.device).to(u.dtype).expand(x.shape[0]) for v in (t, t_next))
        scheduler = self.path.scheduler
        t_g = torch.where(t > 0, t, t_next)
        g_squared = noise_level**2 * scheduler.sigma(t_g) / scheduler.alpha(t_g)
        sigma = expand_t(scheduler.sigma(t), x)
        score = -noise_prediction(self.path, u, x, t) / sigma
        drift = u + 0.5 * expand_t(g_squared, x) * score
        dt = t_next - t
        return x + expand_t(dt, x) * drift, expand_t((g_squared * dt).sqrt(), x)

    @torch.no_grad()
    def sample_sde(
        self,
        noise: Tensor,
        y: Tensor | None = None,
        num_steps: int = 100,
        noise_level: float = 0.7,
        generator: torch.Generator | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        ep_cfg: bool = False,
        grid: str = "uniform",
        shift: float = 1.0,
    ) -> Tensor:
        """Samples [B, ...] from noise [B, ...] by `num_steps` `sde_step`s on `time_grid(num_steps, grid,
        shift)`; the injected noise comes from `generator` (on noise's device)."""
        dtype = torch.promote_types(noise.dtype, torch.float32)
        times = time_grid(num_steps, grid, shift, device=noise.device).to(dtype)
        x = noise.to(dtype)
        for t, t_next in zip(times[:-1], times[1:]):
            mean, std = self.sde_step(x, t, t_next, y, noise_level, guidance_scale, guidance_interval, ep_cfg)
            x = mean + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x

    @torch.no_grad()
    def log_likelihood(
        self,
        x1: Tensor,
        y: Tensor | None = None,
        num_steps: int = 64,
        solver: str = "rk4",
        exact_divergence: bool | None = None,
        hutchinson_samples: int = 1,
        generator: torch.Generator | None = None,
        guidance_scale: float = 1.0,
        rtol: float = 1e-5,
        atol: float = 1e-5,
    ) -> Tensor:
        """Negative log-likelihood of data x1 [B, ...] in bits per dimension [B], -log p_1(x1) / (D ln 2).

        Instantaneous change of variables (Chen et al. 2018, thm. 1; FFJORD, Grathwohl et al. 2019):
        log p_1(x1) = log N(x0; 0, I) - int_0^1 div u(x_t, t) dt, with x0 the ODE solution from x1 at
        t = 1 back to t = 0. The state [x, int_1^t div u] is integrated by `solver` ("dopri5" adapts with
        rtol/atol; others use num_steps uniform steps). The divergence is exact for D <=
        EXACT_DIVERGENCE_MAX_DIM (or exact_divergence=True), else Hutchinson's estimate with
        `hutchinson_samples` Rademacher probes drawn once from `generator` (on x1's device), so the ODE
        stays deterministic for adaptive solvers. For discrete data (images) add dequantisation yourself.
        """
        batch, dim = x1.shape[0], x1[0].numel()
        exact = dim <= EXACT_DIVERGENCE_MAX_DIM if exact_divergence is None else exact_divergence
        dtype = torch.promote_types(x1.dtype, torch.float32)
        probes = None if exact else _rademacher_probes(hutchinson_samples, batch, dim, generator, x1.device, dtype)
        field = partial(_velocity_and_divergence, self, x1.shape, y, guidance_scale, probes)
        state1 = torch.cat([x1.flatten(1).to(dtype), x1.new_zeros(batch, 1, dtype=dtype)], dim=1)
        state0 = solve(field, state1, solver, num_steps, rtol=rtol, atol=atol, t_start=1.0, t_end=0.0).x
        x0, div_integral = state0[:, :dim], state0[:, dim]
        # div_integral = int_1^0 div u dt = -int_0^1 div u dt.
        log_p0 = -0.5 * (x0.square().sum(1) + dim * math.log(2 * math.pi))
        return -(log_p0 + div_integral) / (dim * math.log(2))


def sample_kwargs(solver_cfg) -> dict:
    """A run's solver settings (method, num_steps, grid, shift, guidance_*, ep_cfg, rtol, atol) as
    `FlowSampler.sample` keyword arguments."""
    return dict(
        solver=solver_cfg.method,
        num_steps=solver_cfg.num_steps,
        grid=solver_cfg.grid,
        shift=solver_cfg.shift,
        guidance_scale=solver_cfg.guidance_scale,
        guidance_interval=tuple(solver_cfg.guidance_interval),
        ep_cfg=solver_cfg.ep_cfg,
        rtol=solver_cfg.rtol,
        atol=solver_cfg.atol,
    )


@torch.no_grad()
def generate(
    sampler: FlowSampler,
    solver_cfg,
    sample_shape: tuple[int, ...],
    num_samples: int,
    seed: int = 0,
    device="cpu",
    batch_size: int | None = None,
    labels: Tensor | None = None,
    progress=None,
) -> tuple[Tensor, Tensor | None]:
    """Draw samples with the ODE solver settings in solver_cfg (method, num_steps, grid, shift,
    guidance_scale, guidance_interval, ep_cfg).

    Conditional models get num_samples split evenly over the classes (class-major order) unless
    `labels` is given; with fewer samples than classes (ImageNet), one each of evenly spaced classes.
    The noise is drawn on the CPU from `seed`, so the same seed gives the same samples on every device.
    batch_size (images per forward; CFG doubles the rows): default 1024 on an accelerator, CPU_SAMPLE_BATCH
    on the CPU. progress: called with each batch's size (a tqdm bar's update).
    Returns (samples [N, *sample_shape] float32, labels [N] or None).
    """
    if batch_size is None:
        batch_size = CPU_SAMPLE_BATCH if torch.device(device).type == "cpu" else 1024
    noise, labels = _noise_and_labels(sampler, sample_shape, num_samples, seed, labels)
    total = len(noise)
    settings = sample_kwargs(solver_cfg)
    chunks = []
    for start in range(0, total, batch_size):
        y = labels[start : start + batch_size].to(device) if labels is not None else None
        x = sampler.sample(noise[start : start + batch_size].to(device), y, **settings).x
        finite = torch.isfinite(x.flatten(1)).all(1)
        if not bool(finite.all()):  # one host sync per batch
            raise _non_finite(
                sampler,
                noise,
                labels,
                start + int((~finite).nonzero()[0]),
                int((~finite).sum()),
                len(x),
                settings,
                device,
            )
        chunks.append(x.float().cpu())
        if progress is not None:
            progress(len(x))
    return torch.cat(chunks), labels


def _noise_and_labels(sampler, sample_shape, num_samples, seed, labels=None) -> tuple[Tensor, Tensor | None]:
    """generate's inputs: class-major balanced labels (unless given) and CPU noise from `seed`."""
    if labels is None and sampler.num_classes is not None:
        if num_samples < sampler.num_classes:
            labels = torch.arange(num_samples) * sampler.num_classes // num_samples
        else:
            labels = torch.arange(sampler.num_classes).repeat_interleave(num_samples // sampler.num_classes)
    total = len(labels) if labels is not None else num_samples
    return torch.randn((total, *sample_shape), generator=torch.Generator().manual_seed(seed)), labels


def straightness(trajectory: list[Tensor], times: Tensor) -> Tensor:
    """Straightness of ODE paths, per sample [B] (Liu et al. 2022, arXiv 2209.03003, eq. 8):
        S(v) = int_0^1 E ||(X_1 - X_0) - v(X_t, t)||^2 dt,
    0 exactly when every path is a straight line travelled at constant speed (one Euler step is exact).
    trajectory: states [B, ...] at the grid times [K + 1] (FlowSampler.sample(return_trajectory=True)).
    On step k the velocity is the step's mean slope (x_{k+1} - x_k) / h_k, which is v(x_k, t_k) itself for
    Euler: S is then the left Riemann sum of the integral, at no extra NFE. Summed over dimensions, as in
    the paper; the integral is normalised by the time span (t_K - t_0)."""
    x = torch.stack([state.flatten(1) for state in trajectory]).double()  # [K + 1, B, D]
    h = (times[1:] - times[:-1]).double().to(x.device)
    slopes = (x[1:] - x[:-1]) / h[:, None, None]
    deviation = ((x[-1] - x[0])[None] - slopes).square().sum(-1)  # [K, B]
    return (h[:, None] * deviation).sum(0) / h.sum()


@torch.no_grad()
def measure_straightness(
    sampler: FlowSampler, solver_cfg, sample_shape: tuple[int, ...], num_samples: int, seed: int = 0, device="cpu"
) -> float:
    """Mean `straightness` of num_samples ODE paths (one batch: the trajectory is kept) from generate's
    first inputs for `seed`, with solver_cfg's settings (guidance included: the field that is sampled)."""
    noise, labels = _noise_and_labels(sampler, sample_shape, num_samples, seed)
    y = labels.to(device) if labels is not None else None
    solution = sampler.sample(noise.to(device), y, return_trajectory=True, **sample_kwargs(solver_cfg))
    times = time_grid(solver_cfg.num_steps, solver_cfg.grid, solver_cfg.shift)
    return float(straightness(solution.trajectory, times).mean())


def _non_finite(sampler, noise, labels, index, bad, batch, settings, device) -> NonFiniteSamplesError:
    """Re-solve sample `index` alone with its trajectory to name the first step that is not finite."""
    y = labels[index : index + 1].to(device) if labels is not None else None
    trajectory = sampler.sample(noise[index : index + 1].to(device), y, return_trajectory=True, **settings).trajectory
    step = next((k for k, state in enumerate(trajectory) if not bool(torch.isfinite(state).all())), None)
    where = f"first non-finite after solver step {step} of {len(trajectory) - 1}" if step else "non-finite"
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("rtol", "atol"))
    label = f" (label {int(labels[index])})" if labels is not None else ""
    return NonFiniteSamplesError(
        f"{bad} of {batch} samples in a batch are NaN/inf: sample {index}{label} is {where}, "
        f"with {shown}; nothing was written (lower guidance_scale, another solver or more "
        f"steps; or the checkpoint's weights are not finite)"
    )


# Bits/dim that uniform dequantisation's change of variables adds: v = y + u in [0, 256)^D maps to the model's
# x = v / 128 - 1 in [-1, 1)^D, so log p_v(v) = log p_x(x) - D log 128, i.e. log2(128) = 7 bits/dim.
DEQUANTIZATION_BITS_PER_DIM = math.log2(128)


@torch.no_grad()
def image_bits_per_dim(
    sampler: FlowSampler,
    images_uint8: Tensor,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    num_steps: int = 64,
    solver: str = "rk4",
    hutchinson_samples: int = 1,
    dequantization: str = "uniform",
    exact_divergence: bool | None = None,
    guidance_scale: float = 1.0,
    batch_size: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> dict:
    """Bits/dim of 8-bit images [B, C, H, W] (uint8) under the flow, comparable to the numbers reported
    by FFJORD, Glow, Flow Matching or VDM: an upper bound on the model's discrete -log2 P(y) / D.

    Uniform dequantisation (Theis et al. 2016, "A note on the evaluation of generative models"): with
    v = y + u, u ~ U[0, 1)^D, Jensen gives -log2 P(y) = -log2 E_u[p_v(y + u)] <= E_u[-log2 p_v(y + u)],
    and x = v / 128 - 1 maps [0, 256) onto [-1, 1) with -log2 p_v(v) = -log2 p_x(x) + D log2 128, so
    bits/dim(y) <= E_u[-log2 p_x(x)] / D + DEQUANTIZATION_BITS_PER_DIM (= 7). The gap is small for a
    density smooth on the scale of one bin; variational dequantisation (Ho et al. 2019, Flow++) is
    tighter and not implemented.

    The model was trained on x = y / 127.5 - 1 (datasets.py), which is not changed: the two scales differ
    by a factor 256/255 (1/255 of the range), and each training point y / 127.5 - 1 lies inside the closure
    of its own dequantisation bin [y / 128 - 1, (y + 1) / 128 - 1], at fraction y / 255 across it.

    One u per image is drawn from `generator` (on the images' device), before the Hutchinson probes that
    `FlowSampler.log_likelihood` draws from the same generator; the divergence is exact for D <=
    EXACT_DIVERGENCE_MAX_DIM unless exact_divergence says otherwise. labels [B] condition the model (a
    conditional likelihood; guidance_scale != 1 is not a likelihood of the model). batch_size splits the
    images into that many per ODE solve (default: all at once).

    Returns a dict: "bits_per_dim" [B] float32 on the CPU (one single-draw estimate per image), "mean",
    "sem" (std / sqrt(B), sample std over the images; it covers the dequantisation noise, the Hutchinson
    probes and the spread over the images, not the ODE solver's error; nan for B = 1), "estimator"
    ("exact" or f"hutchinson x{K}"), "nfe" (model forward passes, summed over the batches) and
    "num_images".
    """
    if dequantization != "uniform":
        raise ValueError(f"dequantization must be 'uniform' (variational is not implemented), got {dequantization!r}")
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(
            f"images_uint8 must be a uint8 tensor [B, C, H, W]; got {images_uint8.dtype} {tuple(images_uint8.shape)}"
        )
    batch, dim = images_uint8.shape[0], images_uint8[0].numel()
    if batch == 0:
        raise ValueError("images_uint8 is empty")
    if labels is not None and len(labels) != batch:
        raise ValueError(f"labels has {len(labels)} entries for {batch} images")
    exact = dim <= EXACT_DIVERGENCE_MAX_DIM if exact_divergence is None else exact_divergence
    # The same sampler with its model's forward passes counted (subclasses keep their methods).
    counted = object.__new__(type(sampler))
    counted.__dict__.update(vars(sampler))
    counted.model = CountCalls(sampler.model)
    step = batch if batch_size is None else batch_size
    chunks = []
    for start in range(0, batch, step):
        y = images_uint8[start : start + step]
        u = torch.rand(y.shape, generator=generator, device=y.device)
        x = (y.float() + u) / 128 - 1
        bits = counted.log_likelihood(
            x,
            None if labels is None else labels[start : start + step],
            num_steps=num_steps,
            solver=solver,
            exact_divergence=exact,
            hutchinson_samples=hutchinson_samples,
            generator=generator,
            guidance_scale=guidance_scale,
            rtol=rtol,
            atol=atol,
        )
        chunks.append(bits.float().cpu() + DEQUANTIZATION_BITS_PER_DIM)
    bits_per_dim = torch.cat(chunks)
    sem = float(bits_per_dim.std() / math.sqrt(batch)) if batch > 1 else float("nan")
    return {
        "bits_per_dim": bits_per_dim,
        "mean": float(bits_per_dim.mean()),
        "sem": sem,
        "estimator": "exact" if exact else f"hutchinson x{hutchinson_samples}",
        "nfe": counted.model.calls,
        "num_images": batch,
    }
