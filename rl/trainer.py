"""Flow-GRPO post-training: the trainer behind `python train_grpo.py`.

A trained flow model becomes a Gaussian policy through the SDE of `rl/sde_sampler.py`, and is
post-trained on a black-box terminal reward (`rl/reward.py`) with GRPO (`rl/grpo.py`). One iteration:

1. rollouts: batch_size prompts (class labels) x group_size SDE trajectories of rollout_steps steps,
   each transition's log pi stored (the model in eval mode, so the function is deterministic);
2. rewards of the final samples, turned into advantages relative to each prompt's group;
3. num_inner optimizer steps on the clipped-ratio loss + kl_beta x the Gaussian KL to the frozen
   seed. Each step recomputes log pi one rollout timestep at a time, with the same batch as the
   rollout (so on the first step the ratio is exactly 1) and accumulates the gradient over them.
   Variants (grpo.*): a window of SDE steps in otherwise-ODE rollouts (window.*, only the window
   trained), GRPO-Guard's ratio normalisation (ratio_norm), a cosine lr schedule, and in place of the
   ratio loss DiffusionNFT's forward-process objective (objective=diffusion_nft, rl/nft.py).

Every evaluation (the seed's at iteration 0, every training.eval_every, the final one) scores the same ODE
and SDE samples by the reward (its total and each term), the evaluation classifier (accuracy, classifier-FD
to held-out data, per-class diversity) and compressibility, and relates them to the seed's. With
grpo.guard.enabled the fidelity guard (rl/guard.py) checks its constraint there, keeps the best checkpoint
that satisfies it as RUN/checkpoints/best.json, and rolls back or stops after repeated violations.

The run directory's lifecycle (owner lock, resume, SIGTERM -> save and exit 75, the finished marker) is
run_dir.Run's, as for train.py; checkpoints are checkpoint.py's. Checkpoints carry the seed's model, flow,
dataset and solver sections, so `inference.py checkpoint=RUN` samples a post-trained run.

Exact resume: the prompts, rollout noise and timestep subsets of iteration i come from generators
seeded by (seed, i), and the reference policy is re-read from the seed checkpoint, so a run killed
anywhere and resumed from its last checkpoint replays the same iterations bit for bit (on CPU).
"""

import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

import checkpoint as ckpt
from build import build_evaluator, load_run
from config import ConfigError, solver_overrides, to_plain
from figures import close_figure, comparison_figure
from models import count_parameters
from rl.grpo import group_advantages
from rl.guard import FidelityGuard
from rl.reward import build_reward
from rl.sde_sampler import sde_rollout, window_steps
from rl.updates import PolicyUpdates
from run_dir import Run
from runtime import (
    EXIT_OK,
    EXIT_PREEMPTED,
    MetricLogger,
    NonfiniteGuard,
    RunError,
    amp_dtype,
    derive_seed,
    learning_rate,
    set_learning_rate,
)
from sampling import FlowSampler

FINAL_OUTPUTS = ["samples.png", "samples.npz", "eval.json"]


def run_config(cfg: DictConfig, seed_config: DictConfig, solver: DictConfig, seed_path, seed_step: int) -> DictConfig:
    """This run's config plus the seed's model / flow / dataset and the evaluation solver: what
    checkpoints record, so inference.py and resume need nothing else."""
    run = OmegaConf.create(to_plain(cfg))
    run.solver = solver
    for section in ("model", "flow", "dataset"):
        run[section] = seed_config[section]
    run.seed_checkpoint_resolved = {"path": str(seed_path), "step": seed_step}
    return run


def draw_prompts(grpo: DictConfig, num_classes: int | None, generator: torch.Generator, device) -> torch.Tensor | None:
    """grpo.batch_size class labels, each repeated grpo.group_size times -> [B * G] (None: unconditional).
    Distinct classes when batch_size <= num_classes."""
    if num_classes is None:
        return None
    if grpo.batch_size <= num_classes:
        prompts = torch.randperm(num_classes, generator=generator, device=device)[: grpo.batch_size]
    else:
        prompts = torch.randint(num_classes, (grpo.batch_size,), generator=generator, device=device)
    return prompts.repeat_interleave(grpo.group_size)


