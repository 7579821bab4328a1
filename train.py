"""Train a flow-matching model: `python train.py [experiment=NAME] [key=value ...]`.

Owns the loop and the machinery around it (devices, DDP, AdamW + schedule, EMA, AMP, compile,
logging, checkpoints, resume, SIGTERM); the maths lives in flow.py and the networks in models.py.

Exact resume. The data order of epoch e is a permutation seeded by (seed, e); the global batch of
step s is split into world_size * grad_accum micro-batches, and micro-batch j draws its t, noise
and label dropout from a generator seeded by (seed, s, j). Nothing random depends on process
history, so a run killed anywhere and resumed from its last checkpoint replays the same steps
bit for bit (on CPU), and any (world_size, grad_accum) with the same product trains the same
model up to float summation order.

Exit codes: 0 done (or already finished), 75 (EX_TEMPFAIL) stopped by SIGTERM after saving a
checkpoint (requeue the same command to continue), 1 error.
"""

import copy
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import checkpoint as ckpt
import flow
from config import ConfigError, build_flow, build_model, load_config, spec_kwargs, to_plain
from datasets import build_dataset, derive_seed, epoch_permutation
from models import count_parameters

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, try again" -> requeue
T_BINS = 10  # loss is also logged per t-bin of width 1/T_BINS


# --- runtime: device and processes ----------------------------------------------------------------


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """auto -> cuda > mps > cpu; an explicit device that is absent is an error, not a fallback."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device = 'cuda' but no CUDA device is visible; use device=auto or device=cpu")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device = 'mps' but MPS is not available; use device=auto or device=cpu")
    return torch.device(name)


def setup_runtime(device_name: str) -> Runtime:
    """Single process, or one rank of `torchrun` (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name, local_rank)
    if world_size == 1:
        return Runtime(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device=device, rank=dist.get_rank(), world_size=world_size, local_rank=local_rank)


def broadcast_object(value, runtime: Runtime):
    """Rank 0's value on every rank (for choices made once, like the run dir)."""
    if not runtime.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_run_dir(cfg: DictConfig, runtime: Runtime) -> Path:
    if cfg.training.run_dir:
        return Path(cfg.training.run_dir)
    if cfg.training.resume == "auto":
        raise ConfigError("training.resume = 'auto' needs training.run_dir (the run to continue)")
    stamp = broadcast_object(time.strftime("%Y%m%d-%H%M%S") if runtime.is_main else None, runtime)
    return Path("runs") / f"{cfg.experiment}_{stamp}"


class StopSignal:
    """SIGTERM -> finish the current step, save, exit with EXIT_PREEMPTED. Under DDP every rank must
    stop at the same step, so `agreed()` is a MAX vote over a CPU-side (gloo) group: deciding it
    never syncs the GPU. Use as a context manager around the loop."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.requested = False
        self.group = dist.new_group(backend="gloo") if runtime.distributed else None
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._request)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)
        return False

    def _request(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        if not self.runtime.distributed:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def find_resume_checkpoint(run_dir: Path, resume: str | None, runtime: Runtime, log) -> str | None:
    """What to resume from, decided on rank 0 and shared: None for a fresh start. Never overwrites
    a run: existing checkpoints without resume is an error, and with resume=auto a run dir whose
    checkpoints all fail verification is an error too (they are quarantined, not silently skipped)."""
    existing = ckpt.list_checkpoints(run_dir)
    if resume is None:
        if existing:
            raise ConfigError(
                f"training.run_dir = {str(run_dir)!r} already holds checkpoints; pass training.resume=auto "
                f"to continue it, or choose another training.run_dir"
            )
        return None
    if resume != "auto":
        return resume
    found = ckpt.latest_valid_checkpoint(run_dir, log=log) if runtime.is_main else None
    found = broadcast_object(str(found) if found else None, runtime)
    if found is None:
        if existing and runtime.is_main and not ckpt.list_checkpoints(run_dir):
            raise ckpt.CheckpointError(f"no checkpoint under {run_dir / 'checkpoints'} verifies; not starting over it")
        log(f"training.resume=auto: no checkpoint in {run_dir}, starting fresh")
    return found


# --- logging ------------------------------------------------------------------------------------


class MetricLogger:
    """One logging path: console, metrics.jsonl and TensorBoard, written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(run_dir / "metrics.jsonl", "a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def print(self, *args) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(" ".join(str(a) for a in args))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def figure(self, step: int, tag: str, figure) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_figure(tag, figure, step, close=False)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


# --- optimisation pieces --------------------------------------------------------------------------


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to base_lr, then cosine to min_ratio * base_lr at total_steps (or constant)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a model's weights, kept as a full model for sampling."""

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup, self.num_updates = decay, warmup, 0

    def current_decay(self) -> float:
        # Warm-up (as in Keras / timm ModelEmaV2): early weights are mostly noise, so average
        # over ~n steps rather than 1/(1-decay) steps until n is large.
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, skip: torch.Tensor | None = None) -> None:
        """skip: optional bool scalar on the device; when true the average is left unchanged
        (a skipped optimizer step), decided without a host sync."""
        weight = torch.tensor(1.0 - self.current_decay(), device=next(model.parameters()).device)
        if skip is not None:
            weight = weight * (~skip)
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], weight)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)
        self.num_updates += 1


