"""ODE solvers for flow sampling and likelihoods.

Everything here sees only a velocity function `velocity_fn(x, t) -> dx/dt` (x: [B, ...], t: 0-dim tensor)
and knows nothing about models, guidance or probability paths. Sampling integrates t = 0 (noise) -> 1 (data);
likelihoods integrate the other way, so every solver accepts increasing and decreasing time grids.

- fixed-grid one-step methods on an explicit time grid: euler, midpoint, heun, rk4 (`SOLVERS`, `solve_ode`)
- adaptive Dormand-Prince 5(4) through torchdiffeq (`solve_dopri5`)
- jumps of a flow map (average velocity over each grid interval) along the same grids (`solve_flow_map`)
- time grids: uniform, SD3-shifted, EDM rho-spacing (`time_grid`)
- `solve`: the one entry point callers use; NFE is always counted, never assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flow import shift_time

VelocityFn = Callable[[Tensor, Tensor], Tensor]
StepFn = Callable[[VelocityFn, Tensor, Tensor, Tensor], Tensor]

GRIDS = ("uniform", "shifted", "edm")
# Finite stand-ins for the noise-to-signal ratio at t = 0 (infinite) and t = 1 (zero) in the "edm" grid:
# the sigma_max / sigma_min defaults of Karras et al. 2022 (Table 1).
EDM_SIGMA_MAX = 80.0
EDM_SIGMA_MIN = 0.002


@dataclass
class ODESolution:
    """x: final state [B, ...]; nfe: velocity evaluations used; trajectory: states at every grid time
    (including the initial one), only when requested."""

    x: Tensor
    nfe: int
    trajectory: list[Tensor] | None = None


class CountCalls:
    """Wraps a function (a velocity field, a model) and counts its calls, so a reported NFE is measured,
    not assumed."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# one-step methods: (velocity_fn, x, t, t_next) -> x_next, with h = t_next - t (negative when going backwards)