def collect_rollout(
    policy: FlowSampler, reward, grpo: DictConfig, num_classes, sample_shape, generator, autocast, sde_steps=None
):
    """batch_size prompts x group_size SDE trajectories from the generator's noise (this iteration's) ->
    (Rollout, rewards [B * G]). sde_steps: a window's SDE steps (rl/sde_sampler.py: window_steps), None = all."""
    g, device = grpo, generator.device
    labels = draw_prompts(g, num_classes, generator, device)
    noise = torch.randn((g.batch_size * g.group_size, *sample_shape), generator=generator, device=device)
    with autocast():
        rollout = sde_rollout(
            policy,
            noise,
            labels,
            g.rollout_steps,
            g.noise_level,
            g.guidance_scale,
            generator=generator,
            log_prob_reduce=g.log_prob_reduce,
            guidance_interval=tuple(g.guidance_interval),
            sde_steps=sde_steps,
            kind=g.sampler,
        )
    return rollout, reward(rollout.samples, labels)


def load_seed(cfg: DictConfig, device):
    """The seed's EMA (or raw) weights on the device, in eval mode throughout: rollouts and recomputed
    log-probs must be the same function. The evaluation solver: the seed's, with solver.* overrides."""
    seed = load_run(
        cfg.seed_checkpoint, device, use_ema=cfg.grpo.init_from_ema, solver_overrides=solver_overrides(cfg.solver)
    )
    if len(seed.sample_shape) != 3:
        raise ConfigError(
            f"seed_checkpoint = {cfg.seed_checkpoint!r} was trained on {seed.config.dataset.name!r} "
            f"samples of shape {list(seed.sample_shape)}; Flow-GRPO's rewards score images, so the "
            f"seed must be an image model [C, H, W] (e.g. a digits_cfg run)"
        )
    return seed


def check_schedule_horizon(g: DictConfig, changes: dict, path) -> None:
    """A scheduled (non-constant) lr is a function of grpo.epochs: a resume may not change it."""
    if g.lr_schedule != "constant" and "grpo.epochs" in changes:
        raise ConfigError(
            f"grpo.epochs = {g.epochs}: resuming {path} (grpo.epochs = {changes['grpo.epochs'][0]}) would change "
            f"its grpo.lr_schedule = {g.lr_schedule} horizon; resume with the original grpo.epochs "
            f"(training.max_steps stops it earlier)"
        )


def iteration_window(g: DictConfig, step: int) -> torch.Tensor | None:
    """Iteration `step`'s SDE window (grpo.window.*), None when windows are off."""
    w = g.window
    return None if w.size is None else window_steps(g.rollout_steps, w.size, w.mode, w.start, w.stride, w.every, step)


def load_evaluator(cfg: DictConfig, run_config: DictConfig, sample_shape, device):
    """The seed's data and the metrics classifier, loaded before the first iteration (a wrong path fails now)."""
    tr = cfg.training
    return build_evaluator(
        run_config.dataset,
        device,
        sample_shape=sample_shape,
        classifier=tr.classifier,
        num_samples=tr.num_eval_samples,
        seed=cfg.seed,
        decode_latents=False,
    )


