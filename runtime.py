"""What every entry point shares (nanochat's `common.py`): devices and processes, exit codes and the
one-line error contract, the metric logger, seeding, the LR schedule, one optimizer step, EMA. The run
directory's lifecycle (owner lock, resume, stop signal, finished marker) is run_dir.py's.

Exit codes: 0 done (or already finished), 1 error (one `error:` line on stderr), 75 (EX_TEMPFAIL)
stopped by SIGTERM after saving a checkpoint: requeue the same command to continue.
"""

import copy
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint as ckpt
from config import ConfigError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "temporary failure, try again" -> requeue


class RunError(RuntimeError):
    """A fault of a run (an unwritable run dir, a run dir in use, diverged training); the message
    names the path or setting and the cause, and entry points print it as one `error:` line."""


class Preempted(Exception):
    """SIGTERM arrived during the final evaluation (run_dir.Run.final_phase): its outputs are not written.
    Entry points exit EXIT_PREEMPTED; the same command again completes them."""


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


# glibc malloc hands blocks above M_MMAP_THRESHOLD to mmap and returns them on free, and trims the heap
# top above M_TRIM_THRESHOLD: a CPU training step or sampling batch that allocates and frees the same
# multi-megabyte activations every step then pays a fresh, zeroed mapping (a minor fault per 4 KiB page)
# each time. Raising both keeps those blocks in the heap for reuse (docs/benchmarks.md: page faults per
# step and images/s before and after). 32 MiB is the largest mmap threshold glibc accepts on 64-bit.
MALLOC_MMAP_THRESHOLD = 32 * 2**20
MALLOC_TRIM_THRESHOLD = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (malloc.h)
_allocator_configured = False


def configure_allocator() -> bool:
    """Apply the malloc settings above to this process (glibc only; elsewhere a no-op) -> applied.
    Idempotent; settings given in GLIBC_TUNABLES win."""
    global _allocator_configured
    if (
        _allocator_configured
        or not sys.platform.startswith("linux")
        or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")
    ):
        return _allocator_configured
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        _allocator_configured = bool(libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
        )
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        _allocator_configured = False
    return _allocator_configured


def setup_runtime(device_name: str) -> Runtime:
    """Single process, or one rank of `torchrun` (gloo on CPU, nccl on CUDA)."""
    configure_allocator()
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


@contextmanager
def device_runtime(device_name: str):
    """setup_runtime for the with-block; the process group is torn down however the block ends."""
    runtime = setup_runtime(device_name)
    try:
        yield runtime
    finally:
        teardown_runtime(runtime)


def broadcast_object(value, runtime: Runtime):
    """Rank 0's value on every rank (for choices made once, like the run dir)."""
    if not runtime.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_main(main, argv: list[str] | None = None) -> None:
    """`sys.exit(main(argv))` for an entry point. A config, checkpoint, data or run fault, and any
    OSError (disk full, permissions), is one `error:` line on stderr (a few indented detail lines
    may follow) and exit code 1; NANOFLOW_DEBUG=1 shows the traceback instead. A SIGTERM during the
    final evaluation (Preempted) exits EXIT_PREEMPTED."""
    from datasets import DatasetNotFoundError
    from sampling import NonFiniteSamplesError
    from vae import VAENotFoundError

    configure_allocator()
    try:
        sys.exit(main(argv))
    except (
        ConfigError,
        ckpt.CheckpointError,
        DatasetNotFoundError,
        VAENotFoundError,
        RunError,
        NonFiniteSamplesError,
        OSError,
    ) as error:
        if os.environ.get("NANOFLOW_DEBUG"):
            raise
        # a path that is not UTF-8 (a surrogate escape from argv) is shown escaped, not as a second traceback
        message = f"error: {describe_error(error)}".encode("utf-8", "backslashreplace").decode("utf-8")
        print(message, file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except Preempted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)


def describe_error(error: BaseException) -> str:
    """An exception as the text after `error:`; an OSError names its file and cause."""
    if isinstance(error, OSError) and error.strerror and error.filename:  # a raw OSError; ours carry a message
        return f"{error.filename}: {error.strerror} ({type(error).__name__})"
    return str(error)


# --- logging ------------------------------------------------------------------------------------