def euler_step(velocity_fn: VelocityFn, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """First order, 1 NFE."""
    return x + (t_next - t) * velocity_fn(x, t)


def midpoint_step(velocity_fn: VelocityFn, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """Explicit midpoint, second order, 2 NFE: the slope is taken half way along an Euler half-step."""
    h = t_next - t
    x_mid = x + 0.5 * h * velocity_fn(x, t)
    return x + h * velocity_fn(x_mid, t + 0.5 * h)


def heun_step(velocity_fn: VelocityFn, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """Explicit trapezoid (Heun; Karras et al. 2022, Alg. 1), second order, 2 NFE: average the slope at t
    and the slope at t_next of the Euler prediction. Unlike EDM we keep the second evaluation at the last
    step too, because a flow velocity is finite at t = 1."""
    h = t_next - t
    u = velocity_fn(x, t)
    x_euler = x + h * u
    return x + 0.5 * h * (u + velocity_fn(x_euler, t_next))


def rk4_step(velocity_fn: VelocityFn, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """Classic fourth-order Runge-Kutta, 4 NFE."""
    h = t_next - t
    k1 = velocity_fn(x, t)
    k2 = velocity_fn(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = velocity_fn(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = velocity_fn(x + h * k3, t_next)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


@dataclass(frozen=True)
class FixedStepSolver:
    step: StepFn
    nfe_per_step: int


SOLVERS: dict[str, FixedStepSolver] = {
    "euler": FixedStepSolver(euler_step, 1),
    "midpoint": FixedStepSolver(midpoint_step, 2),
    "heun": FixedStepSolver(heun_step, 2),
    "rk4": FixedStepSolver(rk4_step, 4),
}
METHODS = (*SOLVERS, "dopri5")
FLOW_MAP = "flow_map"  # not an ODE solver: jumps of a flow-map model along the grid (solve_flow_map)
SAMPLER_METHODS = (*METHODS, FLOW_MAP)


# ----------------------------------------------------------------------------------------------------------
# validation


def _check_choice(name: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


def _check_grid(grid: Tensor, name: str = "time_grid") -> Tensor:
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor with at least 2 times, got shape {tuple(grid.shape)}")
    steps = grid.diff()
    if not ((steps > 0).all() or (steps < 0).all()):
        raise ValueError(f"{name} must be strictly monotone (increasing or decreasing), got {grid.tolist()}")
    return grid


# ----------------------------------------------------------------------------------------------------------
# solvers


def solve_ode(
    velocity_fn: VelocityFn,
    x0: Tensor,
    time_grid: Tensor,
    method: str = "euler",
    return_trajectory: bool = False,
) -> ODESolution:
    """Integrate dx/dt = velocity_fn(x, t) from x0 [B, ...] along `time_grid` [N+1] (increasing or
    decreasing) with a fixed-step method from `SOLVERS`. The grid is cast to x0's device and dtype."""
    _check_choice("method", method, SOLVERS)
    grid = _check_grid(time_grid).to(device=x0.device, dtype=x0.dtype)
    step = SOLVERS[method].step
    counted = CountCalls(velocity_fn)
    x = x0
    trajectory = [x0] if return_trajectory else None
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = step(counted, x, t, t_next)
        if trajectory is not None:
            trajectory.append(x)
    return ODESolution(x, counted.calls, trajectory)


def solve_flow_map(map_fn, x0: Tensor, time_grid: Tensor, return_trajectory: bool = False) -> ODESolution:
    """Jump along `time_grid` [N+1] with a flow map: x_{k+1} = x_k + (t_{k+1} - t_k) map_fn(x_k, t_k, t_{k+1}),
    map_fn(x, t, t_next) being the average velocity over [t, t_next] (flow_map.py); exact in N steps when
    map_fn is the true average velocity, whatever N. NFE = N map evaluations."""
    grid = _check_grid(time_grid).to(device=x0.device, dtype=x0.dtype)
    counted = CountCalls(map_fn)
    x = x0
    trajectory = [x0] if return_trajectory else None
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t) * counted(x, t, t_next)
        if trajectory is not None:
            trajectory.append(x)
    return ODESolution(x, counted.calls, trajectory)


def solve_dopri5(
    velocity_fn: VelocityFn,
    x0: Tensor,
    t0: float = 0.0,
    t1: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    trajectory_times: Tensor | None = None,
) -> ODESolution:
    """Adaptive Dormand-Prince 5(4) (torchdiffeq.odeint) from t0 to t1 (either direction). If
    `trajectory_times` (a monotone grid from t0 to t1) is given, the states there are returned too; they
    come from the solver's dense output and cost no extra evaluations."""
    if trajectory_times is None:
        times = torch.tensor([t0, t1])
    else:
        times = _check_grid(trajectory_times, "trajectory_times")
        if not (math.isclose(times[0].item(), t0) and math.isclose(times[-1].item(), t1)):
            raise ValueError(f"trajectory_times must run from t0={t0} to t1={t1}, got {times.tolist()}")
    from torchdiffeq import odeint  # imported here: it costs ~1 s of start-up and only dopri5 needs it

    counted = CountCalls(velocity_fn)
    # torchdiffeq calls func(t, x); ours is velocity_fn(x, t).
    xs = odeint(
        lambda t, x: counted(x, t),
        x0,
        times.to(device=x0.device, dtype=x0.dtype),
        rtol=rtol,
        atol=atol,
        method="dopri5",
    )
    return ODESolution(xs[-1], counted.calls, list(xs) if trajectory_times is not None else None)


# ----------------------------------------------------------------------------------------------------------
# time grids


def _edm_grid(num_steps: int, rho: float, t_start: float, t_end: float) -> Tensor:
    # Karras et al. 2022 eq. 5 spaces the noise level uniformly in sigma^(1/rho). For CondOT the matching
    # noise level is the noise-to-signal ratio r = sigma(t) / alpha(t) = (1 - t) / t, and t = 1 / (1 + r).
    # r is infinite at t = 0 and zero at t = 1, so the spacing runs between the clamped endpoint ratios and
    # the exact endpoints are put back by the caller.
    def clamped_ratio(t: float) -> float:
        ratio = (1 - t) / t if t > 0 else math.inf
        return min(max(ratio, EDM_SIGMA_MIN), EDM_SIGMA_MAX)

    r_start, r_end = clamped_ratio(t_start) ** (1 / rho), clamped_ratio(t_end) ** (1 / rho)
    frac = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    ratio = (r_start + frac * (r_end - r_start)) ** rho
    return 1 / (1 + ratio)


def time_grid(
    num_steps: int,
    kind: str = "uniform",
    shift: float = 1.0,
    rho: float = 7.0,
    t_start: float = 0.0,
    t_end: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Times [num_steps + 1] (float64) from t_start to t_end, both exact; t_start > t_end gives a
    decreasing grid.

    - "uniform": evenly spaced.
    - "shifted": evenly spaced, then t' = t / (t + shift (1 - t)) (`flow.shift_time`, the SD3 eq. 23
      resolution shift in our direction); shift > 1 spends more steps near noise (t = 0).
    - "edm": Karras et al. 2022 eq. 5 rho-spacing of the noise-to-signal ratio (1 - t) / t, clamped to
      [EDM_SIGMA_MIN, EDM_SIGMA_MAX] = [0.002, 80]. Steps are small near both ends: near data because
      rho > 1 concentrates ratios at small values, near noise because (1 - t) / t changes fastest there.
    """
    _check_num_steps(num_steps)
    _check_choice("kind", kind, GRIDS)
    for name, value in (("t_start", t_start), ("t_end", t_end)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    if t_start == t_end:
        raise ValueError(f"t_start and t_end must differ, got both {t_start}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")

    if kind == "uniform":
        grid = torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64)
    elif kind == "shifted":
        # Evenly spaced before the shift; its inverse is the same map with 1 / shift, so the endpoints stay.
        unshifted = torch.linspace(
            shift_time(t_start, 1 / shift), shift_time(t_end, 1 / shift), num_steps + 1, dtype=torch.float64
        )
        grid = shift_time(unshifted, shift)
    else:
        grid = _edm_grid(num_steps, rho, t_start, t_end)
    grid[0], grid[-1] = t_start, t_end
    return _check_grid(grid).to(device)


def solve(
    velocity_fn: VelocityFn,
    x0: Tensor,
    method: str,
    num_steps: int,
    grid: str = "uniform",
    shift: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_start: float = 0.0,
    t_end: float = 1.0,
    return_trajectory: bool = False,
) -> ODESolution:
    """Integrate from t_start to t_end with any method in METHODS. Fixed-step methods use
    `time_grid(num_steps, grid, shift)`; dopri5 adapts its own steps (rtol/atol) and uses that grid only
    for the returned trajectory."""
    _check_choice("method", method, METHODS)
    times = time_grid(num_steps, grid, shift, t_start=t_start, t_end=t_end)
    if method == "dopri5":
        return solve_dopri5(
            velocity_fn, x0, t_start, t_end, rtol, atol, trajectory_times=times if return_trajectory else None
        )
    return solve_ode(velocity_fn, x0, times, method, return_trajectory)
