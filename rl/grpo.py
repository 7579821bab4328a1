"""The GRPO objective for flow policies: group-relative advantages, the PPO clipped ratio loss and the
closed-form KL between the Gaussian SDE transitions of the policy and a frozen reference.

Sources: GRPO, group-normalised advantages without a critic (DeepSeekMath, Shao et al. 2024, arXiv
2402.03300, sec. 4.1); PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, eq. 7); Flow-GRPO
(Liu et al. 2025, arXiv 2505.05470, sec. 4.1), which applies both to the SDE transitions of
`rl.sde_sampler` and regularises with the Gaussian KL between transition means.

Every function is batched (no Python loop over groups or samples) and returns tensors; stats are
detached 0-dim tensors, so logging them costs no host sync until someone reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KL_REDUCTIONS = ("mean", "sum")


@dataclass
class GroupStats:
    """Per-group reward statistics, broadcast back to the samples."""

    mean: Tensor  # mean reward of each sample's group [B]
    std: Tensor  # population std (ddof = 0) of each sample's group [B]
    zero_std: Tensor  # [B] bool: the sample's group has all-equal rewards (no learning signal)
    zero_std_fraction: Tensor  # 0-dim float: fraction of *groups* with all-equal rewards
    num_groups: int


def group_stats(rewards: Tensor, group_ids: Tensor) -> GroupStats:
    """Mean and population std of the rewards [B] within each group (group_ids [B], any integer ids,
    e.g. the class label), via index_add over the unique ids. Population std (divide by the group size
    G, not G - 1) as Flow-GRPO's per-prompt stat tracker (np.std). Statistics in float32 or wider."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B]; got {tuple(rewards.shape)}, {tuple(group_ids.shape)}"
        )
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    ids, group = torch.unique(group_ids, return_inverse=True)  # group[b] in [0, num_groups)
    num_groups = ids.numel()
    zeros = rewards.new_zeros(num_groups)
    count = zeros.index_add(0, group, torch.ones_like(rewards))
    mean = zeros.index_add(0, group, rewards) / count
    # Two passes (mean, then centred squares): no E[R^2] - E[R]^2 cancellation.
    var = zeros.index_add(0, group, (rewards - mean[group]).square()) / count
    # "All equal" from min == max, exact even where rounding leaves var slightly above 0.
    low = zeros.scatter_reduce(0, group, rewards, "amin", include_self=False)
    high = zeros.scatter_reduce(0, group, rewards, "amax", include_self=False)
    constant = low == high
    return GroupStats(
        mean=mean[group],
        std=var.sqrt()[group],
        zero_std=constant[group],
        zero_std_fraction=constant.float().mean(),
        num_groups=num_groups,
    )


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    eps: float = 1e-4,
    global_std: bool = False,
    clip: float | None = None,
    scale: float = 1.0,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, GroupStats]:
    """GRPO advantages A = scale * clip((R - mean_group) / (std + eps)) [B] (DeepSeekMath sec. 4.1.2,
    Flow-GRPO sec. 4.1), one per rollout, shared by all its transitions.

    std is the group's population std, or with global_std that of all B rewards (Flow-GRPO's
    `global_std` option: groups with a small spread are not blown up to unit scale). Samples of a group
    with all-equal rewards get exactly 0 (never NaN). clip bounds the normalised advantage to
    [-clip, clip] before `scale` (the advantage_scale knob) multiplies it. With return_stats, also
    returns the `GroupStats` (e.g. zero_std_fraction to log)."""
    stats = group_stats(rewards, group_ids)
    rewards = rewards.to(stats.mean.dtype)
    std = rewards.std(correction=0).expand_as(rewards) if global_std else stats.std
    advantages = (rewards - stats.mean) / (std + eps)
    advantages = torch.where(stats.zero_std, torch.zeros_like(advantages), advantages)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    advantages = scale * advantages
    return (advantages, stats) if return_stats else advantages


