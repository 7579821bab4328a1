"""The GRPO objective (rl/grpo.py): group advantages, the PPO clipped ratio loss and the Gaussian KL.

Group std is the population std (ddof = 0) throughout, as in rl/grpo.py."""

import pytest
import torch
from torch import nn

from flow import make_path
from rl.grpo import (
    clipped_policy_loss,
    gaussian_kl,
    group_advantages,
    group_stats,
    grpo_loss,
    normalized_log_ratio,
    step_weights,
)
from rl.nft import forward_process_batch, nft_loss, optimality_probability
from rl.sde_sampler import gaussian_log_prob, sde_rollout, transition_log_prob, window_steps
from sampling import FlowSampler


def rewards_and_groups():
    gen = torch.Generator().manual_seed(0)
    # Group ids need not be contiguous or sorted; group 7 (7 members) has all-equal rewards.
    group_ids = torch.tensor([3, 7, 3, 11, 7, 3, 11, 7, 11, 3, 7, 7, 11, 7, 7, 11])
    rewards = torch.randn(16, generator=gen) * torch.where(group_ids == 11, 5.0, 1.0)
    # 7 x 0.3 in float32: the group mean rounds to 0.3 + 3e-8, so R - mean is not exactly 0 there.
    rewards[group_ids == 7] = 0.3
    return rewards, group_ids


# ---------------------------------------------------------------------------------------------- advantages


def test_advantages_are_standardised_per_group():
    rewards, group_ids = rewards_and_groups()
    advantages = group_advantages(rewards, group_ids, eps=0.0)
    for group in (3, 11):
        a = advantages[group_ids == group]
        torch.testing.assert_close(a.mean(), torch.tensor(0.0), rtol=0, atol=1e-6)
        torch.testing.assert_close(a.std(correction=0), torch.tensor(1.0))
    # eps only shrinks them: std / (std + eps).
    shrunk = group_advantages(rewards, group_ids)
    torch.testing.assert_close(shrunk, advantages, rtol=1e-3, atol=0)


def test_constant_group_gets_exactly_zero_advantage():
    rewards, group_ids = rewards_and_groups()
    for eps in (0.0, 1e-4):
        for global_std in (False, True):
            advantages, stats = group_advantages(rewards, group_ids, eps, global_std, return_stats=True)
            assert torch.isfinite(advantages).all()
            assert (advantages[group_ids == 7] == 0).all()
            assert (advantages[group_ids != 7] != 0).all()
    assert (rewards - stats.mean)[group_ids == 7].abs().max() > 0  # the case the exact-zero rule is for
    torch.testing.assert_close(stats.zero_std_fraction, torch.tensor(1 / 3))
    assert stats.num_groups == 3 and torch.equal(stats.zero_std, group_ids == 7)
    # A singleton group and an all-constant batch are zero too.
    assert torch.equal(group_advantages(torch.tensor([2.0, 1.0, 3.0]), torch.tensor([0, 1, 1]))[0], torch.tensor(0.0))
    assert torch.equal(group_advantages(torch.full((4,), 0.3), torch.zeros(4, dtype=torch.long)), torch.zeros(4))


def test_group_stats_match_a_loop():
    rewards, group_ids = rewards_and_groups()
    stats = group_stats(rewards, group_ids)
    for group in group_ids.unique():
        members = group_ids == group
        torch.testing.assert_close(stats.mean[members], rewards[members].mean().expand(int(members.sum())))
        torch.testing.assert_close(stats.std[members], rewards[members].std(correction=0).expand(int(members.sum())))


def test_global_std_divides_by_the_batch_std():
    rewards, group_ids = rewards_and_groups()
    advantages = group_advantages(rewards, group_ids, eps=0.0, global_std=True)
    centred = rewards - group_stats(rewards, group_ids).mean
    expected = torch.where(group_ids == 7, torch.tensor(0.0), centred / rewards.std(correction=0))
    torch.testing.assert_close(advantages, expected)