PROGRESS_LINE_EVERY_S = 30.0  # where no bar is drawn (a log file, a pipe): one progress line this often


class Progress:
    """A long phase's progress: a tqdm bar on a terminal (enabled None) or when enabled is True; where no
    bar is drawn (a log file, a captured pipe, enabled False) a line `desc: n/total unit (p %), s, rate,
    postfix` through `write` every PROGRESS_LINE_EVERY_S seconds (and a last one at the end of a phase that
    printed one), so no long phase is silent in a log. active False (ranks other than 0) shows nothing.
    update / set_postfix / close as tqdm's."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        *,
        initial: int = 0,
        enabled=None,
        write=None,
        active: bool = True,
    ):
        from tqdm import tqdm

        disable = True if not active else None if enabled is None else not enabled
        self.bar = tqdm(total=total, initial=initial, disable=disable, dynamic_ncols=True, desc=desc, unit=unit)
        self.lines = active and self.bar.disable  # tqdm resolves None to "no terminal"
        self.total, self.desc, self.unit, self.write = total, desc, unit, write or tqdm.write
        self.n = self.initial = self.lined = initial
        self.started = self.last = time.monotonic()
        self.postfix: dict[str, str] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)
        if self.lines and time.monotonic() - self.last >= PROGRESS_LINE_EVERY_S:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items()}
        self.bar.set_postfix(**values)

    def _line(self) -> None:
        self.last, self.lined = time.monotonic(), self.n
        elapsed = self.last - self.started
        rate = (self.n - self.initial) / max(elapsed, 1e-9)
        share = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        self.write(
            f"{self.desc}: {self.n:,}/{self.total:,} {self.unit}{share}, {elapsed:.0f} s, "
            f"{rate:.3g} {self.unit}/s{extra}"
        )

    def close(self) -> None:
        """Ends the bar; in the log, a last line when the phase already printed one and has moved since."""
        self.bar.close()
        if self.lines and self.lined != self.initial and self.n != self.lined:
            self._line()
        self.lines = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MetricLogger:
    """One logging path: console, metrics.jsonl, TensorBoard and (optionally) Weights & Biases, written by
    rank 0 only. The files open at the first write, so a run that ends before logging anything leaves none.
    wandb: off | offline (RUN/wandb/, no network; `wandb sync` uploads it later) | online."""

    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool, wandb: str = "off", wandb_project: str = "nanoflow"
    ):
        self.run_dir, self.enabled, self.tensorboard = run_dir, enabled, tensorboard
        self.wandb_mode, self.wandb_project = wandb, wandb_project
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        self.jsonl = None
        self.wandb = None  # the W&B run, started by `config`

    def _open(self) -> None:
        if self.jsonl is not None:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(self.path, "a")
            if self.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        except OSError as e:
            raise RunError(
                f"cannot write the run's logs in {self.run_dir} ({e.strerror or e}); check the "
                f"directory's permissions and free space, or choose another training.run_dir"
            ) from e

    def print(self, *args) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(" ".join(str(a) for a in args))

    def warn(self, *args) -> None:
        """A warning line on stderr (rank 0): never mixed into a command's output."""
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(" ".join(str(a) for a in args), file=sys.stderr)

    def progress(self, total: int, initial: int, enabled: bool | None, desc: str, unit: str = "it") -> "Progress":
        """A phase's progress on rank 0 (`Progress`): a bar where enabled is True (training.progress), or
        on a terminal for None; elsewhere a line in the log every PROGRESS_LINE_EVERY_S seconds."""
        return Progress(total, desc, unit, initial=initial, enabled=enabled, write=self.print, active=self.enabled)

    def config(self, step: int, config: dict, flat: dict) -> None:
        """At each start of a run (fresh or resumed), the resolved config: TensorBoard gets it as YAML text
        (tag `config`) and as hparams (one column per dotted key of `flat`); W&B as the run's config, in one
        W&B run per run directory (its id is derived from the path), continued by every resume."""
        if not self.enabled or not (self.tensorboard or self.wandb_mode != "off"):
            return
        self._open()
        if self.writer is not None:
            import yaml

            text = yaml.safe_dump(config, sort_keys=False)  # as config.yaml; indented: a markdown code block
            self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), step)
            hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}
            self.writer.add_hparams(hparams, {}, run_name=".", global_step=step)
        if self.wandb_mode != "off" and self.wandb is None:
            import hashlib

            try:
                import wandb
            except ImportError as e:  # config.validate_run says so before any work; kept for direct callers
                raise RunError(
                    f"training.wandb = {self.wandb_mode!r} needs the wandb package: uv sync --group wandb"
                ) from e
            run_id = hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:16]
            settings = wandb.Settings(
                silent=True, console="off", x_disable_stats=True, save_code=False, disable_git=True
            )
            self.wandb = wandb.init(
                mode=self.wandb_mode,
                project=self.wandb_project,
                dir=str(self.run_dir),
                name=self.run_dir.name,
                id=run_id,
                resume="allow",
                config=config,
                settings=settings,
            )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._open()
        try:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        except OSError as e:
            raise RunError(
                f"cannot append to {self.path} ({e.strerror or e}); the checkpoints written so far are intact"
            ) from e
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def figure(self, step: int, tag: str, figure) -> None:
        if self.enabled and self.tensorboard:
            self._open()
            self.writer.add_figure(tag, figure, step, close=False)
        if self.enabled and self.wandb is not None:
            import numpy as np
            import wandb

            figure.canvas.draw()
            self.wandb.log({tag: wandb.Image(np.asarray(figure.canvas.buffer_rgba())[..., :3])}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


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


def learning_rate(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float
) -> float:
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


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
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


class NonfiniteGuard:
    """Optimizer steps skipped for a non-finite gradient norm (optimizer_step skips them on the device),
    counted on the device without a host sync, warned about, and fatal after `limit` in a row. Skipped
    steps leave the weights, EMA and optimizer untouched, so a late abort loses nothing.

    limit: training.max_nonfinite_steps; unit: what a step is called in messages; hint: the setting to lower."""

    def __init__(self, limit: int, device, unit: str = "step", hint: str = "training.lr"):
        self.limit, self.unit, self.hint = limit, unit, hint
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.total = torch.zeros((), dtype=torch.long, device=device)
        self._reported = (0, 0)  # (total skipped, step) at the last warning

    def update(self, nonfinite: torch.Tensor) -> None:
        """nonfinite: the bool scalar optimizer_step returned."""
        self.in_a_row = torch.where(nonfinite, self.in_a_row + 1, 0)
        self.total += nonfinite

    def check(self, step: int, run_dir: Path, log, summarise: bool = True) -> None:
        """Read the counters (a host sync): warn about skipped steps (at the first one, then whenever
        `summarise` and there are new ones), and raise RunError after `limit` in a row."""
        total, in_a_row = int(self.total), int(self.in_a_row)
        reported_total, reported_step = self._reported
        if total > reported_total and (summarise or reported_total == 0):
            log(
                f"WARNING: {total - reported_total} optimizer step(s) between {self.unit}s {reported_step} and {step} "
                f"had a non-finite gradient norm and were skipped (weights, EMA and optimizer unchanged); {in_a_row} "
                f"in a row now, training.max_nonfinite_steps = {self.limit}"
            )
            self._reported = (total, step)
        if in_a_row >= self.limit:
            saved = ckpt.list_checkpoints(run_dir)
            last = f"the last checkpoint, {saved[-1][1]}, is untouched" if saved else "no checkpoint was written yet"
            raise RunError(
                f"{in_a_row} consecutive non-finite steps (training.max_nonfinite_steps = {self.limit}) "
                f"ending at {self.unit} {step}; aborting: the loss or gradients diverged (try a lower "
                f"{self.hint}, or check the data for NaN/inf). {last}"
            )


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


def set_cpu_threads(device: torch.device, requested: int | None, small_model: bool) -> None:
    """training.threads on CPU: the number requested, else (null) one intra-op thread for a small model and
    torch's default for the rest. No-op on an accelerator."""
    if device.type == "cpu":
        threads = requested or (1 if small_model else None)
        if threads:
            torch.set_num_threads(threads)


def distributed_model(module: torch.nn.Module, runtime: Runtime, find_unused_parameters: bool = False):
    """module wrapped in DistributedDataParallel under torchrun (device_ids on CUDA); as is in one process."""
    if not runtime.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused_parameters)
