"""The flow-matching trainer behind `python train.py` (and scripts/benchmark_train.py).

Owns the training loop: the micro-batch draws, the loss, DDP, AMP, compile, periodic evaluation and
checkpoints. The harness around it (devices, stop signal, logger, EMA, LR schedule, resume lookup,
the optimizer step) is runtime.py's, construction is build.py's, the maths is flow.py's.

Exact resume. The data order of epoch e is a permutation seeded by (seed, e); the global batch of
step s is split into world_size * grad_accum micro-batches, and micro-batch j draws its t, noise
and label dropout from a generator seeded by (seed, s, j). Nothing random depends on process
history, so a run killed anywhere and resumed from its last checkpoint replays the same steps
bit for bit (on CPU), and any (world_size, grad_accum) with the same product trains the same
model up to float summation order. The coupling (couplings.py: minibatch OT, reflow pairs) only
re-pairs a micro-batch's own draws, so it keeps both properties.

Exit codes (runtime.py): 0 done (or already finished), 75 (EX_TEMPFAIL) stopped by SIGTERM after
saving a checkpoint (requeue the same command to continue), 1 error.
"""

import contextlib
import math
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

import checkpoint as ckpt
import flow
from build import build_coupling, build_dataset, build_evaluator, build_flow, build_flow_map, build_model
from config import ConfigError
from figures import close_figure
from models import count_parameters
from run_dir import Run
from runtime import (
    EMA,
    EXIT_OK,
    EXIT_PREEMPTED,
    MetricLogger,
    NonfiniteGuard,
    RunError,
    Runtime,
    amp_dtype,
    derive_seed,
    distributed_model,
    epoch_permutation,
    learning_rate,
    optimizer_step,
    set_cpu_threads,
    set_learning_rate,
)

T_BINS = 10  # loss is also logged per t-bin of width 1/T_BINS
# On CPU, models below this many parameters train on one intra-op thread (training.threads = null): for
# the two-moons MLP two threads are 1.2x faster on an idle 2-core machine but 4x slower beside another
# busy process (docs/benchmarks.md); the U-Nets gain 1.65x from two threads and keep them.
SMALL_MODEL_PARAMETERS = 200_000
FINAL_OUTPUTS = ["samples.png", "samples.npz"]


def micro_batch_seed(seed: int, step: int, micro_index: int) -> int:
    """Seed of every random draw of one micro-batch; a function of position only (exact resume)."""
    return derive_seed(seed, step, micro_index)


def moe_load_metrics(model) -> dict[str, float]:
    """Expert-choice load of the last forward, averaged over MoE blocks: the fraction of tokens no
    expert picked (they skip the MLP), picked once, and picked by two or more."""
    load = getattr(model, "moe_load", lambda: {})()
    if not load:
        return {}
    mean = torch.stack(list(load.values())).mean(0).tolist()
    return {"moe/tokens_unpicked": mean[0], "moe/tokens_picked_once": mean[1], "moe/tokens_picked_2plus": mean[2]}


def masked_forward(model, forward_model, x1, x_t, t, y, generator):
    """Deferred token masking (models_dit.DiT) -> (output, loss mask): the kept tokens come from the
    micro-batch's generator (exact resume), drawn outside the model so a compiled forward has no generator
    in it; the loss counts only pixels of kept tokens."""
    keep_ids = model.sample_keep(x1.shape[0], model.grid**2, model.mask_ratio, generator, x1.device)
    output, keep = forward_model(x_t, t, y, keep_ids=keep_ids, return_mask=True)
    return output, model.loss_mask(keep, tuple(x1.shape[-2:]))