@torch.no_grad()
def evaluate_policy(
    policy: FlowSampler, evaluator, reward, solver, cfg: DictConfig, final: bool, step: int, progress=None
):
    """The same labels and noise every time: deterministic ODE samples with the solver and SDE samples as in
    the rollouts, each scored by the reward (total and eval/{kind}/reward/<term>) and the image metrics
    (eval/{kind}/...; the classifier's real-vs-real floor once, as eval/classifier_fd_real_floor) ->
    (values, ODE samples, labels); a non-finite value at the final evaluation is an error. progress: None or a
    callable given the images drawn, 2 x training.num_eval_samples in all (ODE, then SDE)."""
    g, device = cfg.grpo, evaluator.device
    num_samples, seed = cfg.training.num_eval_samples, cfg.seed
    started = time.perf_counter()
    ode, labels, _ = evaluator.sample(policy, solver, num_samples, seed, progress=progress)
    noise = torch.randn((len(ode), *evaluator.sample_shape), generator=torch.Generator().manual_seed(seed))
    device_labels = labels.to(device) if labels is not None else None
    if g.sampler == "sde":
        sde = policy.sample_sde(
            noise.to(device),
            device_labels,
            g.rollout_steps,
            g.noise_level,
            torch.Generator(device).manual_seed(seed),
            g.guidance_scale,
            tuple(g.guidance_interval),
        )
    else:  # the rollouts' own stochastic step
        sde = sde_rollout(
            policy,
            noise.to(device),
            device_labels,
            g.rollout_steps,
            g.noise_level,
            g.guidance_scale,
            torch.Generator(device).manual_seed(seed),
            guidance_interval=tuple(g.guidance_interval),
            kind=g.sampler,
        ).samples
    if progress is not None:
        progress(len(ode))
    values = {"eval/sampling_s": time.perf_counter() - started}
    for kind, samples in (("ode", ode), ("sde", sde.float().cpu())):
        on_device = samples.to(device)
        values[f"eval/{kind}/reward"] = reward(on_device, device_labels).mean().item()
        # each term of a weighted sum unweighted (the call above set last_terms); a single reward is its own term
        terms = getattr(reward, "last_terms", None) or {reward.name: values[f"eval/{kind}/reward"]}
        values.update({f"eval/{kind}/reward/{name}": value for name, value in terms.items()})
        scores = evaluator.score(on_device if evaluator.classifier else samples, labels)
        if "classifier_fd_real_floor" in scores:
            values["eval/classifier_fd_real_floor"] = scores.pop("classifier_fd_real_floor")
        values.update({f"eval/{kind}/{key}": value for key, value in scores.items()})
    # diversity is NaN where no class has two samples: reported as it is, never an error
    bad = [k for k, v in values.items() if not math.isfinite(v) and "diversity" not in k]
    if final and bad:
        raise RunError(f"final evaluation at iteration {step}: {', '.join(f'{k} = {values[k]}' for k in bad)}")
    return values, ode, labels


