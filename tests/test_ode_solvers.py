import math

import pytest
import torch

from ode_solvers import SOLVERS, solve, solve_dopri5, solve_ode, time_grid

# dx/dt = -2 t x has the closed form x(t) = x(t0) exp(-(t^2 - t0^2)); being time-dependent it also tests
# that the solvers evaluate the velocity at the right intermediate times.
X0 = torch.tensor([[1.0], [-0.5], [2.0]], dtype=torch.float64)


def velocity(x, t):
    return -2 * t * x


def exact(x0, t0, t1):
    return x0 * math.exp(-(t1**2 - t0**2))


def error(method, num_steps, t0=0.0, t1=1.0):
    grid = torch.linspace(t0, t1, num_steps + 1, dtype=torch.float64)
    sol = solve_ode(velocity, X0, grid, method)
    return (sol.x - exact(X0, t0, t1)).abs().max().item()


@pytest.mark.parametrize("method, order", [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)])
def test_global_error_order(method, order):
    # Halving the step divides the global error by 2^p.
    measured = math.log2(error(method, 16) / error(method, 32))
    assert abs(measured - order) < 0.3, f"{method}: measured order {measured:.2f}, expected {order}"


@pytest.mark.parametrize("method", list(SOLVERS))
def test_nfe_is_exact(method):
    calls = 0

    def counted(x, t):
        nonlocal calls
        calls += 1
        return velocity(x, t)

    sol = solve_ode(counted, X0, time_grid(7), method)
    assert sol.nfe == calls == 7 * SOLVERS[method].nfe_per_step


@pytest.mark.parametrize("method", [*SOLVERS, "dopri5"])
def test_backward_integration(method):
    # Decreasing grids integrate data -> noise (likelihood direction).
    sol = solve(velocity, X0, method, num_steps=64, t_start=1.0, t_end=0.0, rtol=1e-8, atol=1e-8)
    rtol = {"euler": 1e-2, "midpoint": 3e-4, "heun": 3e-4}.get(method, 1e-7)
    torch.testing.assert_close(sol.x, exact(X0, 1.0, 0.0), rtol=rtol, atol=0)


def test_dopri5_accuracy_and_nfe():
    calls = 0

    def counted(x, t):
        nonlocal calls
        calls += 1
        return velocity(x, t)

    sol = solve_dopri5(counted, X0, 0.0, 1.0, rtol=1e-8, atol=1e-8)
    assert (sol.x - exact(X0, 0.0, 1.0)).abs().max() < 1e-6
    assert sol.nfe == calls > 0


def test_trajectory_holds_every_grid_time():
    grid = time_grid(5, "edm")
    sol = solve_ode(velocity, X0, grid, "rk4", return_trajectory=True)
    assert len(sol.trajectory) == 6
    torch.testing.assert_close(sol.trajectory[0], X0)
    torch.testing.assert_close(sol.trajectory[-1], sol.x)
    dense = solve(velocity, X0, "dopri5", num_steps=5, grid="edm", rtol=1e-8, atol=1e-8, return_trajectory=True)
    for t, x in zip(grid.tolist(), dense.trajectory):
        torch.testing.assert_close(x, exact(X0, 0.0, t), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["uniform", "shifted", "edm"])
@pytest.mark.parametrize("t_start, t_end", [(0.0, 1.0), (1.0, 0.0), (0.2, 0.9)])
def test_time_grids_are_monotone_with_exact_endpoints(kind, t_start, t_end):
    grid = time_grid(10, kind, shift=3.0, t_start=t_start, t_end=t_end)
    assert grid.shape == (11,)
    assert grid[0].item() == t_start and grid[-1].item() == t_end
    steps = grid.diff()
    assert (steps > 0).all() if t_end > t_start else (steps < 0).all()


def test_shifted_grid_matches_formula():
    shift = 3.0
    t = torch.linspace(0, 1, 9, dtype=torch.float64)
    expected = t / (t + shift * (1 - t))
    torch.testing.assert_close(time_grid(8, "shifted", shift=shift), expected)
    # shift > 1 spends more steps near noise.
    assert (time_grid(8, "shifted", shift=shift)[1:-1] < t[1:-1]).all()


def test_edm_grid_is_denser_near_both_ends():
    steps = time_grid(16, "edm").diff()
    largest = steps.max()
    assert steps[0] < largest / 4 and steps[-1] < largest / 4
    # Interior points follow Karras eq. 5 on the noise-to-signal ratio (1 - t) / t.
    grid = time_grid(16, "edm", rho=7.0)
    ratio = (1 - grid[1:-1]) / grid[1:-1]
    root = ratio ** (1 / 7)
    torch.testing.assert_close(root.diff(), torch.full_like(root.diff(), root.diff()[0].item()))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: time_grid(0), "num_steps"),
        (lambda: time_grid(4, "cosine"), "kind"),
        (lambda: time_grid(4, t_start=0.5, t_end=0.5), "t_start"),
        (lambda: solve(velocity, X0, "rk5", 4), "method"),
        (lambda: solve_ode(velocity, X0, torch.tensor([0.0, 0.5, 0.3, 1.0]), "euler"), "time_grid"),
        (lambda: solve_ode(velocity, X0, time_grid(4), "adams"), "method"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