class StepMeter:
    """Running means of the logged training scalars between two log lines, kept on the device (no host
    sync per step). Skipped (non-finite) steps are kept out of every mean."""

    def __init__(self, device):
        self.bin_sums = torch.zeros(T_BINS, device=device)
        self.bin_counts = torch.zeros(T_BINS, device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.norm_sum = torch.zeros((), device=device)
        self.skipped = torch.zeros((), device=device)
        self.steps, self.started = 0, time.perf_counter()

    def add(self, loss, grad_norm, per_sample, t) -> None:
        finite = torch.isfinite(grad_norm)
        bins = (t * T_BINS).long().clamp_(0, T_BINS - 1)
        self.bin_sums.index_add_(0, bins, torch.where(finite, per_sample.float(), 0.0))
        self.bin_counts.index_add_(0, bins, finite.float().expand(per_sample.shape))
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.norm_sum += torch.where(finite, grad_norm, 0.0)
        self.skipped += (~finite).float()
        self.steps += 1

    def running_loss(self) -> float:
        """The mean loss since the last `values` call, without resetting (one host sync)."""
        return (self.loss_sum / max(self.steps - int(self.skipped), 1)).item()

    def values(self, batch_size: int) -> dict[str, float]:
        """The means since the last call (then reset): loss, grad norm, images/s and loss per t-bin."""
        elapsed = time.perf_counter() - self.started
        good_steps = max(self.steps - int(self.skipped), 1)
        values = {
            "train/loss": (self.loss_sum / good_steps).item(),
            "train/grad_norm": (self.norm_sum / good_steps).item(),
            "train/skipped_steps": float(self.skipped),
            "train/images_per_s": self.steps * batch_size / elapsed,
        }
        per_bin = (self.bin_sums / self.bin_counts.clamp(min=1)).tolist()
        values.update({f"loss_by_t/{i / T_BINS:.1f}-{(i + 1) / T_BINS:.1f}": v for i, v in enumerate(per_bin)})
        for total in (self.bin_sums, self.bin_counts, self.loss_sum, self.norm_sum, self.skipped):
            total.zero_()
        self.steps, self.started = 0, time.perf_counter()
        return values


def training_model(cfg: DictConfig, dataset, device) -> tuple[torch.nn.Module, bool]:
    """The model as trained -> (model, channels_last): the same initial weights on every rank and run, on
    the device (NHWC for images unless training.channels_last = false), the CPU threads chosen for its
    size; a class-conditional model needs a label for each of the dataset's classes."""
    tr = cfg.training
    torch.manual_seed(derive_seed(cfg.seed, 0x1A17))  # identical initial weights on every rank and run
    model = build_model(cfg.model).to(device)
    set_cpu_threads(device, tr.threads, small_model=count_parameters(model) < SMALL_MODEL_PARAMETERS)
    channels_last = len(dataset.sample_shape) == 3 and (tr.channels_last if tr.channels_last is not None else True)
    if channels_last:  # before the optimizer and EMA copy, so all share the NHWC layout
        model.to(memory_format=torch.channels_last)
    if hasattr(model, "num_classes") and model.num_classes < dataset.num_classes:
        raise ConfigError(
            f"model.num_classes = {model.num_classes} but dataset {dataset.name!r} has "
            f"{dataset.num_classes} classes; set model.num_classes >= {dataset.num_classes}"
        )
    return model, channels_last


class MicroBatches:
    """The seeded data draws of a run (module docstring): the data order of epoch e is a permutation seeded
    by (seed, e), the global batch of step s splits into world_size * grad_accum micro-batches, and
    micro-batch j draws its t, noise and label dropout from a generator seeded by (seed, s, j).

    The coupling (training.coupling, couplings.py) re-pairs each micro-batch's noise, and may replace the
    rows the permutation runs over by a reflow pair file (its samples and labels; the dataset passed in
    stays the real data, which evaluation compares against). null_label: what a dropped label becomes
    (None: unconditional)."""

    def __init__(self, dataset, time_sampler, cfg: DictConfig, runtime: Runtime, channels_last: bool, null_label):
        tr = cfg.training
        self.coupling = build_coupling(tr.coupling, dataset, null_label is not None, runtime.device)
        self.data, self.time_sampler = self.coupling.training_data(dataset), time_sampler
        self.seed, self.batch_size, self.p_uncond, self.device = cfg.seed, tr.batch_size, tr.p_uncond, runtime.device
        self.channels_last, self.null_label = channels_last, null_label
        self.micro_batches = runtime.world_size * tr.grad_accum
        if tr.batch_size % self.micro_batches:
            raise ConfigError(
                f"training.batch_size = {tr.batch_size} must be divisible by world_size * grad_accum = "
                f"{self.micro_batches}"
            )
        self.micro_batch_size = tr.batch_size // self.micro_batches
        self.steps_per_epoch = len(self.data) // tr.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"training.batch_size = {tr.batch_size} exceeds the dataset size {len(self.data)}")
        self.generator = torch.Generator(device=runtime.device)
        self._permutation = (None, None)  # (epoch, permutation) cache

    def global_batch_indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._permutation[0] != epoch:
            self._permutation = (epoch, epoch_permutation(len(self.data), self.seed, epoch, self.device))
        size = self.batch_size
        return self._permutation[1][position * size : (position + 1) * size]

    def micro_batch(self, step: int, micro_index: int):
        """Micro-batch j of step s: its slice of the global batch and its own seeded draws."""
        indices = self.global_batch_indices(step).view(self.micro_batches, self.micro_batch_size)[micro_index]
        self.generator.manual_seed(micro_batch_seed(self.seed, step, micro_index))
        x1, y = self.data.batch(indices, self.generator)
        t = self.time_sampler(x1.shape[0], self.generator, self.device)
        eps = torch.randn(x1.shape, generator=self.generator, device=x1.device, dtype=x1.dtype)
        # Re-pair the noise (couplings.py) with the labels as drawn, before label dropout: OT pairs
        # within a class, reflow takes its stored noise. Independent returns eps untouched.
        conditional = self.null_label is not None
        eps = self.coupling(x1, eps, y if conditional else None, indices)
        if self.channels_last:
            x1, eps = (v.contiguous(memory_format=torch.channels_last) for v in (x1, eps))
        if conditional:
            drop = torch.rand(y.shape, generator=self.generator, device=y.device) < self.p_uncond
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        else:
            y = None
        return x1, y, t, eps


# --- the trainer --------------------------------------------------------------------------------


class Trainer:
    """cfg: a validated training config. dataset: the training data (default: built from cfg.dataset;
    benchmarks pass synthetic data of the same shape)."""

    def __init__(self, cfg: DictConfig, runtime: Runtime, run_dir: Path, dataset=None):
        self.cfg, self.runtime, self.run_dir = cfg, runtime, run_dir
        tr = cfg.training
        device = runtime.device
        # Nothing touches the run dir before fit(): a constructor error leaves no trace on disk.
        self.log = MetricLogger(run_dir, enabled=False, tensorboard=False)

        self.dataset = build_dataset(cfg.dataset, device) if dataset is None else dataset
        self.model, self.channels_last = training_model(cfg, self.dataset, device)
        self.conditional = hasattr(self.model, "num_classes")
        self.masked = getattr(self.model, "mask_ratio", 0.0) > 0  # deferred token masking (models_dit.DiT)
        self.path, self.time_sampler, self.weighting = build_flow(cfg.flow)
        self.flow_map = build_flow_map(cfg.flow, self.path, self.time_sampler)  # None: flow matching
        null_label = self.model.num_classes if self.conditional else None
        if self.flow_map is not None and self.flow_map.guidance_scale != 1 and not self.conditional:
            raise ConfigError(
                f"flow.meanflow.guidance_scale = {self.flow_map.guidance_scale} folds CFG into the target, which "
                f"needs a class-conditional model; {type(self.model).__name__} has no labels (set it to 1.0)"
            )
        if self.flow_map is not None and self.flow_map.guidance_range is not None and not self.conditional:
            raise ConfigError(
                "flow.meanflow.guidance_condition = true folds CFG into the target, which needs a "
                f"class-conditional model; {type(self.model).__name__} has no labels (set it to false)"
            )
        self.batches = MicroBatches(self.dataset, self.time_sampler, cfg, runtime, self.channels_last, null_label)
        self.total_steps = tr.epochs * self.batches.steps_per_epoch  # LR-schedule horizon
        self.target_steps = self.total_steps if tr.max_steps is None else min(self.total_steps, tr.max_steps)

        # Fused AdamW (one kernel per step; also the fastest on CPU here) takes `found_inf`, which
        # skips a non-finite step on the device: no host sync per step to decide it.
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay, fused=True
        )
        self.ema = EMA(self.model, tr.ema_decay, tr.ema_warmup) if tr.ema else None
        self.amp_dtype = amp_dtype(tr.amp, device)
        use_compile = tr.compile if tr.compile is not None else device.type == "cuda"
        # A DiT built for masking but trained unmasked (the fine-tune stage) never uses its mask token.
        unused = getattr(self.model, "mask_token", None) is not None and not self.masked
        self.forward_model = distributed_model(
            torch.compile(self.model) if use_compile else self.model, runtime, find_unused_parameters=unused
        )
        self.step = 0
        self.nonfinite = NonfiniteGuard(tr.max_nonfinite_steps, device)

    # -- state --

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "ema_num_updates": self.ema.num_updates if self.ema else 0,
            "nonfinite_in_a_row": int(self.nonfinite.in_a_row),
            # The data position and every RNG stream are functions of the step (module docstring),
            # so these are recorded for inspection, not needed to resume.
            "epoch": self.step // self.batches.steps_per_epoch,
            "batch_in_epoch": self.step % self.batches.steps_per_epoch,
            "world_size": self.runtime.world_size,
        }

    def save(self) -> None:
        if self.runtime.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir,
                self.step,
                model=self.model.state_dict(),
                ema=self.ema.model.state_dict() if self.ema else None,
                state=self.state_dict(),
                config=self.cfg,
                keep_last=self.cfg.training.keep_last,
                meta={"sample_shape": list(self.dataset.sample_shape), "num_classes": self.dataset.num_classes},
            )
            self.log.print(f"saved {path}")
        if self.runtime.distributed:
            dist.barrier()

    def resume(self, run: Run | None = None) -> None:
        """Fresh start, or continue from training.resume (auto | PATH). Never overwrites a run. run: the
        open run directory (fit's); None reads the decision without holding it (tests, tools)."""
        run = Run(self.run_dir, self.runtime) if run is None else run
        source = run.checkpoint_to_resume(self.cfg.training.resume, self.cfg.training.start_over)
        if source is None:  # a fresh start, perhaps from training.init.checkpoint (checkpoint.init_from_checkpoint)
            init = self.cfg.training.init
            if init.checkpoint is not None:
                step, ema_updates, message = ckpt.init_from_checkpoint(
                    init, self.model, self.ema.model if self.ema else None, self.optimizer, self.runtime.device
                )
                if step is not None:
                    self.step = step
                    if self.ema:
                        self.ema.num_updates = ema_updates
                self.log.print(message)
            return
        loaded = ckpt.load_checkpoint(source, map_location=self.runtime.device, best=False)
        run.accept_resume(loaded.config, self.cfg, loaded.path, loaded.step)
        ckpt.load_weights(self.model, loaded.model, f"checkpoint {loaded.path} (model)")
        if self.ema:
            if loaded.ema is None:
                raise ckpt.CheckpointError(f"checkpoint {loaded.path} has no ema.safetensors but training.ema is on")
            ckpt.load_weights(self.ema.model, loaded.ema, f"checkpoint {loaded.path} (ema)")
            self.ema.num_updates = int(loaded.state["ema_num_updates"])
        self.optimizer.load_state_dict(loaded.state["optimizer"])
        self.nonfinite.in_a_row.fill_(int(loaded.state["nonfinite_in_a_row"]))
        self.step = loaded.step

    # -- one optimizer step --

    def micro_loss(self, step, x1, y, t, eps):
        """One micro-batch's (loss, per-sample losses, t as logged): flow matching, or the flow-map
        objective (flow_map.py), whose r (and guidance scales w) come from the micro-batch's generator after
        its other draws (exact resume; the same t, noise and labels as a flow-matching run of the same seed)."""
        autocast = partial(
            torch.autocast, self.runtime.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )
        if self.flow_map is not None:
            t, r, w = self.flow_map.draw(t, self.batches.generator, step)  # w: None unless guidance_condition
            loss, per_sample = self.flow_map.loss(
                self.model, self.forward_model, x1, eps, t, r, y, self.batches.null_label, autocast, w
            )
            return loss, per_sample, t
        x_t, _ = self.path.sample(x1, eps, t)
        with autocast():
            if self.masked:
                output, mask = masked_forward(self.model, self.forward_model, x1, x_t, t, y, self.batches.generator)
            else:
                output, mask = self.forward_model(x_t, t, y), None
        loss, per_sample = flow.flow_matching_loss(
            self.path,
            output,
            x1,
            eps,
            x_t,
            t,
            prediction=self.cfg.flow.prediction,
            weighting=self.weighting,
            mask=mask,
        )
        return loss, per_sample, t

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, grad_norm, per-sample losses, t) for logging, all on device."""
        tr = self.cfg.training
        step = self.step
        set_learning_rate(
            self.optimizer,
            learning_rate(step, tr.lr, tr.warmup_steps, self.total_steps, tr.lr_schedule, tr.min_lr_ratio),
        )
        per_sample_all, t_all, loss_sum = [], [], 0.0
        for accum_index in range(tr.grad_accum):
            micro_index = accum_index * self.runtime.world_size + self.runtime.rank
            x1, y, t, eps = self.batches.micro_batch(step, micro_index)
            # Only the last micro-step all-reduces gradients under DDP.
            sync = accum_index == tr.grad_accum - 1 or not self.runtime.distributed
            context = self.forward_model.no_sync() if not sync else contextlib.nullcontext()
            with context:
                loss, per_sample, t = self.micro_loss(step, x1, y, t, eps)
                (loss / tr.grad_accum).backward()
            per_sample_all.append(per_sample.detach())
            t_all.append(t)
            loss_sum = loss_sum + loss.detach()
        grad_norm, nonfinite = optimizer_step(self.model, self.optimizer, tr.grad_clip)
        if self.ema:
            self.ema.update(self.model, skip=nonfinite)
        self.nonfinite.update(nonfinite)
        self.step += 1
        return loss_sum / tr.grad_accum, grad_norm, torch.cat(per_sample_all), torch.cat(t_all)

    # -- the loop --

    def fit(self) -> int:
        """Train to target_steps, evaluate, write the final outputs, then the finished marker (run_dir.Run).
        A finished run is a no-op; SIGTERM saves a checkpoint and returns EXIT_PREEMPTED."""
        tr = self.cfg.training
        with Run(self.run_dir, self.runtime, tr.tensorboard, wandb=tr.wandb, wandb_project=tr.wandb_project) as run:
            self.log = run.log
            self.resume(run)
            self.evaluator = load_evaluator(self.cfg, self.runtime, self.dataset)
            if not run.start(self.cfg, self.step, self.target_steps):
                return EXIT_OK
            print_plan(self)
            meter = StepMeter(self.runtime.device)
            check_every = max(1, min(tr.log_every, tr.max_nonfinite_steps // 2))
            bar = self.log.progress(self.target_steps, self.step, tr.progress, self.cfg.experiment)
            first_step, early = self.step, {2**k for k in range(max(tr.log_every, 1).bit_length())}
            while self.step < self.target_steps:
                loss, grad_norm, per_sample, t = self.train_step()
                meter.add(loss, grad_norm, per_sample, t)
                bar.update(1)
                at_log = self.step % tr.log_every == 0 or self.step == self.target_steps
                # the device counters are read every check_every steps: an abort comes after between
                # max_nonfinite_steps and 1.5x that many skipped steps in a row
                if at_log or self.step % check_every == 0:
                    self.nonfinite.check(self.step, self.run_dir, self.log.print, summarise=at_log)
                if at_log:
                    values = {
                        **meter.values(tr.batch_size),
                        "train/lr": self.optimizer.param_groups[0]["lr"],
                        "train/epoch": self.step / self.batches.steps_per_epoch,
                        **moe_load_metrics(self.model),
                    }
                    self.log.scalars(self.step, values)
                    bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}")
                elif self.step - first_step in early:
                    # before the first log line the bar shows the running loss at 1, 2, 4, ... steps in:
                    # a few host syncs, not one per step
                    lr = self.optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{meter.running_loss():.4f}", lr=f"{lr:.2e}")
                stop, save, evaluate = run.due(self.step, self.target_steps, tr)
                if save:
                    self.nonfinite.check(self.step, self.run_dir, self.log.print)
                    self.save()
                if stop:
                    return EXIT_PREEMPTED
                if evaluate:
                    run_evaluation(self, final=False)
            bar.close()
            with run.final_phase():
                run_evaluation(self, final=True)
                run.finish(self.step, FINAL_OUTPUTS)
        return EXIT_OK


@torch.no_grad()
def run_evaluation(trainer: Trainer, final: bool) -> None:
    """The trainer's periodic (final=False) and last evaluation: sample with the EMA (else raw) model using the
    run's solver settings; log the scores and a figure; at the end also write samples.png / samples.npz to the
    run dir (evaluation.Evaluator). Rank 0 only; the model is left in train mode."""
    if not trainer.runtime.is_main:
        return
    from sampling import FlowSampler, NonFiniteSamplesError

    tr, evaluator = trainer.cfg.training, trainer.evaluator
    model = trainer.ema.model if trainer.ema else trainer.model
    model.eval()
    sampler = FlowSampler(
        model, trainer.path, trainer.cfg.flow.prediction, num_classes=getattr(trainer.model, "num_classes", None)
    )
    total = evaluator.evaluation_images(tr.num_eval_samples, tr.fid_samples)
    what = "final evaluation" if final else f"evaluation at step {trainer.step}"
    try:
        with trainer.log.progress(total, 0, tr.progress, what, unit="img") as bar:
            scores, samples, labels, latents = evaluator.evaluate(
                sampler, trainer.cfg.solver, tr.num_eval_samples, trainer.cfg.seed, tr.fid_samples, progress=bar.update
            )
    except NonFiniteSamplesError as error:
        if final:
            raise RunError(f"final evaluation at step {trainer.step}: {error}") from None
        trainer.log.print(f"WARNING: evaluation at step {trainer.step} skipped: {error}")
        trainer.model.train()
        return
    bad = [k for k, v in scores.items() if not math.isfinite(v)]
    if final and bad:
        raise RunError(
            f"final evaluation at step {trainer.step}: {', '.join(f'{k} = {scores[k]}' for k in bad)} "
            f"(the samples are finite; is the data? a NaN or inf in the dataset gives this)"
        )
    trainer.log.scalars(trainer.step, {f"eval/{k}": v for k, v in scores.items()})
    figure = evaluator.figure(samples, labels, trainer.cfg.solver)
    trainer.log.figure(trainer.step, "samples", figure)
    if final:
        evaluator.save(trainer.run_dir, samples, labels, latents, figure=figure)
        trainer.log.print(
            f"samples: {trainer.run_dir / 'samples.png'} " + " ".join(f"{k}={v:.4f}" for k, v in scores.items())
        )
    close_figure(figure)
    trainer.model.train()


def print_plan(trainer: Trainer) -> None:
    """The run's one-line summary, after a note when training.max_steps outruns the LR schedule."""
    tr, log, model, runtime = trainer.cfg.training, trainer.log, trainer.model, trainer.runtime
    if tr.max_steps is not None and tr.max_steps > trainer.total_steps:
        log.print(
            f"note: training.max_steps = {tr.max_steps} exceeds the LR schedule's {trainer.total_steps} steps "
            f"(training.epochs = {tr.epochs} x {trainer.batches.steps_per_epoch} steps per epoch); training stops at "
            f"{trainer.total_steps}. Raise training.epochs to train longer."
        )
    log.print(
        f"{trainer.cfg.experiment}: {type(model).__name__} with {count_parameters(model):,} parameters on "
        f"{runtime.device} x{runtime.world_size} ({torch.get_num_threads()} threads); "
        f"{len(trainer.batches.data):,} samples ({tr.coupling.name} coupling), batch {tr.batch_size}, "
        f"steps {trainer.step} -> {trainer.target_steps} (schedule {trainer.total_steps}); run dir {trainer.run_dir}"
    )


def load_evaluator(cfg: DictConfig, runtime: Runtime, dataset):
    """Rank 0's evaluation tools (the VAE decoder of a latent dataset, the metrics classifier, the
    Inception reference), loaded before the first step so a wrong path fails now; None on other ranks."""
    if not runtime.is_main:
        return None
    tr = cfg.training
    return build_evaluator(
        cfg.dataset,
        runtime.device,
        classifier=tr.classifier,
        fid_reference=tr.fid_reference,
        inception_weights=tr.inception_weights,
        num_samples=tr.num_eval_samples,
        seed=cfg.seed,
        dataset=dataset,
    )