def micro_batch_seed(seed: int, step: int, micro_index: int) -> int:
    """Seed of every random draw of one micro-batch; a function of position only (exact resume)."""
    return derive_seed(seed, step, micro_index)


# --- the trainer --------------------------------------------------------------------------------


class Trainer:
    def __init__(self, cfg: DictConfig, runtime: Runtime, run_dir: Path):
        self.cfg, self.runtime, self.run_dir = cfg, runtime, run_dir
        tr = cfg.training
        device = runtime.device
        self.log = MetricLogger(run_dir, runtime.is_main, tr.tensorboard)

        dataset_name, dataset_kwargs = spec_kwargs(cfg.dataset)
        self.dataset = build_dataset(dataset_name, device, **dataset_kwargs)
        torch.manual_seed(derive_seed(cfg.seed, 0x1A17))  # identical initial weights on every rank and run
        self.model = build_model(cfg.model).to(device)
        self.channels_last = len(self.dataset.sample_shape) == 3 and (tr.channels_last if tr.channels_last is not None else True)
        if self.channels_last:  # before the optimizer and EMA copy, so all share the NHWC layout
            self.model.to(memory_format=torch.channels_last)
        self.conditional = hasattr(self.model, "num_classes")
        if self.conditional and self.model.num_classes < self.dataset.num_classes:
            raise ConfigError(f"model.num_classes = {self.model.num_classes} but dataset {self.dataset.name!r} has "
                              f"{self.dataset.num_classes} classes; set model.num_classes >= {self.dataset.num_classes}")
        self.masked = getattr(self.model, "mask_ratio", 0.0) > 0  # deferred token masking (models_dit.DiT)
        self.path, self.time_sampler, self.weighting = build_flow(cfg.flow)

        self.micro_batches = runtime.world_size * tr.grad_accum
        if tr.batch_size % self.micro_batches:
            raise ConfigError(
                f"training.batch_size = {tr.batch_size} must be divisible by world_size * grad_accum = {self.micro_batches}"
            )
        self.micro_batch_size = tr.batch_size // self.micro_batches
        self.steps_per_epoch = len(self.dataset) // tr.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"training.batch_size = {tr.batch_size} exceeds the dataset size {len(self.dataset)}")
        self.total_steps = tr.epochs * self.steps_per_epoch  # LR-schedule horizon
        self.target_steps = self.total_steps if tr.max_steps is None else min(self.total_steps, tr.max_steps)

        # Fused AdamW (one kernel per step; also the fastest on CPU here) takes `found_inf`, which
        # skips a non-finite step on the device: no host sync per step to decide it.
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tr.lr, betas=tuple(tr.betas), weight_decay=tr.weight_decay, fused=True
        )
        self.ema = EMA(self.model, tr.ema_decay, tr.ema_warmup) if tr.ema else None
        self.amp_dtype = torch.bfloat16 if tr.amp == "bf16" or (tr.amp == "auto" and device.type == "cuda") else None
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
        self.stop = StopSignal(runtime)
        self._permutation = (None, None)  # (epoch, permutation) cache

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
        source = find_resume_checkpoint(self.run_dir, self.cfg.training.resume, self.runtime, self.log.print)
        if source is None:
            self.initialize()
            return
        loaded = ckpt.load_checkpoint(source, map_location=self.runtime.device)
        check_compatible(loaded.config, self.cfg, loaded.path)
        ckpt.load_weights(self.model, loaded.model, f"checkpoint {loaded.path} (model)")
        if self.ema:
            if loaded.ema is None:
                raise ckpt.CheckpointError(f"checkpoint {loaded.path} has no ema.safetensors but training.ema is on")
            ckpt.load_weights(self.ema.model, loaded.ema, f"checkpoint {loaded.path} (ema)")
            self.ema.num_updates = int(loaded.state["ema_num_updates"])
        self.optimizer.load_state_dict(loaded.state["optimizer"])
        self.nonfinite_in_a_row.fill_(int(loaded.state["nonfinite_in_a_row"]))
        self.step = loaded.step
        self.log.print(f"resumed from {loaded.path} at step {self.step}")

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
            self._permutation = (epoch, epoch_permutation(len(self.dataset), self.cfg.seed, epoch, self.runtime.device))
        size = self.cfg.training.batch_size
        return self._permutation[1][position * size : (position + 1) * size]

    def micro_batch(self, step: int, micro_index: int):
        """Micro-batch j of step s: its slice of the global batch and its own seeded draws."""
        indices = self.global_batch_indices(step).view(self.micro_batches, self.micro_batch_size)[micro_index]
        self.generator.manual_seed(micro_batch_seed(self.cfg.seed, step, micro_index))
        x1, y = self.dataset.batch(indices, self.generator)
        t = self.time_sampler(x1.shape[0], self.generator, self.runtime.device)
        eps = torch.randn(x1.shape, generator=self.generator, device=x1.device, dtype=x1.dtype)
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
        lr = learning_rate(step, tr.lr, tr.warmup_steps, self.total_steps, tr.lr_schedule, tr.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        per_sample_all, t_all, loss_sum = [], [], 0.0
        for accum_index in range(tr.grad_accum):
            micro_index = accum_index * self.runtime.world_size + self.runtime.rank
            x1, y, t, eps = self.micro_batch(step, micro_index)
            x_t, _ = self.path.sample(x1, eps, t)
            # Only the last micro-step all-reduces gradients under DDP.
            sync = accum_index == tr.grad_accum - 1 or not self.runtime.distributed
            context = self.forward_model.no_sync() if not sync else _null_context()
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
        max_norm = tr.grad_clip if tr.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # DDP has averaged the gradients, so every rank sees the same norm and skips together.
        nonfinite = ~torch.isfinite(grad_norm)
        self.optimizer.found_inf = nonfinite.float()
        self.optimizer.step()
        if self.ema:
            self.ema.update(self.model, skip=nonfinite)
        self.nonfinite_in_a_row = torch.where(nonfinite, self.nonfinite_in_a_row + 1, 0)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum / tr.grad_accum, grad_norm, torch.cat(per_sample_all), torch.cat(t_all)

    # -- the loop --

    def fit(self) -> int:
        tr = self.cfg.training
        self.resume()
        self.load_eval_classifier()
        if self.runtime.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        if self.step >= self.target_steps:
            self.log.print(f"run {self.run_dir} already finished at step {self.step} (target {self.target_steps}); nothing to do")
            return 0
        params = count_parameters(self.model)
        self.log.print(
            f"{self.cfg.experiment}: {type(self.model).__name__} with {params:,} parameters on {self.runtime.device} "
            f"x{self.runtime.world_size}; {len(self.dataset):,} samples, batch {tr.batch_size}, "
            f"steps {self.step} -> {self.target_steps} (schedule {self.total_steps}); run dir {self.run_dir}"
        )
        with self.stop:
            self._loop()
        if self.stop.requested:
            return EXIT_PREEMPTED
        self.evaluate(final=True)
        self.log.close()
        return 0

    def _check_nonfinite(self) -> None:
        """Read at log and checkpoint boundaries only (a host sync). Skipped steps leave the weights,
        EMA and optimizer untouched, so a late abort loses nothing."""
        in_a_row = int(self.nonfinite_in_a_row)
        limit = self.cfg.training.max_nonfinite_steps
        if in_a_row >= limit:
            raise RuntimeError(
                f"{in_a_row} consecutive non-finite steps (training.max_nonfinite_steps = {limit}) ending at step "
                f"{self.step}; aborting. The last checkpoint is untouched."
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
            if self.step % tr.log_every == 0 or self.step == self.target_steps:
                self._check_nonfinite()
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
            if self.stop.agreed():
                self.log.print(f"SIGTERM: saving step {self.step} and exiting with code {EXIT_PREEMPTED} (requeue to resume)")
                self.save()
                break
            if self.step % tr.checkpoint_every == 0 or self.step == self.target_steps:
                self._check_nonfinite()
                self.save()
            if tr.eval_every and self.step % tr.eval_every == 0 and self.step != self.target_steps:
                self.evaluate(final=False)
        bar.close()

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
        import inference

        model = self.ema.model if self.ema else self.model
        model.eval()
        sampler = inference.FlowSampler(model, self.path, self.cfg.flow.prediction,
                                        num_classes=getattr(self.model, "num_classes", None))
        started = time.perf_counter()
        samples, labels = inference.generate(sampler, self.cfg.solver, self.dataset.sample_shape,
                                             self.cfg.training.num_eval_samples, seed=self.cfg.seed, device=self.runtime.device)
        latents = None
        if self.decode_latents is not None:  # latent model: figures and metrics are about the decoded images
            latents, samples = samples, self.decode_latents(samples)
        metrics = {"sampling_s": time.perf_counter() - started, **self.sample_metrics(samples, labels)}
        self.log.scalars(self.step, {f"eval/{k}": v for k, v in metrics.items()})
        figure = inference.samples_figure(samples, labels, self.dataset.name, getattr(self.dataset, "class_names", None))
        self.log.figure(self.step, "samples", figure)
        if final:
            inference.save_samples(samples.cpu(), labels.cpu() if labels is not None else None, self.run_dir, figure,
                                   latents=latents)
            self.log.print(f"samples: {self.run_dir / 'samples.png'} " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        inference.close_figure(figure)
        self.model.train()

    def sample_metrics(self, samples: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
        """2-D data: sliced W2 (+ moons class accuracy). Images: classifier accuracy against the
        requested labels, classifier-FD to held-out real images, JPEG/PNG bits per pixel."""
        import metrics

        if len(self.dataset.sample_shape) != 3:
            return metrics.sample_metrics(samples, labels, self.dataset)
        if not self.cfg.training.classifier:
            return metrics.image_compression_metrics(samples)
        values = metrics.image_sample_metrics(samples.to(self.runtime.device), labels, self.classifier,
                                              self.reference_statistics)
        return {**values, "classifier_fd_real_floor": self.fd_floor}

    def load_eval_classifier(self) -> None:
        """Rank 0's evaluation tools: the VAE decoder of a latent dataset, and the metrics classifier."""
        import inference

        self.decode_latents = None
        if self.runtime.is_main:
            self.decode_latents = inference.latent_decoder(getattr(self.dataset, "vae_id", None), self.runtime.device)
        self.classifier, self.reference_statistics, self.fd_floor = None, None, None
        if self.cfg.training.classifier and self.runtime.is_main:
            self.classifier, self.reference_statistics, self.fd_floor = load_eval_classifier(
                self.cfg.training.classifier, self.cfg.dataset, self.dataset, self.runtime.device,
                self.cfg.training.num_eval_samples, self.cfg.seed)


def load_eval_classifier(path, dataset_cfg, dataset, device, num_samples: int, seed: int):
    """-> (classifier, feature statistics of the held-out real split, real-vs-real FD floor at
    num_samples). Loaded before the first step, so a wrong path fails now rather than after training."""
    import metrics

    dataset_name, dataset_kwargs = spec_kwargs(dataset_cfg)
    classifier = metrics.load_classifier(path, device, expected_dataset=dataset_name,
                                         expected_shape=dataset.sample_shape)
    held_out = build_dataset(dataset_name, device, **{**dataset_kwargs, "split": "test"})
    reference_statistics = metrics.reference_statistics(classifier, held_out)
    fd_floor = metrics.real_fd_floor(classifier, dataset, reference_statistics, num_samples, seed)
    return classifier, reference_statistics, fd_floor


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- building from config (entry points only) -----------------------------------------------------


def check_compatible(saved: DictConfig, current: DictConfig, source: Path) -> None:
    """Resuming must not change what the weights mean (model, flow); other changes are reported."""
    for section in ("model", "flow"):
        if to_plain(saved.get(section)) != to_plain(current.get(section)):
            raise ckpt.CheckpointError(
                f"checkpoint {source} was trained with {section} = {to_plain(saved.get(section))}, but this run has "
                f"{section} = {to_plain(current.get(section))}; resume with the original {section} config or start a new run_dir"
            )


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    runtime = setup_runtime(cfg.device)
    run_dir = resolve_run_dir(cfg, runtime)
    try:
        return Trainer(cfg, runtime, run_dir).fit()
    finally:
        if runtime.distributed and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, ckpt.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