def test_clip_then_scale():
    rewards = torch.tensor([0.0, 0.0, 0.0, 10.0, 1.0, 2.0])
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1])
    raw = group_advantages(rewards, group_ids, eps=0.0)
    assert raw.abs().max() > 1.5  # the outlier
    advantages = group_advantages(rewards, group_ids, eps=0.0, clip=1.5, scale=4.0)
    torch.testing.assert_close(advantages, 4.0 * raw.clamp(-1.5, 1.5))


# ---------------------------------------------------------------------------------------------- clipped loss


class Drift(nn.Module):
    """Velocity theta * x + 1 for a 1-parameter policy."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t, y=None):
        return self.theta * x + 1


def test_first_inner_update_has_unit_ratio_and_is_the_vanilla_policy_gradient():
    model = Drift()
    sampler = FlowSampler(model, make_path())
    rollout = sde_rollout(sampler, torch.randn(12, 3, 4), None, 6, generator=torch.Generator().manual_seed(0))
    flat = rollout.transitions()
    advantages = group_advantages(torch.randn(12), torch.arange(12) // 4)[flat.sample_index]
    args = (sampler, flat.states, flat.times, flat.next_times, flat.next_states, None, 0.7, 1.0)
    with torch.no_grad():  # "old" log-probs, through the same code path as the update
        old, _, _ = transition_log_prob(*args)
    new, _, _ = transition_log_prob(*args)
    loss, stats = clipped_policy_loss(new, old, advantages, clip_eps=0.2)
    assert (stats["ratio_min"] - 1).abs() <= 1e-6 and (stats["ratio_max"] - 1).abs() <= 1e-6
    assert stats["clip_fraction"] == 0 and stats["approx_kl"].abs() <= 1e-6
    torch.testing.assert_close(loss, -advantages.mean())
    (grad,) = torch.autograd.grad(loss, model.theta)
    # At rho = 1 the gradient is REINFORCE's: -mean(A grad log pi).
    new, _, _ = transition_log_prob(*args)
    (expected,) = torch.autograd.grad(-(advantages * new).mean(), model.theta)
    torch.testing.assert_close(grad, expected)
    assert all(value.dim() == 0 and not value.requires_grad for value in stats.values())


def test_clipping_zeroes_the_gradient_only_on_the_favoured_side():
    eps = 0.2
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.1, 0.9])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    clipped_terms = torch.tensor([True, True, False, False, False, False])
    log_probs_new = ratios.log().requires_grad_(True)
    log_probs_old = torch.zeros(6)
    loss, stats = clipped_policy_loss(log_probs_new, log_probs_old, advantages, eps)
    (grad,) = torch.autograd.grad(loss, log_probs_new)
    assert (grad[clipped_terms] == 0).all()
    # Elsewhere d/dlogp of -rho A / N = -rho A / N: pessimistic terms keep their full gradient.
    torch.testing.assert_close(grad[~clipped_terms], -(ratios * advantages)[~clipped_terms] / 6)
    expected = -torch.minimum(ratios * advantages, ratios.clamp(1 - eps, 1 + eps) * advantages).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["clip_fraction"], torch.tensor(4 / 6))
    torch.testing.assert_close(stats["approx_kl"], ((ratios - 1) - ratios.log()).mean())
    torch.testing.assert_close(stats["ratio_min"], torch.tensor(0.5))
    torch.testing.assert_close(stats["ratio_max"], torch.tensor(1.5))


# ---------------------------------------------------------------------------------------------- KL


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_gaussian_kl_matches_torch_distributions(reduce):
    gen = torch.Generator().manual_seed(0)
    mean_policy, mean_ref = torch.randn(5, 2, 3, 3, generator=gen), torch.randn(5, 2, 3, 3, generator=gen)
    std = torch.rand(5, 1, 1, 1, generator=gen) + 0.2
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean_policy, std), torch.distributions.Normal(mean_ref, std)
    ).flatten(1)
    expected = reference.mean(1) if reduce == "mean" else reference.sum(1)
    torch.testing.assert_close(gaussian_kl(mean_policy, mean_ref, std, reduce), expected)
    assert (gaussian_kl(mean_ref, mean_ref, std) == 0).all()


def test_grpo_loss_adds_beta_times_mean_kl():
    gen = torch.Generator().manual_seed(1)
    new, old = torch.randn(8, generator=gen) * 0.1, torch.randn(8, generator=gen) * 0.1
    advantages = torch.randn(8, generator=gen)
    mean_policy = torch.randn(8, 4, generator=gen).requires_grad_(True)
    kl = gaussian_kl(mean_policy, torch.zeros(8, 4), torch.full((8, 1), 0.5))
    loss, stats = grpo_loss(new, old, advantages, 0.2, kl, kl_beta=0.01)
    policy_loss, _ = clipped_policy_loss(new, old, advantages, 0.2)
    torch.testing.assert_close(loss, policy_loss + 0.01 * kl.mean())
    torch.testing.assert_close(stats["kl"], kl.mean().detach())
    loss.backward()
    assert mean_policy.grad is not None and (mean_policy.grad != 0).all()
    loss, stats = grpo_loss(new, old, advantages, 0.2)
    torch.testing.assert_close(loss, policy_loss)
    assert stats["kl"] == 0


class LabelShift(nn.Module):
    """u(x, t, y) = a x + b[y]: the null label (index num_classes) has its own b, so gradients show which
    CFG branch they came from."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.a = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.linspace(-1, 1, num_classes + 1))

    def forward(self, x, t, y=None):
        return self.a * x + self.b[y].view(-1, *[1] * (x.dim() - 1))