def clipped_policy_loss(
    log_probs_new: Tensor, log_probs_old: Tensor, advantages: Tensor, clip_eps: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (arXiv 1707.06347, eq. 7), negated for minimisation:
        rho = exp(logp_new - logp_old),  L = -mean(min(rho A, clip(rho, 1 - eps, 1 + eps) A)),
    over N transitions ([N] each; log_probs_old and advantages are constants). A term whose ratio has
    left the trust region in the direction its advantage favours (rho > 1 + eps with A > 0, rho < 1 - eps
    with A < 0) contributes no gradient. Stats (detached): clip_fraction (share of |rho - 1| > eps),
    approx_kl = mean((rho - 1) - log rho) (Schulman's unbiased, non-negative KL(old || new) estimator,
    joschu.net/blog/kl-approx.html), ratio_min, ratio_max."""
    log_ratio = log_probs_new - log_probs_old.detach()
    ratio = log_ratio.exp()
    advantages = advantages.detach()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "policy_loss": loss.detach(),
            "clip_fraction": ((ratio - 1).abs() > clip_eps).float().mean(),
            "approx_kl": ((ratio - 1) - log_ratio).mean(),
            "ratio_min": ratio.min(),
            "ratio_max": ratio.max(),
        }
    return loss, stats


def gaussian_kl(mean_policy: Tensor, mean_ref: Tensor, std: Tensor, reduce: str = "mean") -> Tensor:
    """KL(N(mu_theta, s^2 I) || N(mu_ref, s^2 I)) = ||mu_theta - mu_ref||^2 / (2 s^2) per transition
    (Flow-GRPO sec. 4.1; equal stds, so the log-det and trace terms cancel). means [N, ...], std
    broadcastable (e.g. [N, 1, ..., 1]) -> [N] float32. reduce="mean" divides by D = prod(shape[1:]),
    as `rl.sde_sampler.gaussian_log_prob` does for log pi, so kl_beta weighs the KL against the same
    per-dimension log-probs; "sum" is the true KL. Use the same setting for both. Pass the transition
    std (`Rollout.stds`, g(t) sqrt(dt)); Flow-GRPO's train_sd3.py divides by std_dev_t^2 without the dt,
    a KL smaller by a factor dt, so its kl_beta values do not carry over unchanged."""
    if reduce not in KL_REDUCTIONS:
        raise ValueError(f"reduce must be one of {KL_REDUCTIONS}, got {reduce!r}")
    dtype = torch.promote_types(mean_policy.dtype, torch.float32)
    diff = mean_policy.to(dtype) - mean_ref.to(dtype).detach()
    kl = (diff.square() / (2 * std.to(dtype).detach().square())).flatten(1)
    return kl.mean(1) if reduce == "mean" else kl.sum(1)


def grpo_loss(
    log_probs_new: Tensor,
    log_probs_old: Tensor,
    advantages: Tensor,
    clip_eps: float = 0.2,  # PPO's clip range
    kl: Tensor | None = None,
    kl_beta: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-GRPO's objective (arXiv 2505.05470, sec. 4.1): clipped policy loss + kl_beta * mean KL to the
    reference (kl [N] from `gaussian_kl`, or None). Returns (loss, stats), stats as in
    `clipped_policy_loss` plus "kl" (0 when kl is None) and "loss"."""
    loss, stats = clipped_policy_loss(log_probs_new, log_probs_old, advantages, clip_eps)
    if kl is not None:
        kl_mean = kl.mean()
        loss = loss + kl_beta * kl_mean
        stats["kl"] = kl_mean.detach()
    else:
        stats["kl"] = torch.zeros((), device=loss.device, dtype=loss.dtype)
    stats["loss"] = loss.detach()
    return loss, stats


def normalized_log_ratio(
    log_probs_new: Tensor, log_probs_old: Tensor, mean_new: Tensor, mean_old: Tensor, std: Tensor, reduce: str = "mean"
) -> Tensor:
    """GRPO-Guard's ratio normalisation (RatioNorm; Wang et al. 2025, arXiv 2510.22319, sec. 4, in the form of
    verl-omni's GRPOGuardLoss): log rho_norm = (log pi_new - log pi_old + b) * s, with
        b = ||mu_new - mu_old||^2 / (2 s^2)  (averaged over dims for reduce="mean", summed for "sum"),
    s the transition std [N, 1, ..., 1] (g(t) sqrt(dt)), all per transition [N]. Under the old policy's own
    actions E[log pi_new - log pi_old] = -b: the raw ratio is biased below 1, so the 1 + eps clip rarely bounds
    a positive-advantage update; adding b centres it, and the factor s equalises its spread across timesteps
    (s shrinks where the raw log ratio's spread, ~|mu_new - mu_old| / s, grows). Equal means give exactly 0.
    Use as clipped_policy_loss(normalized, zeros, ...)."""
    if reduce not in KL_REDUCTIONS:
        raise ValueError(f"reduce must be one of {KL_REDUCTIONS}, got {reduce!r}")
    dtype = torch.promote_types(mean_new.dtype, torch.float32)
    std = std.to(dtype).detach()
    shift = ((mean_new.to(dtype) - mean_old.to(dtype).detach()).square() / (2 * std.square())).flatten(1)
    bias = shift.mean(1) if reduce == "mean" else shift.sum(1)
    scale = std.flatten(1)[:, 0]
    return (log_probs_new - log_probs_old.detach() + bias) * scale


def step_weights(times: Tensor, next_times: Tensor) -> Tensor:
    """GRPO-Guard's gradient reweighting 1 / dt per rollout step [T], normalised to mean 1 over the rollout's
    steps, so the learning rate keeps its meaning (on a uniform grid every weight is exactly 1)."""
    inverse = 1.0 / (next_times - times).double()
    return (inverse / inverse.mean()).to(times.dtype)