class GRPOTrainer:
    def __init__(self, cfg: DictConfig, runtime, run_dir: Path):
        self.cfg, self.runtime, self.run_dir = cfg, runtime, run_dir
        if runtime.distributed:
            raise ConfigError("train_grpo.py runs in one process (WORLD_SIZE = 1); launch it with python, not torchrun")
        device = runtime.device
        self.log = MetricLogger(run_dir, enabled=False, tensorboard=False)  # opened by fit(), under the lock

        seed = load_seed(cfg, device)
        self.policy, self.model, self.num_classes = seed.sampler, seed.model, seed.sampler.num_classes
        self.reference = copy.deepcopy(self.model).requires_grad_(False)  # the frozen seed policy
        self.reference_policy = FlowSampler(self.reference, self.policy.path, self.policy.prediction, self.num_classes)
        self.sample_shape = seed.sample_shape
        self.seed_path, self.seed_step = seed.checkpoint.path, seed.checkpoint.step
        self.run_config = run_config(cfg, seed.config, seed.solver, self.seed_path, self.seed_step)
        self.reward = build_reward(cfg.reward, device)

        g = cfg.grpo
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=g.lr, betas=tuple(g.betas), weight_decay=g.weight_decay, fused=True
        )
        self.amp_dtype = amp_dtype(cfg.training.amp, device)
        self.target_steps = g.epochs if cfg.training.max_steps is None else min(g.epochs, cfg.training.max_steps)
        self.step = 0
        self.nonfinite = NonfiniteGuard(cfg.training.max_nonfinite_steps, device, "iteration", "grpo.lr")
        self._seed_samples = None
        self.seed_eval = None  # the iteration-0 evaluation's values: every later one is related to them
        self.guard = FidelityGuard(g.guard) if g.guard.enabled else None
        self.updates = PolicyUpdates(
            self.policy, self.model, self.reference_policy, self.optimizer, g, self.autocast, self.nonfinite
        )

    def autocast(self):
        device_type = self.runtime.device.type
        return torch.autocast(device_type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    # -- state --

    def save(self) -> None:
        state = {"optimizer": self.optimizer.state_dict(), "nonfinite_in_a_row": int(self.nonfinite.in_a_row)}
        if self.seed_eval is not None:
            state["seed_eval"] = self.seed_eval
        if self.guard is not None:
            state["guard"] = self.guard.state_dict()
        path = ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            model=self.model.state_dict(),
            ema=None,
            state=state,
            config=self.run_config,
            keep_last=self.cfg.training.keep_last,
            meta={"sample_shape": list(self.sample_shape), "num_classes": self.num_classes},
            protect=self.guard.protected_steps() if self.guard is not None else None,
        )
        self.log.print(f"saved {path}")
        self.publish_best()

    def publish_best(self) -> None:
        """RUN/checkpoints/best.json -> the guard's best checkpoint, once it exists on disk."""
        if self.guard is None or self.guard.best_step is None or self.guard.best_step > self.step:
            return
        record = {"reward": self.guard.best_reward, "constraint": self.guard.describe()}
        ckpt.write_best(self.run_dir, self.guard.best_step, record)

    def restore(self, step: int) -> None:
        """The guard's rollback: this run's checkpoint at `step` -> the model's weights and the optimizer state."""
        loaded = ckpt.load_checkpoint(
            self.run_dir / "checkpoints" / ckpt.step_dir_name(step), map_location=self.runtime.device, load_ema=False
        )
        ckpt.load_weights(self.model, loaded.model, f"checkpoint {loaded.path} (model)")
        self.optimizer.load_state_dict(loaded.state["optimizer"])

    def resume(self, run: Run) -> None:
        source = run.checkpoint_to_resume(self.cfg.training.resume, self.cfg.training.start_over)
        if source is None:
            return
        loaded = ckpt.load_checkpoint(source, map_location=self.runtime.device, load_ema=False, best=False)
        changes = run.accept_resume(
            loaded.config, self.run_config, loaded.path, loaded.step, "iteration"
        )  # same seed, recipe, reward
        check_schedule_horizon(self.cfg.grpo, changes, loaded.path)
        ckpt.load_weights(self.model, loaded.model, f"checkpoint {loaded.path} (model)")
        self.optimizer.load_state_dict(loaded.state["optimizer"])
        self.nonfinite.in_a_row.fill_(int(loaded.state["nonfinite_in_a_row"]))
        self.step = loaded.step
        self.seed_eval = loaded.state.get("seed_eval")
        if self.guard is not None and "guard" in loaded.state:
            self.guard.load_state_dict(loaded.state["guard"])
            if self.guard.stopped:  # the guard ended this run here: nothing left to train
                self.target_steps = min(self.target_steps, self.step)

    # -- one iteration --

    def generator(self, *stream: int) -> torch.Generator:
        """A generator seeded by (seed, iteration, stream...): a function of position only."""
        return torch.Generator(self.runtime.device).manual_seed(derive_seed(self.cfg.seed, self.step, *stream))

    def iteration(self) -> dict[str, float]:
        """One rollout batch and its num_inner updates; returns the values to log."""
        g = self.cfg.grpo
        started = time.perf_counter()
        window = iteration_window(g, self.step)
        rollout, rewards = collect_rollout(
            self.policy,
            self.reward,
            g,
            self.num_classes,
            self.sample_shape,
            self.generator(0),
            self.autocast,
            sde_steps=window,
        )
        # Groups are prompts; an unconditional model has one group per iteration.
        group_ids = rollout.labels if rollout.labels is not None else torch.zeros_like(rewards, dtype=torch.long)
        advantages, group = group_advantages(
            rewards, group_ids, g.advantage_eps, g.global_std, g.advantage_clip, g.advantage_scale, return_stats=True
        )
        rollout_seconds = time.perf_counter() - started
        values = self.updates(rollout, advantages, window, self.set_lr, self.generator)
        self.nonfinite.check(self.step, self.run_dir, self.log.print)
        self.step += 1
        values.update(
            {
                "reward/mean": rewards.mean().item(),
                "reward/std": rewards.std(correction=0).item(),
                "reward/zero_std_fraction": float(group.zero_std_fraction),
                **{f"reward/{name}": value for name, value in getattr(self.reward, "last_terms", {}).items()},
                "grpo/lr": self.optimizer.param_groups[0]["lr"],
                "time/rollout_s": rollout_seconds,
                "time/iteration_s": time.perf_counter() - started,
            }
        )
        return values

    def set_lr(self, inner: int) -> None:
        """The scheduled learning rate of update `inner` of this iteration, times the guard's rollback factor."""
        g = self.cfg.grpo
        lr = learning_rate(
            self.step * g.num_inner + inner, g.lr, g.warmup_steps, g.epochs * g.num_inner, g.lr_schedule, g.min_lr_ratio
        )
        set_learning_rate(self.optimizer, lr * (self.guard.lr_scale if self.guard is not None else 1.0))

    # -- the loop --

    def fit(self) -> int:
        """Post-train to target_steps, evaluate, write samples and eval.json, then the finished marker
        (run_dir.Run). A finished run is a no-op; SIGTERM saves a checkpoint and returns EXIT_PREEMPTED.
        At an evaluation step the evaluation (and the guard's decision) comes before the save, so the
        checkpoint holds what the guard decided and a resume continues from there."""
        tr = self.cfg.training
        with Run(self.run_dir, self.runtime, tr.tensorboard, wandb=tr.wandb, wandb_project=tr.wandb_project) as run:
            self.log = run.log
            self.resume(run)
            self.evaluator = load_evaluator(self.cfg, self.run_config, self.sample_shape, self.runtime.device)
            if not run.start(self.run_config, self.step, self.target_steps, "iteration"):
                return EXIT_OK
            print_plan(self)
            first_step = self.step
            if self.step == 0 and self.seed_eval is None:
                self.evaluate(final=False)  # the seed's numbers, the "before" of every comparison
                if self.guard is not None:
                    self.target_steps = 0 if self.guard.stopped else self.target_steps
                    self.save()  # the seed is the first rollback target
            elif self.guard is not None and self.guard.owes_check(self.step, tr.eval_every, self.target_steps):
                # A shorter run (training.max_steps) ended here: its last checkpoint was written before this
                # step's evaluation, which its final one was. Decide here as an uninterrupted run does, and
                # replace that checkpoint with one that holds the decision.
                self.evaluate(final=False)
                if self.guard.stopped:
                    self.target_steps = self.step
                shutil.rmtree(self.run_dir / "checkpoints" / ckpt.step_dir_name(self.step))
                self.save()
            bar = self.log.progress(self.target_steps, self.step, tr.progress, self.cfg.experiment)
            while self.step < self.target_steps:
                values = self.iteration()
                bar.update(1)
                bar.set_postfix(reward=f"{values['reward/mean']:.4f}", kl=f"{values['grpo/kl']:.2e}")
                if self.step % tr.log_every == 0 or self.step == self.target_steps:
                    self.log.scalars(self.step, values)
                stop, save, evaluate = run.due(self.step, self.target_steps, tr, "iteration")
                if self.guard is not None and stop and tr.eval_every and self.step % tr.eval_every == 0:
                    # guarded: the checkpoint of an evaluation step holds the guard's decision there
                    evaluate = self.step != self.target_steps
                if evaluate:  # unguarded, never when stopping
                    self.evaluate(final=False)
                    if self.guard is not None:
                        save = True  # a checkpoint at every guarded evaluation: rollback target, best
                        if self.guard.stopped:
                            self.target_steps = self.step
                if save:
                    self.save()
                if stop:
                    return EXIT_PREEMPTED
            bar.close()
            updates = (self.step - first_step) * self.cfg.grpo.num_inner
            if updates and int(self.nonfinite.total) >= updates:
                raise RunError(
                    f"every one of this run's {updates} GRPO updates had a non-finite gradient norm and was skipped, "
                    f"so the policy is still the seed; not publishing it as post-trained (check the reward for "
                    f"NaN/inf and try a lower grpo.lr)"
                )
            with run.final_phase():
                self.evaluate(final=True)
                record = {"guard": self.guard.summary()} if self.guard is not None else None
                run.finish(self.step, FINAL_OUTPUTS, record)
        return EXIT_OK

    @torch.no_grad()
    def evaluate(self, final: bool) -> dict[str, float]:
        """The same labels and noise every time: deterministic ODE samples with the run's solver and SDE
        samples as in the rollouts, each scored by the reward (and each of its terms) and the image metrics,
        with ratios to the seed's (iteration 0) values; the guard's check and action. Logs a seed | current
        grid; at the end also writes samples.png / samples.npz and eval.json (with the seed's values and the
        guard's verdict) to the run dir."""
        tr, num = self.cfg.training, self.cfg.training.num_eval_samples
        what = "final evaluation" if final else f"evaluation at iteration {self.step}"
        with self.log.progress(2 * num, 0, tr.progress, what, unit="img") as bar:
            run = (self.run_config.solver, self.cfg, final, self.step)
            values, ode, labels = evaluate_policy(self.policy, self.evaluator, self.reward, *run, progress=bar.update)
        if self.seed_eval is None and self.step == 0:
            self.seed_eval = {k: v for k, v in values.items() if k != "eval/sampling_s"}
        values.update(relative_to_seed(values, self.seed_eval))
        if self.guard is not None:
            values.update(
                guard_acts(
                    self.guard, self.step, values, final, self.run_dir, self.restore, self.publish_best, self.log.warn
                )
            )
        self.log.scalars(self.step, values)
        if self._seed_samples is None and self.step == 0:  # the seed's ODE samples, for the seed | current grid
            self._seed_samples = ode
        elif self._seed_samples is None:  # resumed: the frozen seed samples them again, same noise
            self._seed_samples = self.evaluator.sample(
                self.reference_policy, self.run_config.solver, num, self.cfg.seed
            )[0]
        log_comparison(self.log, self.step, self._seed_samples, ode, labels, self.run_config, self.evaluator)
        if final:
            self.evaluator.save(self.run_dir, ode, labels, solver=self.run_config.solver)
            write_eval_json(self.run_dir, self.step, values, self.seed_eval, self.guard)
        self.log.print(
            f"eval @ {self.step}: " + " ".join(f"{k.removeprefix('eval/')}={v:.4f}" for k, v in values.items())
        )
        return values


