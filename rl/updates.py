"""One iteration's policy updates on its rollout: grpo.num_inner optimizer steps on Flow-GRPO's clipped-ratio
loss, recomputed one rollout transition at a time (rl/grpo.py), or on DiffusionNFT's forward-process loss of
the rollout's final samples (rl/nft.py)."""

import copy

import torch
from omegaconf import DictConfig
from torch import Tensor

from rl.grpo import gaussian_kl, grpo_loss, normalized_log_ratio, step_weights
from rl.nft import forward_process_batch, nft_loss, optimality_probability
from rl.sde_sampler import select_timesteps, transition_log_prob, transition_step
from runtime import optimizer_step
from sampling import FlowSampler


class UpdateStatistics:
    """What one iteration's updates log: grpo_loss's statistics as running means over all (inner step,
    timestep) terms (ratio_min / ratio_max as min / max), the mean grad norm of the finite updates, the
    skipped ones, and |rho - 1| on the first update (0 up to rounding: the policy is still the sampler)."""

    EXTREMES = {"ratio_min": torch.minimum, "ratio_max": torch.maximum}

    def __init__(self, device):
        self.means_of = {}
        self.first_ratio_deviation = torch.zeros((), device=device)
        self.grad_norms = []

    def add(self, stats: dict[str, torch.Tensor], terms: int) -> None:
        for key, value in stats.items():
            if key in self.EXTREMES:
                self.means_of[key] = self.EXTREMES[key](self.means_of[key], value) if key in self.means_of else value
            else:
                self.means_of[key] = self.means_of.get(key, 0.0) + value / terms

    def first_update(self, log_probs: torch.Tensor, rollout_log_probs: torch.Tensor) -> None:
        deviation = (log_probs.detach() - rollout_log_probs).exp().sub(1).abs().max()
        self.first_ratio_deviation = torch.maximum(self.first_ratio_deviation, deviation)

    def values(self) -> dict[str, float]:
        grad_norms = torch.stack(self.grad_norms)
        finite = torch.isfinite(grad_norms)
        values = {f"grpo/{key}": float(value) for key, value in self.means_of.items()}
        values.update(
            {
                "grpo/grad_norm": grad_norms[finite].mean().item() if bool(finite.any()) else float("nan"),
                "grpo/skipped_updates": float((~finite).sum()),
                # |rho - 1| on the first update, where the policy is still the sampler: 0 up to rounding
                "grpo/first_update_ratio_deviation": float(self.first_ratio_deviation),
            }
        )
        return values


class ReferenceMeans:
    """The frozen seed policy's transition means along one rollout, for the KL term: fixed for the
    iteration, computed once per timestep k (reference_mean(k))."""

    def __init__(self, reference_policy: FlowSampler, rollout, grpo: DictConfig, autocast):
        self.policy, self.rollout, self.grpo, self.autocast = reference_policy, rollout, grpo, autocast
        self.means = {}

    def __call__(self, k: int) -> torch.Tensor:
        if k not in self.means:
            rollout, g = self.rollout, self.grpo
            with torch.no_grad(), self.autocast():
                self.means[k] = transition_step(self.policy, g.sampler)(
                    rollout.states[k],
                    rollout.times[k],
                    rollout.next_times[k],
                    rollout.labels,
                    g.noise_level,
                    g.guidance_scale,
                    tuple(g.guidance_interval),
                )[0]
        return self.means[k]


