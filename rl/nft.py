"""DiffusionNFT: online RL on the forward (noising) process, without likelihoods (Zheng et al. 2025, arXiv
2509.16117, sec. 3, the policy-optimisation loss).

The rollouts' clean samples x1 (from any sampler) and their rewards are all it needs. Each sample's reward
becomes an optimality probability r in [0, 1]; the policy v_theta is trained by flow matching on noised copies
x_t of the samples, through two implicit policies around the frozen sampling ("old") policy v_old:

    v+ = (1 - beta) v_old + beta v_theta          (positive: what the high-reward samples are drawn from)
    v- = (1 + beta) v_old - beta v_theta          (negative: mirrored through v_old)
    L(theta) = E_{x1, t, eps} [ r ||v+(x_t, c, t) - u_t||^2 + (1 - r) ||v-(x_t, c, t) - u_t||^2 ]

with u_t the path's target velocity. Its minimiser moves v_theta from v_old towards the positive samples'
velocity and away from the negative ones' (the paper: v* = v_old + (2 / beta) Delta, Delta the reward-weighted
difference); at v_theta = v_old both branches are the plain flow-matching loss. The conditional velocity is
trained (no CFG), as in the paper. Times follow flow.py: noise at t = 0, data at t = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor


def optimality_probability(advantages: Tensor, advantage_max: float) -> Tensor:
    """r = 0.5 + 0.5 clip(A / advantage_max, -1, 1) [B] from group-relative advantages A [B]: 0.5 for an
    average sample (both branches weigh it equally: no push), 1 / 0 at +-advantage_max and beyond."""
    return 0.5 + 0.5 * (advantages.float() / advantage_max).clamp(-1, 1)


def nft_loss(v_theta: Tensor, v_old: Tensor, target: Tensor, r: Tensor, beta: float) -> tuple[Tensor, dict]:
    """The DiffusionNFT loss (module docstring) on N noised samples: velocities v_theta (with grad), v_old
    (constant) and the target u_t [N, ...], r [N] in [0, 1]. Squared errors are averaged over the non-batch
    dims, then over N. Returns (loss, stats) with stats detached: positive / negative branch losses and
    mean r."""
    v_old = v_old.detach().to(v_theta.dtype)
    target = target.to(v_theta.dtype)
    positive = (1 - beta) * v_old + beta * v_theta
    negative = (1 + beta) * v_old - beta * v_theta
    positive_error = (positive - target).square().flatten(1).mean(1)
    negative_error = (negative - target).square().flatten(1).mean(1)
    r = r.detach().to(positive_error.dtype)
    loss = (r * positive_error + (1 - r) * negative_error).mean()
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            "positive_loss": positive_error.mean(),
            "negative_loss": negative_error.mean(),
            "optimality": r.mean(),
        }
    return loss, stats


def forward_process_batch(path, samples: Tensor, timesteps: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """`timesteps` noised copies of each clean sample [B, ...] -> (x_t, t, u_t, index), N = timesteps x B rows
    (row k * B + b is copy k of sample b, index[row] = b), with t ~ U(0, 1) and eps ~ N(0, I) drawn from
    `generator` (t first, then eps) and (x_t, u_t) from `path.sample` (flow.AffinePath)."""
    batch = samples.shape[0]
    x1 = samples.repeat(timesteps, *([1] * (samples.dim() - 1)))
    t = torch.rand(timesteps * batch, generator=generator, device=samples.device, dtype=samples.dtype)
    eps = torch.randn(x1.shape, generator=generator, device=samples.device, dtype=samples.dtype)
    x_t, target = path.sample(x1, eps, t)
    return x_t, t, target, torch.arange(batch, device=samples.device).repeat(timesteps)