def guard_acts(guard, step: int, values: dict, final: bool, run_dir, restore, publish_best, warn) -> dict[str, float]:
    """The guard's check of the evaluation at `step` and its action (rollback: restore(step) of the last good
    checkpoint; stop: the same, the loop then ends), each said through warn (stderr) -> the guard/* values.
    At the final evaluation publish_best() names the best checkpoint, and a failing final policy is said."""
    decision = guard.check(step, values, final)
    if decision.kind in ("rollback", "stop") and decision.restore_step is not None:
        restore(decision.restore_step)
    if decision.kind in ("violation", "rollback", "stop"):
        warn(f"GUARD: {decision.message}")
    if final:
        publish_best()  # the final checkpoint exists: it may be the best
        if not decision.satisfied:
            best = (
                f"the best policy that satisfies it is iteration {guard.best_step}'s, named by "
                f"{run_dir / 'checkpoints' / ckpt.BEST}: `inference.py checkpoint={run_dir}` samples it"
                if guard.best_step is not None
                else "no evaluated policy satisfied it, not even the seed: nothing is published as best"
            )
            warn(f"GUARD: the final policy (iteration {step}) fails the run's constraint ({guard.describe()}); {best}")
    if guard.stopped and (decision.kind == "stop" or final):
        warn(f"GUARD: the run was stopped at iteration {step}: {guard.stopped}")
    return {
        "guard/satisfied": float(decision.satisfied),
        "guard/violations_in_a_row": float(guard.violations),
        "guard/rollbacks": float(guard.rollbacks),
        "guard/lr_scale": guard.lr_scale,
        "guard/best_step": float(guard.best_step if guard.best_step is not None else -1),
    }


