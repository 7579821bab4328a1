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
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import checkpoint as ckpt
import flow
from build import build_coupling, build_dataset, build_flow, build_model, load_eval_classifier
from config import ConfigError
from models import count_parameters
from runtime import (
    EMA,
    MetricLogger,
    RunDirLock,
    RunError,
    Runtime,
    StopSignal,
    after_step,
    amp_dtype,
    atomic_write_text,
    derive_seed,
    epoch_permutation,
    find_resume_checkpoint,
    is_finished,
    learning_rate,
    optimizer_step,
    record_resume,
    resume_changes,
    run_loop,
    set_learning_rate,
    write_finished,
)

T_BINS = 10  # loss is also logged per t-bin of width 1/T_BINS
# On CPU, models below this many parameters train on one intra-op thread (training.threads = null): for
# the two-moons MLP two threads are 1.2x faster on an idle 2-core machine but 4x slower beside another
# busy process (docs/benchmarks.md); the U-Nets gain 1.65x from two threads and keep them.
SMALL_MODEL_PARAMETERS = 200_000
FINAL_OUTPUTS = ["samples.png", "samples.npz"]
STRAIGHTNESS_SAMPLES = 128  # ODE paths whose straightness each evaluation logs (their trajectories are kept)


def micro_batch_seed(seed: int, step: int, micro_index: int) -> int:
    """Seed of every random draw of one micro-batch; a function of position only (exact resume)."""
    return derive_seed(seed, step, micro_index)


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
        torch.manual_seed(derive_seed(cfg.seed, 0x1A17))  # identical initial weights on every rank and run
        self.model = build_model(cfg.model).to(device)
        if device.type == "cpu":
            threads = tr.threads or (1 if count_parameters(self.model) < SMALL_MODEL_PARAMETERS else None)
            if threads:
                torch.set_num_threads(threads)
        self.channels_last = len(self.dataset.sample_shape) == 3 and (tr.channels_last if tr.channels_last is not None else True)
        if self.channels_last:  # before the optimizer and EMA copy, so all share the NHWC layout
            self.model.to(memory_format=torch.channels_last)
        self.conditional = hasattr(self.model, "num_classes")
        if self.conditional and self.model.num_classes < self.dataset.num_classes:
            raise ConfigError(f"model.num_classes = {self.model.num_classes} but dataset {self.dataset.name!r} has "
                              f"{self.dataset.num_classes} classes; set model.num_classes >= {self.dataset.num_classes}")
        self.masked = getattr(self.model, "mask_ratio", 0.0) > 0  # deferred token masking (models_dit.DiT)
        self.path, self.time_sampler, self.weighting = build_flow(cfg.flow)
        # The rows the epoch permutation runs over: the dataset, or a reflow pair file (its samples and
        # labels; self.dataset stays the real data, which evaluation compares against).
        self.coupling = build_coupling(tr.coupling, self.dataset, self.conditional, device)
        self.train_data = self.coupling.training_data(self.dataset)

        self.micro_batches = runtime.world_size * tr.grad_accum
        if tr.batch_size % self.micro_batches:
            raise ConfigError(
                f"training.batch_size = {tr.batch_size} must be divisible by world_size * grad_accum = {self.micro_batches}"
            )
        self.micro_batch_size = tr.batch_size // self.micro_batches
        self.steps_per_epoch = len(self.train_data) // tr.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"training.batch_size = {tr.batch_size} exceeds the dataset size {len(self.train_data)}")
        self.total_steps = tr.epochs * self.steps_per_epoch  # LR-schedule horizon
        self.target_steps = self.total_steps if tr.max_steps is None else min(self.total_steps, tr.max_steps)

        # Fused AdamW (one kernel per step; also the fastest on CPU here) takes `found_inf`, which
        # skips a non-finite step on the device: no host sync per step to decide it.
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay, fused=True
        )
        self.ema = EMA(self.model, tr.ema_decay, tr.ema_warmup) if tr.ema else None
        self.amp_dtype = amp_dtype(tr.amp, device)
        use_compile = tr.compile if tr.compile is not None else device.type == "cuda"
        self.forward_model = torch.compile(self.model) if use_compile else self.model
        if runtime.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            # A DiT built for masking but trained unmasked (the fine-tune stage) never uses its mask token.
            unused = getattr(self.model, "mask_token", None) is not None and not self.masked
            self.forward_model = DistributedDataParallel(self.forward_model, device_ids=ids, find_unused_parameters=unused)
        self.generator = torch.Generator(device=device)
        self.step = 0
        self.nonfinite_in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.nonfinite_total = torch.zeros((), dtype=torch.long, device=device)  # for the warnings
        self._nonfinite_reported = (0, 0)  # (total skipped, step) at the last warning
        self.stop = StopSignal(runtime)
        self._permutation = (None, None)  # (epoch, permutation) cache
        self.resumed = None  # (step, changed keys) when fit() continues a checkpoint

    # -- state --

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "ema_num_updates": self.ema.num_updates if self.ema else 0,
            "nonfinite_in_a_row": int(self.nonfinite_in_a_row),
            # The data position and every RNG stream are functions of the step (module docstring),
            # so these are recorded for inspection, not needed to resume.
            "epoch": self.step // self.steps_per_epoch,
            "batch_in_epoch": self.step % self.steps_per_epoch,
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

    def resume(self) -> None:
        """Fresh start, or continue from training.resume (auto | PATH). Never overwrites a run."""
        source = find_resume_checkpoint(self.run_dir, self.cfg.training.resume, self.runtime, self.log.print,
                                        start_over=self.cfg.training.start_over)
        if source is None:
            self.initialize()
            return
        loaded = ckpt.load_checkpoint(source, map_location=self.runtime.device)
        changes = resume_changes(loaded.config, self.cfg, loaded.path)
        ckpt.load_weights(self.model, loaded.model, f"checkpoint {loaded.path} (model)")
        if self.ema:
            if loaded.ema is None:
                raise ckpt.CheckpointError(f"checkpoint {loaded.path} has no ema.safetensors but training.ema is on")
            ckpt.load_weights(self.ema.model, loaded.ema, f"checkpoint {loaded.path} (ema)")
            self.ema.num_updates = int(loaded.state["ema_num_updates"])
        self.optimizer.load_state_dict(loaded.state["optimizer"])
        self.nonfinite_in_a_row.fill_(int(loaded.state["nonfinite_in_a_row"]))
        self.step = loaded.step
        changes.pop("training.resume", None)
        self.resumed = (self.step, changes)  # recorded in resumes.jsonl once the run goes on (fit)
        changed = "; changed: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()) if changes else ""
        self.log.print(f"resumed from {loaded.path} at step {self.step}{changed}")

    def initialize(self) -> None:
        """A fresh run's start from training.init.checkpoint: each part (model, EMA, optimizer, step) on
        or off. The architecture must match (load_weights names any difference); dataset, flow and
        masking may change, which is the point (masked pretrain -> unmasked fine-tune)."""
        init = self.cfg.training.init
        if init.checkpoint is None:
            return
        wanted = {init.model, init.ema} - {"none"}
        loaded = ckpt.load_checkpoint(init.checkpoint, map_location=self.runtime.device, load_model="model" in wanted,
                                      load_ema="ema" in wanted, load_state=init.optimizer or init.step)
        weights = {"model": loaded.model, "ema": loaded.ema}
        for part, target in (("model", self.model), ("ema", self.ema.model if self.ema else None)):
            source = getattr(init, part)
            if source == "none" or target is None:
                continue
            if weights[source] is None:
                raise ckpt.CheckpointError(f"training.init.{part} = {source!r}, but checkpoint {loaded.path} has no "
                                           f"{source}.safetensors; use training.init.{part}=model or none")
            ckpt.load_weights(target, weights[source], f"training.init.checkpoint {loaded.path} ({source})")
        if self.ema and init.ema == "none" and init.model != "none":
            self.ema.model.load_state_dict(self.model.state_dict())  # the EMA starts where the model starts
        if init.optimizer:
            self.optimizer.load_state_dict(loaded.state["optimizer"])
        if init.step:
            self.step = loaded.step
            if self.ema:
                self.ema.num_updates = int(loaded.state["ema_num_updates"])
        parts = [f"{part} <- {getattr(init, part)}" for part in ("model", "ema")] + \
                [part for part in ("optimizer", "step") if getattr(init, part)]
        self.log.print(f"initialised from {loaded.path} (step {loaded.step}): {', '.join(parts)}")

    # -- one optimizer step --

    def global_batch_indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        if self._permutation[0] != epoch:
            self._permutation = (epoch, epoch_permutation(len(self.train_data), self.cfg.seed, epoch, self.runtime.device))
        size = self.cfg.training.batch_size
        return self._permutation[1][position * size : (position + 1) * size]

    def micro_batch(self, step: int, micro_index: int):
        """Micro-batch j of step s: its slice of the global batch and its own seeded draws."""
        indices = self.global_batch_indices(step).view(self.micro_batches, self.micro_batch_size)[micro_index]
        self.generator.manual_seed(micro_batch_seed(self.cfg.seed, step, micro_index))
        x1, y = self.train_data.batch(indices, self.generator)
        t = self.time_sampler(x1.shape[0], self.generator, self.runtime.device)
        eps = torch.randn(x1.shape, generator=self.generator, device=x1.device, dtype=x1.dtype)
        # Re-pair the noise (couplings.py) with the labels as drawn, before label dropout: OT pairs
        # within a class, reflow takes its stored noise. Independent returns eps untouched.
        eps = self.coupling(x1, eps, y if self.conditional else None, indices)
        if self.channels_last:
            x1, eps = (v.contiguous(memory_format=torch.channels_last) for v in (x1, eps))
        if self.conditional:
            drop = torch.rand(y.shape, generator=self.generator, device=y.device) < self.cfg.training.p_uncond
            y = torch.where(drop, torch.full_like(y, self.model.num_classes), y)
        else:
            y = None
        return x1, y, t, eps

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (loss, grad_norm, per-sample losses, t) for logging, all on device."""
        tr = self.cfg.training
        step = self.step
        set_learning_rate(self.optimizer, learning_rate(step, tr.lr, tr.warmup_steps, self.total_steps,
                                                        tr.lr_schedule, tr.min_lr_ratio))
        per_sample_all, t_all, loss_sum = [], [], 0.0
        for accum_index in range(tr.grad_accum):
            micro_index = accum_index * self.runtime.world_size + self.runtime.rank
            x1, y, t, eps = self.micro_batch(step, micro_index)
            x_t, _ = self.path.sample(x1, eps, t)
            # Only the last micro-step all-reduces gradients under DDP.
            sync = accum_index == tr.grad_accum - 1 or not self.runtime.distributed
            context = self.forward_model.no_sync() if not sync else contextlib.nullcontext()
            with context:
                with torch.autocast(self.runtime.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    if self.masked:
                        # Deferred masking: the kept tokens come from this micro-batch's generator (exact
                        # resume), drawn outside the model so a compiled forward has no generator in it;
                        # the loss counts only pixels of kept tokens.
                        keep_ids = self.model.sample_keep(x1.shape[0], self.model.grid ** 2, self.model.mask_ratio,
                                                          self.generator, x1.device)
                        output, keep = self.forward_model(x_t, t, y, keep_ids=keep_ids, return_mask=True)
                        mask = self.model.loss_mask(keep, tuple(x1.shape[-2:]))
                    else:
                        output, mask = self.forward_model(x_t, t, y), None
                loss, per_sample = flow.flow_matching_loss(
                    self.path, output, x1, eps, x_t, t, prediction=self.cfg.flow.prediction, weighting=self.weighting,
                    mask=mask,
                )
                (loss / tr.grad_accum).backward()
            per_sample_all.append(per_sample.detach())
            t_all.append(t)
            loss_sum = loss_sum + loss.detach()
        grad_norm, nonfinite = optimizer_step(self.model, self.optimizer, tr.grad_clip)
        if self.ema:
            self.ema.update(self.model, skip=nonfinite)
        self.nonfinite_in_a_row = torch.where(nonfinite, self.nonfinite_in_a_row + 1, 0)
        self.nonfinite_total += nonfinite
        self.step += 1
        return loss_sum / tr.grad_accum, grad_norm, torch.cat(per_sample_all), torch.cat(t_all)

    # -- the loop --

    def fit(self) -> int:
        """Train to target_steps, evaluate, write the final outputs and the finished marker. The run
        dir is locked for the duration; a finished run (outputs present) is a no-op."""
        lock = RunDirLock(self.run_dir).acquire() if self.runtime.is_main else None
        try:
            return self._fit()
        finally:
            if lock is not None:
                lock.release()

    def _fit(self) -> int:
        tr = self.cfg.training
        self.log = MetricLogger(self.run_dir, self.runtime.is_main, tr.tensorboard)
        self.resume()
        self.load_eval_classifier()
        if self.runtime.is_main and not (self.run_dir / "config.yaml").exists():  # the original is kept
            atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(self.cfg, resolve=True))
        if self.step >= self.target_steps and (not self.runtime.is_main or is_finished(self.run_dir, self.step)):
            self.log.print(f"run {self.run_dir} already finished at step {self.step} (target {self.target_steps}); nothing to do")
            return 0
        if self.resumed is not None and self.runtime.is_main:
            record_resume(self.run_dir, *self.resumed)
        if tr.max_steps is not None and tr.max_steps > self.total_steps:
            self.log.print(f"note: training.max_steps = {tr.max_steps} exceeds the LR schedule's {self.total_steps} steps "
                           f"(training.epochs = {tr.epochs} x {self.steps_per_epoch} steps per epoch); training stops at "
                           f"{self.total_steps}. Raise training.epochs to train longer.")
        params = count_parameters(self.model)
        self.log.print(
            f"{self.cfg.experiment}: {type(self.model).__name__} with {params:,} parameters on {self.runtime.device} "
            f"x{self.runtime.world_size} ({torch.get_num_threads()} threads); {len(self.train_data):,} samples "
            f"({tr.coupling.name} coupling), batch "
            f"{tr.batch_size}, steps {self.step} -> {self.target_steps} (schedule {self.total_steps}); run dir {self.run_dir}"
        )
        return run_loop(self.stop, self._loop, self.finish, self.log)

    def finish(self) -> None:
        """The final evaluation; its outputs, then the finished marker, are written last."""
        self.evaluate(final=True)
        if self.runtime.is_main:
            write_finished(self.run_dir, self.step, FINAL_OUTPUTS)

    def nonfinite_check_every(self) -> int:
        """Steps between reads of the device counters (a host sync): a run stops after between
        max_nonfinite_steps and 1.5x that many consecutive skipped steps."""
        tr = self.cfg.training
        return max(1, min(tr.log_every, tr.max_nonfinite_steps // 2))

    def _check_nonfinite(self, summarise: bool = True) -> None:
        """Warn about skipped steps (at the first one, then once per log interval that has any) and
        abort after max_nonfinite_steps in a row. Skipped steps leave the weights, EMA and optimizer
        untouched, so a late abort loses nothing."""
        total, in_a_row = int(self.nonfinite_total), int(self.nonfinite_in_a_row)
        reported_total, reported_step = self._nonfinite_reported
        if total > reported_total and (summarise or reported_total == 0):
            self.log.print(f"WARNING: {total - reported_total} optimizer step(s) between steps {reported_step} and "
                           f"{self.step} had a non-finite gradient norm and were skipped (weights, EMA and optimizer "
                           f"unchanged); {in_a_row} in a row now, training.max_nonfinite_steps = "
                           f"{self.cfg.training.max_nonfinite_steps}")
            self._nonfinite_reported = (total, self.step)
        limit = self.cfg.training.max_nonfinite_steps
        if in_a_row >= limit:
            saved = ckpt.list_checkpoints(self.run_dir)
            last = f"the last checkpoint, {saved[-1][1]}, is untouched" if saved else "no checkpoint was written yet"
            raise RunError(
                f"{in_a_row} consecutive non-finite steps (training.max_nonfinite_steps = {limit}) ending at step "
                f"{self.step}; aborting: the loss or gradients diverged (try a lower training.lr, or check the data "
                f"for NaN/inf). {last}"
            )

    def _loop(self) -> None:
        from tqdm import tqdm

        tr = self.cfg.training
        device = self.runtime.device
        bar = tqdm(total=self.target_steps, initial=self.step, disable=not (self.runtime.is_main and tr.progress),
                   dynamic_ncols=True, desc=self.cfg.experiment)
        bin_sums = torch.zeros(T_BINS, device=device)
        bin_counts = torch.zeros(T_BINS, device=device)
        loss_sum = torch.zeros((), device=device)
        norm_sum = torch.zeros((), device=device)
        skipped = torch.zeros((), device=device)
        window_steps, window_start = 0, time.perf_counter()
        while self.step < self.target_steps:
            loss, grad_norm, per_sample, t = self.train_step()
            # Skipped (non-finite) steps are kept out of every logged mean.
            finite = torch.isfinite(grad_norm)
            bins = (t * T_BINS).long().clamp_(0, T_BINS - 1)
            bin_sums.index_add_(0, bins, torch.where(finite, per_sample.float(), 0.0))
            bin_counts.index_add_(0, bins, finite.float().expand(per_sample.shape))
            loss_sum += torch.where(finite, loss, 0.0)
            norm_sum += torch.where(finite, grad_norm, 0.0)
            skipped += (~finite).float()
            window_steps += 1
            bar.update(1)
            at_log = self.step % tr.log_every == 0 or self.step == self.target_steps
            if at_log or self.step % self.nonfinite_check_every() == 0:
                self._check_nonfinite(summarise=at_log)
            if at_log:
                elapsed = time.perf_counter() - window_start
                good_steps = max(window_steps - int(skipped), 1)
                values = {
                    "train/loss": (loss_sum / good_steps).item(),
                    "train/grad_norm": (norm_sum / good_steps).item(),
                    "train/skipped_steps": float(skipped),
                    "train/lr": self.optimizer.param_groups[0]["lr"],
                    "train/images_per_s": window_steps * tr.batch_size / elapsed,
                    "train/epoch": self.step / self.steps_per_epoch,
                }
                values.update(self.moe_load_metrics())
                per_bin = (bin_sums / bin_counts.clamp(min=1)).tolist()
                values.update({f"loss_by_t/{i / T_BINS:.1f}-{(i + 1) / T_BINS:.1f}": v for i, v in enumerate(per_bin)})
                self.log.scalars(self.step, values)
                bar.set_postfix(loss=f"{values['train/loss']:.4f}", lr=f"{values['train/lr']:.2e}")
                bin_sums.zero_(), bin_counts.zero_(), loss_sum.zero_(), norm_sum.zero_(), skipped.zero_()
                window_steps, window_start = 0, time.perf_counter()
            if after_step(self.step, self.target_steps, tr, self.stop, self._checked_save, self.evaluate, self.log):
                break
        bar.close()

    def _checked_save(self) -> None:
        self._check_nonfinite()
        self.save()

    def moe_load_metrics(self) -> dict[str, float]:
        """Expert-choice load of the last forward, averaged over MoE blocks: the fraction of tokens no
        expert picked (they skip the MLP), picked once, and picked by two or more."""
        load = getattr(self.model, "moe_load", lambda: {})()
        if not load:
            return {}
        mean = torch.stack(list(load.values())).mean(0).tolist()
        return {"moe/tokens_unpicked": mean[0], "moe/tokens_picked_once": mean[1], "moe/tokens_picked_2plus": mean[2]}

    @torch.no_grad()
    def evaluate(self, final: bool) -> None:
        """Sample with the EMA (else raw) model using the run's solver settings; log metrics and a
        figure; at the end also write samples.png / samples.npz to the run dir."""
        if not self.runtime.is_main:
            return
        from figures import close_figure, samples_figure, save_samples
        from sampling import FlowSampler, NonFiniteSamplesError, generate, measure_straightness

        model = self.ema.model if self.ema else self.model
        model.eval()
        sampler = FlowSampler(model, self.path, self.cfg.flow.prediction, num_classes=getattr(self.model, "num_classes", None))
        started = time.perf_counter()
        try:
            samples, labels = generate(sampler, self.cfg.solver, self.dataset.sample_shape,
                                       self.cfg.training.num_eval_samples, seed=self.cfg.seed, device=self.runtime.device)
        except NonFiniteSamplesError as error:
            if final:
                raise RunError(f"final evaluation at step {self.step}: {error}") from None
            self.log.print(f"WARNING: evaluation at step {self.step} skipped: {error}")
            self.model.train()
            return
        latents = None
        if self.decode_latents is not None:  # latent model: figures and metrics are about the decoded images
            latents, samples = samples, self.decode_latents(samples)
        metrics = {"sampling_s": time.perf_counter() - started, **self.sample_metrics(samples, labels)}
        # How straight the sampled paths are (0: one Euler step is exact), on one batch of the same noise.
        metrics["straightness"] = measure_straightness(
            sampler, self.cfg.solver, self.dataset.sample_shape, min(STRAIGHTNESS_SAMPLES, self.cfg.training.num_eval_samples),
            seed=self.cfg.seed, device=self.runtime.device)
        if self.fid is not None:
            metrics.update(self.inception_metrics(sampler))
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if final and bad:
            raise RunError(f"final evaluation at step {self.step}: {', '.join(f'{k} = {metrics[k]}' for k in bad)} "
                           f"(the samples are finite; is the data? a NaN or inf in the dataset gives this)")
        self.log.scalars(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        figure = samples_figure(samples, labels, self.dataset.name, getattr(self.dataset, "class_names", None))
        self.log.figure(self.step, "samples", figure)
        if final:
            save_samples(samples.cpu(), labels.cpu() if labels is not None else None, self.run_dir, figure, latents=latents)
            self.log.print(f"samples: {self.run_dir / 'samples.png'} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        close_figure(figure)
        self.model.train()

    def inception_metrics(self, sampler) -> dict[str, float]:
        """FID / IS (and KID, precision/recall when the reference keeps features) of fid_samples fresh
        samples, named for the count: fid_5k is FID-5k, biased upwards against FID-50k."""
        import inception
        from datasets import model_space_to_uint8
        from sampling import generate

        extractor, reference = self.fid
        n = self.cfg.training.fid_samples
        samples, _ = generate(sampler, self.cfg.solver, self.dataset.sample_shape, n, seed=self.cfg.seed + 1,
                              device=self.runtime.device)
        if self.decode_latents is not None:
            samples = torch.cat([self.decode_latents(part) for part in samples.split(64)])
        values = inception.inception_metrics(extractor, model_space_to_uint8(samples), reference,
                                             is_splits=min(10, len(samples)))
        tag = f"{n // 1000}k" if n % 1000 == 0 else str(n)
        return {f"{key}_{tag}": value for key, value in values.items()}

    def sample_metrics(self, samples: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        """2-D data: sliced W2 (+ moons class accuracy). Images: classifier accuracy against the
        requested labels, classifier-FD to held-out real images, JPEG/PNG bits per pixel."""
        import metrics

        if len(self.dataset.sample_shape) != 3:
            return metrics.sample_metrics(samples, labels, self.dataset)
        if self.eval_classifier is None:
            return metrics.image_compression_metrics(samples)
        return self.eval_classifier.score(samples, labels)

    def load_eval_classifier(self) -> None:
        """Rank 0's evaluation tools: the VAE decoder of a latent dataset, and the metrics classifier
        (loaded before the first step, so a wrong path fails now rather than after training)."""
        from vae import latent_decoder

        self.decode_latents, self.eval_classifier, self.fid = None, None, None
        if not self.runtime.is_main:
            return
        self.decode_latents = latent_decoder(getattr(self.dataset, "vae_id", None), self.runtime.device)
        if self.cfg.training.fid_reference:  # loaded now, so a wrong path fails before training
            import inception

            extractor = inception.load_inception(self.cfg.training.inception_weights, self.runtime.device)
            reference = inception.load_reference_statistics(self.cfg.training.fid_reference, extractor)
            reference.check_extractor(extractor)
            self.fid = (extractor, reference)
        if self.cfg.training.classifier:
            self.eval_classifier = load_eval_classifier(
                self.cfg.training.classifier, self.cfg.dataset, self.runtime.device,
                self.cfg.training.num_eval_samples, self.cfg.seed, train_split=self.dataset)
