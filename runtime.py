"""The run harness every entry point shares (nanochat's `common.py`): devices and processes, the run
directory, the SIGTERM stop vote and exit codes, the metric logger, EMA, the LR schedule, seeding,
resume lookup and one optimizer step.

Exit codes: 0 done (or already finished), 1 error (one `error:` line on stderr), 75 (EX_TEMPFAIL)
stopped by SIGTERM after saving a checkpoint: requeue the same command to continue.
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

import checkpoint as ckpt
from config import ConfigError, to_plain

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, try again" -> requeue


# --- devices and processes ------------------------------------------------------------------------


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


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(value, runtime: Runtime):
    """Rank 0's value on every rank (for choices made once, like the run dir)."""
    if not runtime.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_run_dir(cfg, runtime: Runtime) -> Path:
    """training.run_dir, or runs/<experiment>_<timestamp> chosen once on rank 0."""
    if cfg.training.run_dir:
        return Path(cfg.training.run_dir)
    if cfg.training.resume == "auto":
        raise ConfigError("training.resume = 'auto' needs training.run_dir (the run to continue)")
    stamp = broadcast_object(time.strftime("%Y%m%d-%H%M%S") if runtime.is_main else None, runtime)
    return Path("runs") / f"{cfg.experiment}_{stamp}"


def run_main(main, argv: list[str] | None = None) -> None:
    """`sys.exit(main(argv))` for an entry point: a config, checkpoint or data error is one `error:`
    line on stderr and exit code 1 (set NANOFLOW_DEBUG=1 for the traceback)."""
    from datasets import DatasetNotFoundError

    try:
        sys.exit(main(argv))
    except (ConfigError, ckpt.CheckpointError, DatasetNotFoundError) as error:
        if os.environ.get("NANOFLOW_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


# --- the stop signal ------------------------------------------------------------------------------


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


def run_loop(stop: StopSignal, loop, finish, log) -> int:
    """The end every trainer shares: `loop()` under the stop signal; preempted -> EXIT_PREEMPTED,
    else `finish()` (final evaluation and outputs), close the logger, EXIT_OK."""
    with stop:
        loop()
    if stop.requested:
        return EXIT_PREEMPTED
    finish()
    log.close()
    return EXIT_OK


def after_step(step: int, target_steps: int, run_cfg, stop: StopSignal, save, evaluate, log, unit: str = "step") -> bool:
    """The checks every trainer makes after a step (run_cfg: a RunConfig): the SIGTERM vote (save and
    return True: stop the loop), the periodic checkpoint (and the final one), the periodic evaluation."""
    if stop.agreed():
        log.print(f"SIGTERM: saving {unit} {step} and exiting with code {EXIT_PREEMPTED} (requeue to resume)")
        save()
        return True
    if step % run_cfg.checkpoint_every == 0 or step == target_steps:
        save()
    if run_cfg.eval_every and step % run_cfg.eval_every == 0 and step != target_steps:
        evaluate(final=False)
    return False


# --- resume ---------------------------------------------------------------------------------------


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


def check_compatible(saved, current, source: Path) -> None:
    """Resuming must not change what the weights mean (model, flow)."""
    for section in ("model", "flow"):
        if to_plain(saved.get(section)) != to_plain(current.get(section)):
            raise ckpt.CheckpointError(
                f"checkpoint {source} was trained with {section} = {to_plain(saved.get(section))}, but this run has "
                f"{section} = {to_plain(current.get(section))}; resume with the original {section} config or start a new run_dir"
            )


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


# --- seeding ------------------------------------------------------------------------------------


def derive_seed(*values: int) -> int:
    """Deterministic 63-bit hash of integers (splitmix64-style), for seeding generators."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def epoch_permutation(num_items: int, seed: int, epoch: int, device) -> torch.Tensor:
    """The order of one epoch: a function of (seed, epoch) only, so every rank and every
    resumed run agrees on it without saving any sampler state."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 0x5EED))
    return torch.randperm(num_items, generator=generator).to(device)


# --- optimisation pieces --------------------------------------------------------------------------


def learning_rate(step: int, base_lr: float, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Linear warmup to base_lr, then cosine to min_ratio * base_lr at total_steps (or constant)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip the global grad norm (grad_clip 0 = no clipping), step, zero the grads -> (grad_norm,
    nonfinite), both 0-dim on the device.

    A non-finite norm skips the step on the device: fused AdamW takes `found_inf`, so deciding it
    needs no host sync. Under DDP the gradients are already averaged, so every rank sees the same
    norm and skips together."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    nonfinite = ~torch.isfinite(grad_norm)
    optimizer.found_inf = nonfinite.float()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, nonfinite


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


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """training.amp -> the autocast dtype: bf16 on CUDA for 'auto', None = full precision."""
    return torch.bfloat16 if amp == "bf16" or (amp == "auto" and device.type == "cuda") else None