def test_detach_uncond_trains_only_the_conditional_branch():
    """Flow-GRPO's log-prob: with CFG scale s, u = u_uncond + s (u_cond - u_uncond). Detached (the
    default), the null label's parameters get no gradient and the conditional ones get s times the
    unguided gradient; attached, the null label is trained with weight 1 - s. Values are identical."""
    model = LabelShift()
    sampler = FlowSampler(model, make_path(), num_classes=3)
    labels = torch.tensor([0, 1, 2, 0])
    rollout = sde_rollout(
        sampler, torch.randn(4, 2), labels, 4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0)
    )
    k = 1
    args = (
        sampler,
        rollout.states[k],
        rollout.times[k],
        rollout.next_times[k],
        rollout.next_states[k],
        labels,
        0.7,
        3.0,
        "mean",
    )
    grads = {}
    for detach in (True, False):
        log_probs, _, _ = transition_log_prob(*args, detach_uncond=detach)
        torch.testing.assert_close(log_probs.detach(), rollout.log_probs[k], rtol=0, atol=1e-6)
        (grads[detach],) = torch.autograd.grad(log_probs.sum(), model.b)
    null = model.num_classes
    assert grads[True][null] == 0 and grads[False][null] != 0
    # d u / d b_null = 1 - s and d u / d b_y = s: the attached null gradient is (1 - s) / s times the label's.
    torch.testing.assert_close(grads[True][:null], grads[False][:null])
    torch.testing.assert_close(grads[False][null], (1 - 3.0) / 3.0 * grads[False][:null].sum())


# --- the stable-objective variants: DiffusionNFT, GRPO-Guard's ratio normalisation, windowed Flow-GRPO ---