def log_comparison(log, step: int, seed_samples, samples, labels, run_config: DictConfig, evaluator) -> None:
    """The seed | current grid of the same labels and noise, to TensorBoard."""
    figure = comparison_figure(seed_samples, samples, labels, run_config.dataset.name, evaluator.class_names)
    log.figure(step, "samples/seed_vs_current", figure)
    close_figure(figure)


def write_eval_json(run_dir: Path, step: int, values: dict, seed_eval: dict | None, guard) -> None:
    """RUN/eval.json: the final evaluation, the seed's values and the guard's verdict."""
    result = {"iteration": step, **values, "seed": seed_eval} | ({"guard": guard.summary()} if guard else {})
    ckpt.atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))


RELATIVE_KEYS = ("classifier_fd", "jpeg_bpp", "class_diversity")


def relative_to_seed(values: dict[str, float], seed: dict[str, float] | None) -> dict[str, float]:
    """eval/<kind>/<key>_vs_seed = value / the seed's (iteration 0) for the fidelity and size metrics."""
    if not seed:
        return {}
    out = {}
    for kind in ("ode", "sde"):
        for key in RELATIVE_KEYS:
            name = f"eval/{kind}/{key}"
            if name in values and seed.get(name):
                out[f"{name}_vs_seed"] = values[name] / seed[name]
    return out