class PolicyUpdates:
    """The updates of grpo.objective on the policy's model. Called with the rollout, its advantages [B * G],
    the iteration's SDE window (or None), set_lr(inner) (the scheduled learning rate of update `inner`) and
    generator(*stream) (the iteration's seeded generators) -> the values to log. Skipped (non-finite)
    updates are counted by `nonfinite`."""

    def __init__(
        self,
        policy: FlowSampler,
        model,
        reference_policy: FlowSampler,
        optimizer,
        grpo: DictConfig,
        autocast,
        nonfinite,
    ):
        self.policy, self.model, self.reference_policy = policy, model, reference_policy
        self.optimizer, self.grpo, self.autocast, self.nonfinite = optimizer, grpo, autocast, nonfinite
        if grpo.objective == "diffusion_nft":  # the sampling ("old") policy, refreshed at each iteration
            self.old_model = copy.deepcopy(model).requires_grad_(False)
            self.old_policy = FlowSampler(self.old_model, policy.path, policy.prediction, policy.num_classes)

    def __call__(self, rollout, advantages: Tensor, window: Tensor | None, set_lr, generator) -> dict[str, float]:
        if self.grpo.objective == "diffusion_nft":
            return self.diffusion_nft(rollout, advantages, set_lr, generator)
        return self.flow_grpo(rollout, advantages, window, set_lr, generator)

    def flow_grpo(self, rollout, advantages: Tensor, window: Tensor | None, set_lr, generator) -> dict[str, float]:
        """num_inner optimizer steps on the GRPO loss of the rollout's transitions [B * G advantages]: the
        window's steps when given, else grpo.timestep_selection's."""
        g = self.grpo
        labels = rollout.labels
        reference_mean = ReferenceMeans(self.reference_policy, rollout, g, self.autocast)
        statistics = UpdateStatistics(advantages.device)
        weights = step_weights(rollout.times, rollout.next_times) if g.ratio_norm else None
        for inner in range(g.num_inner):
            set_lr(inner)
            if window is not None:
                steps = window.tolist()
            else:
                steps = select_timesteps(
                    rollout.num_steps, g.train_timesteps, generator(1, inner), g.timestep_selection
                ).tolist()
            terms = len(steps) * g.num_inner
            # One timestep at a time, on the rollout's own batch: the same arithmetic as the rollout, so
            # the first update's ratio is exactly 1; gradients accumulate over the timesteps.
            for k in steps:
                with self.autocast():
                    log_probs, means, stds = transition_log_prob(
                        self.policy,
                        rollout.states[k],
                        rollout.times[k],
                        rollout.next_times[k],
                        rollout.next_states[k],
                        labels,
                        g.noise_level,
                        g.guidance_scale,
                        g.log_prob_reduce,
                        g.detach_uncond,
                        tuple(g.guidance_interval),
                        g.sampler,
                    )
                kl = gaussian_kl(means, reference_mean(k), stds, g.log_prob_reduce) if g.kl_beta > 0 else None
                if g.ratio_norm:  # GRPO-Guard: unbiased, step-consistent ratios, 1 / dt step weights
                    normalized = normalized_log_ratio(
                        log_probs, rollout.log_probs[k], means, rollout.means[k], stds, g.log_prob_reduce
                    )
                    loss, stats = grpo_loss(
                        normalized, torch.zeros_like(normalized), advantages, g.clip_eps, kl, g.kl_beta
                    )
                    loss = loss * weights[k]
                else:
                    loss, stats = grpo_loss(log_probs, rollout.log_probs[k], advantages, g.clip_eps, kl, g.kl_beta)
                (loss / len(steps)).backward()
                if inner == 0:
                    statistics.first_update(log_probs, rollout.log_probs[k])
                statistics.add(stats, terms)
            grad_norm, nonfinite = optimizer_step(self.model, self.optimizer, g.grad_clip)
            self.nonfinite.update(nonfinite)
            statistics.grad_norms.append(grad_norm)
        return statistics.values()

    def diffusion_nft(self, rollout, advantages: Tensor, set_lr, generator) -> dict[str, float]:
        """num_inner optimizer steps on DiffusionNFT's loss (rl/nft.py) of the rollout's final samples, each
        noised grpo.nft.timesteps times per step; + kl_beta x the mean squared velocity gap to the seed (the
        forward-process counterpart of the Gaussian KL). The old policy is the one that drew the rollout."""
        g = self.grpo
        self.old_model.load_state_dict(self.model.state_dict())
        r = optimality_probability(advantages, g.nft.advantage_max)
        statistics = UpdateStatistics(advantages.device)
        samples = rollout.samples.detach()
        for inner in range(g.num_inner):
            set_lr(inner)
            x_t, t, target, index = forward_process_batch(
                self.policy.path, samples, g.nft.timesteps, generator(1, inner)
            )
            labels = rollout.labels[index] if rollout.labels is not None else None
            with self.autocast():
                v_theta = self.policy.velocity(x_t, t, labels)
                with torch.no_grad():
                    v_old = self.old_policy.velocity(x_t, t, labels)
                    v_ref = self.reference_policy.velocity(x_t, t, labels) if g.kl_beta > 0 else None
            loss, stats = nft_loss(v_theta, v_old, target, r[index], g.nft.beta)
            kl = (v_theta.float() - v_ref.float()).square().mean() if v_ref is not None else torch.zeros_like(loss)
            loss = loss + g.kl_beta * kl
            loss.backward()
            statistics.add({**stats, "kl": kl.detach(), "loss": loss.detach()}, g.num_inner)
            grad_norm, nonfinite = optimizer_step(self.model, self.optimizer, g.grad_clip)
            self.nonfinite.update(nonfinite)
            statistics.grad_norms.append(grad_norm)
        return statistics.values()