def test_nft_loss_matches_a_hand_computed_value():
    """N = 2 samples, D = 2, beta = 0.5 (rl/nft.py's loss), worked by hand:
    row 0 (r = 1): v+ = (0.5, 0), error to (1, 1) = (0.25 + 1) / 2 = 0.625;
    row 1 (r = 0.25): v+ = (0.5, 1.5), v- = (1.5, 0.5), both errors (0.25 + 2.25) / 2 = 1.25 -> 1.25;
    loss = (0.625 + 1.25) / 2 = 0.9375. d loss / d v_theta[0] = (1 / 2) r 2 beta (v+ - u) / D = (-0.125, -0.25)."""
    v_theta = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    v_old = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    loss, stats = nft_loss(v_theta, v_old, target, torch.tensor([1.0, 0.25]), beta=0.5)
    assert loss.item() == pytest.approx(0.9375)
    (grad,) = torch.autograd.grad(loss, v_theta)
    torch.testing.assert_close(grad[0], torch.tensor([-0.125, -0.25]))
    assert stats["optimality"].item() == pytest.approx(0.625)
    # at v_theta = v_old both implicit policies are v_old: plain flow matching whatever r, and the gradient
    # 2 beta (2 r - 1) (v_old - u) / (N D) pushes towards u for r > 1/2, away for r < 1/2, not at all at 1/2
    at_old = v_old.clone().requires_grad_(True)
    r = torch.tensor([0.9, 0.5])
    loss, _ = nft_loss(at_old, v_old, target, r, beta=0.5)
    assert loss.item() == pytest.approx((v_old - target).square().mean().item())
    (grad,) = torch.autograd.grad(loss, at_old)
    torch.testing.assert_close(grad, 2 * 0.5 * (2 * r[:, None] - 1) * (v_old - target) / 4)


def test_optimality_probability_clips_advantages_to_0_1():
    r = optimality_probability(torch.tensor([-10.0, -2.5, 0.0, 2.5, 10.0]), advantage_max=5.0)
    torch.testing.assert_close(r, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))


def test_normalized_log_ratio_hand_value_and_unbiased_under_the_old_policy():
    """(log pi_new - log pi_old + b) s with b = mean ||mu_new - mu_old||^2 / (2 s^2): by hand, means (0.1, 0.3)
    vs 0 at s = 0.5 give b = (0.02 + 0.18) / 2 = 0.1, so (-1.0 + 1.2 + 0.1) x 0.5 = 0.15 ("sum": b = 0.2 -> 0.2).
    Under actions drawn from the old policy the raw log ratio averages -b: the normalised one averages 0."""
    args = (torch.tensor([-1.0]), torch.tensor([-1.2]), torch.tensor([[0.1, 0.3]]), torch.zeros(1, 2))
    std = torch.full((1, 1), 0.5)
    assert normalized_log_ratio(*args, std).item() == pytest.approx(0.15)
    assert normalized_log_ratio(*args, std, reduce="sum").item() == pytest.approx(0.2)
    count, s = 20000, 0.3
    mean_old, mean_new = torch.zeros(count, 4), torch.tensor([0.1, -0.2, 0.05, 0.3]).expand(count, 4)
    std = torch.full((count, 1), s)
    actions = mean_old + s * torch.randn(count, 4, generator=torch.Generator().manual_seed(0))
    raw = gaussian_log_prob(actions, mean_new, std) - gaussian_log_prob(actions, mean_old, std)
    bias = mean_new.square().mean(1) / (2 * s**2)
    assert raw.mean().item() == pytest.approx(-bias[0].item(), abs=4 * raw.std().item() / count**0.5)
    normalized = normalized_log_ratio(
        gaussian_log_prob(actions, mean_new, std), gaussian_log_prob(actions, mean_old, std), mean_new, mean_old, std
    )
    assert abs(normalized.mean().item()) <= 4 * normalized.std().item() / count**0.5
    assert normalized_log_ratio(raw * 0, raw * 0, mean_old, mean_old, std).abs().max() == 0  # equal policies: 0


def test_step_weights_are_inverse_dt_with_mean_one():
    grid = torch.linspace(0, 1, 5)
    torch.testing.assert_close(step_weights(grid[:-1], grid[1:]), torch.ones(4))
    weights = step_weights(torch.tensor([0.0, 0.5, 0.75]), torch.tensor([0.5, 0.75, 1.0]))
    torch.testing.assert_close(weights, torch.tensor([0.6, 1.2, 1.2]))