def print_plan(trainer: GRPOTrainer) -> None:
    """The run's one-line summary: seed, reward, recipe and iterations."""
    g = trainer.cfg.grpo
    trainer.log.print(
        f"{trainer.cfg.experiment}: GRPO on {type(trainer.model).__name__} ({count_parameters(trainer.model):,} "
        f"parameters) from {trainer.seed_path} (step {trainer.seed_step}) on {trainer.runtime.device}; reward "
        f"{trainer.reward.name}; {g.batch_size} prompts x G={g.group_size}, T_rollout={g.rollout_steps}, "
        f"num_inner={g.num_inner}; objective {describe_objective(g)}; iterations {trainer.step} -> "
        f"{trainer.target_steps}; run dir {trainer.run_dir}"
    )
    if trainer.guard is not None:
        trainer.log.print(f"fidelity guard: {trainer.guard.describe()} (grpo.guard.*)")


def describe_objective(g: DictConfig) -> str:
    """'flow_grpo, window 3 sliding, ratio_norm, lr cosine': the update rule in a few words."""
    parts = [g.objective] + (["cps sampler"] if g.sampler == "cps" else [])
    if g.window.size is not None:
        parts.append(f"window {g.window.size} {g.window.mode}")
    if g.ratio_norm:
        parts.append("ratio_norm")
    if g.lr_schedule != "constant":
        parts.append(f"lr {g.lr_schedule}")
    return ", ".join(parts)