# A 2-D toy problem: the exact flow of N((1, -2), 0.5^2 I) plus a learnable offset c of the velocity, which
# moves the samples by about c. The reward asks for samples near (3, 0): each objective must move c there.
TARGET = torch.tensor([3.0, 0.0])


class OffsetGaussian(nn.Module):
    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(2))

    def forward(self, x, t, y=None):
        t = t.view(-1, 1)
        mean, var = torch.tensor([1.0, -2.0]), 0.25
        return mean + (t * var - (1 - t)) / (t**2 * var + (1 - t) ** 2) * (x - t * mean) + self.offset


def toy_reward(samples):
    return -(samples - TARGET).square().sum(1)


def toy_run(objective: str, iterations: int = 25, **options) -> tuple[float, float]:
    """`iterations` rollout batches of 32 (one group) on the 2-D toy, each followed by 2 Adam steps of
    `objective` -> (mean toy reward of the first batch, of 256 fresh samples after training)."""
    torch.manual_seed(0)
    model = OffsetGaussian()
    sampler = FlowSampler(model, make_path())
    old_model = OffsetGaussian()
    old = FlowSampler(old_model, make_path())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    first = None
    for iteration in range(iterations):
        gen = torch.Generator().manual_seed(iteration)
        window = options.get("window")
        steps = window_steps(6, 2, "sliding", iteration=iteration) if window == "sliding" else window
        rollout = sde_rollout(sampler, torch.randn(32, 2, generator=gen), None, 6, generator=gen, sde_steps=steps)
        rewards = toy_reward(rollout.samples)
        first = rewards.mean().item() if first is None else first
        advantages = group_advantages(rewards, torch.zeros(32, dtype=torch.long))
        old_model.load_state_dict(model.state_dict())
        for _ in range(2):
            if objective == "diffusion_nft":
                x_t, t, target, index = forward_process_batch(sampler.path, rollout.samples, 4, gen)
                with torch.no_grad():
                    v_old = old.velocity(x_t, t)
                loss, _ = nft_loss(
                    sampler.velocity(x_t, t), v_old, target, optimality_probability(advantages, 2.0)[index], 1.0
                )
            else:
                trained = steps.tolist() if steps is not None else range(5)
                loss = 0
                for k in trained:
                    log_probs, means, stds = transition_log_prob(
                        sampler,
                        rollout.states[k],
                        rollout.times[k],
                        rollout.next_times[k],
                        rollout.next_states[k],
                        None,
                    )
                    if options.get("ratio_norm"):
                        ratio = normalized_log_ratio(log_probs, rollout.log_probs[k], means, rollout.means[k], stds)
                        term, _ = grpo_loss(ratio, torch.zeros_like(ratio), advantages, 0.2)
                    else:
                        term, _ = grpo_loss(log_probs, rollout.log_probs[k], advantages, 0.2)
                    loss = loss + term / len(trained)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        fresh = sampler.sample_sde(
            torch.randn(256, 2, generator=torch.Generator().manual_seed(99)),
            None,
            6,
            0.7,
            torch.Generator().manual_seed(98),
        )
    return first, toy_reward(fresh).mean().item()


@pytest.mark.parametrize(
    "objective, options",
    [
        ("flow_grpo", {}),
        ("flow_grpo", {"window": torch.tensor([1, 2])}),
        ("flow_grpo", {"window": "sliding"}),
        ("flow_grpo", {"ratio_norm": True}),
        ("diffusion_nft", {}),
    ],
    ids=["flow_grpo", "window_fixed", "window_sliding", "ratio_norm", "diffusion_nft"],
)
def test_each_objective_raises_a_toy_reward_on_a_2d_problem(objective, options):
    """The seed's samples sit at (1, -2), a squared distance of ~8 from (3, 0); every objective must cut it to a
    quarter within 25 rollout batches. Measured: -7.7 (-8.4 windowed) -> -0.45 for each, near the floor of
    the samples' own spread (2 x 0.25 plus the SDE's)."""
    before, after = toy_run(objective, **options)
    assert after > before / 4, (before, after)
