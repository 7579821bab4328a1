"""The run harness every entry point shares (nanochat's `common.py`): devices and processes, the run
directory, the SIGTERM stop vote and exit codes, the metric logger, EMA, the LR schedule, seeding,
resume lookup and one optimizer step.

Exit codes: 0 done (or already finished), 1 error (one `error:` line on stderr), 75 (EX_TEMPFAIL)
stopped by SIGTERM after saving a checkpoint: requeue the same command to continue.
"""

import contextlib
import copy
import fcntl
import json
import math
import os
import signal
import socket
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


class RunError(RuntimeError):
    """A fault of a run (an unwritable run dir, a run dir in use, diverged training); the message
    names the path or setting and the cause, and entry points print it as one `error:` line."""


class Preempted(Exception):
    """SIGTERM arrived while the stop signal was raising (the final evaluation)."""


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
    if _allocator_configured or not sys.platform.startswith("linux") or "glibc.malloc" in os.environ.get(
            "GLIBC_TUNABLES", ""):
        return _allocator_configured
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        _allocator_configured = bool(libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))
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
    """`sys.exit(main(argv))` for an entry point. A config, checkpoint, data or run fault, and any
    OSError (disk full, permissions), is one `error:` line on stderr (a few indented detail lines
    may follow) and exit code 1; NANOFLOW_DEBUG=1 shows the traceback instead."""
    from datasets import DatasetNotFoundError
    from sampling import NonFiniteSamplesError
    from vae import VAENotFoundError

    configure_allocator()
    try:
        sys.exit(main(argv))
    except (ConfigError, ckpt.CheckpointError, DatasetNotFoundError, VAENotFoundError, RunError,
            NonFiniteSamplesError, OSError) as error:
        if os.environ.get("NANOFLOW_DEBUG"):
            raise
        print(f"error: {describe_error(error)}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


def describe_error(error: BaseException) -> str:
    """An exception as the text after `error:`; an OSError names its file and cause."""
    if isinstance(error, OSError) and error.strerror and error.filename:  # a raw OSError; ours carry a message
        return f"{error.filename}: {error.strerror} ({type(error).__name__})"
    return str(error)


# --- the run directory: one owner at a time -------------------------------------------------------


class RunDirLock:
    """An advisory lock (flock) on RUN_DIR/.lock held for the life of the owning process: a second
    trainer started in the same directory refuses, naming the first. The kernel drops the lock when
    its holder dies, so a SIGKILLed owner never leaves it stuck."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def acquire(self) -> "RunDirLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "a+")
        except OSError as e:
            raise RunError(f"run dir {self.path.parent} is not writable ({e.strerror}); choose another "
                           f"training.run_dir") from e
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            owner = file.read().strip() or "unknown"
            file.close()
            raise RunError(f"run dir {self.path.parent} is in use by another process ({owner}); wait for it to "
                           f"finish, stop it, or choose another training.run_dir") from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                   f"{' '.join(sys.argv)[:200]}")
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


RUN_FILES = ("checkpoints", "metrics.jsonl", "tb", "config.yaml", "resumes.jsonl", "samples.png", "samples.npz",
             "eval.json", "finished.json")  # what a run writes; start_over moves them aside


def archive_attempt(run_dir: Path) -> Path:
    """Move an earlier attempt's files into RUN_DIR/attempt_N/ (nothing is deleted) -> that folder."""
    n = 1
    while (run_dir / f"attempt_{n}").exists():
        n += 1
    target = run_dir / f"attempt_{n}"
    target.mkdir()
    for name in RUN_FILES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, target / name)
    return target


FINISHED = "finished.json"  # written last by a run that produced all its final outputs


def write_finished(run_dir: Path, step: int, outputs: list[str]) -> None:
    """Mark the run finished: the final checkpoint (step, manifest sha256) and the outputs that exist."""
    name = ckpt.step_dir_name(step)
    manifest = run_dir / "checkpoints" / name / "manifest.json"
    marker = {"step": step, "checkpoint": name,
              "manifest_sha256": ckpt.sha256_file(manifest) if manifest.is_file() else None,
              "outputs": outputs, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(run_dir / FINISHED, json.dumps(marker, indent=2))


def is_finished(run_dir: Path, step: int) -> bool:
    """True when the run's marker names this step and every output it lists exists."""
    try:
        marker = json.loads((run_dir / FINISHED).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("step") == step and all((run_dir / name).exists() for name in marker.get("outputs", []))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file under a temporary name and rename it: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        if self._raising:
            raise Preempted()

    _raising = False

    @contextlib.contextmanager
    def raising(self):
        """Within: SIGTERM raises Preempted at once (for work with no step boundary to stop at)."""
        if self.requested:
            raise Preempted()
        self._raising = True
        try:
            yield
        finally:
            self._raising = False

    def agreed(self) -> bool:
        if not self.runtime.distributed:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


def run_loop(stop: StopSignal, loop, finish, log) -> int:
    """The end every trainer shares: `loop()` under the stop signal, then `finish()` (the final
    evaluation, writing the outputs and the finished marker last). SIGTERM at any point -> saved
    state and EXIT_PREEMPTED; the same command again completes whatever is missing."""
    with stop:
        loop()
        if stop.requested:
            return EXIT_PREEMPTED
        try:
            with stop.raising():
                finish()
        except Preempted:
            log.print(f"SIGTERM during the final evaluation: its outputs are not written; exiting with code "
                      f"{EXIT_PREEMPTED} (requeue the same command to finish)")
            return EXIT_PREEMPTED
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


def find_resume_checkpoint(run_dir: Path, resume: str | None, runtime: Runtime, log,
                           start_over: bool = False) -> str | None:
    """What to resume from, decided on rank 0 and shared: None for a fresh start. A run dir that has
    held checkpoints never starts over silently: without resume it is an error, and with resume=auto
    a run whose checkpoints all fail verification (the owner moves them aside as step_*.corrupt) is an
    error on every later try too, unless start_over moves the earlier attempt to RUN/attempt_N/."""
    held = ckpt.has_checkpoint_history(run_dir)
    if resume not in (None, "auto"):
        return resume
    found = None
    if resume == "auto":
        found = ckpt.latest_valid_checkpoint(run_dir, log=log, quarantine=True) if runtime.is_main else None
        found = broadcast_object(str(found) if found else None, runtime)
    if found is not None:
        return found
    if held and runtime.is_main:
        valid = ckpt.list_checkpoints(run_dir)
        if valid and resume is None:
            raise ConfigError(f"training.run_dir = {str(run_dir)!r} already holds checkpoints; pass "
                              f"training.resume=auto to continue it, or choose another training.run_dir")
        if not start_over:
            raise ckpt.CheckpointError(
                f"no checkpoint under {run_dir / 'checkpoints'} verifies (damaged ones are kept as step_*.corrupt); "
                f"not starting over it. Restore a good copy, or pass training.start_over=true to move this attempt "
                f"to {run_dir}/attempt_N/ and train from step 0")
        log(f"training.start_over=true: moved the earlier attempt to {archive_attempt(run_dir)}; starting fresh")
    elif resume == "auto":
        log(f"training.resume=auto: no checkpoint in {run_dir}, starting fresh")
    return None


def check_compatible(saved, current, source: Path) -> None:
    """Resuming must not change what the weights mean (model, flow)."""
    for section in ("model", "flow"):
        if to_plain(saved.get(section)) != to_plain(current.get(section)):
            raise ckpt.CheckpointError(
                f"checkpoint {source} was trained with {section} = {to_plain(saved.get(section))}, but this run has "
                f"{section} = {to_plain(current.get(section))}; resume with the original {section} config or start a new run_dir"
            )


# Keys a resume may change: how long to run, how often to log / save / evaluate, where the data and
# the evaluation classifier are, the device, and the evaluation sampler. Everything else (seed, lr,
# batch size, epochs, dataset, GRPO recipe, ...) defines the run's trajectory and must stay as it was.
RESUME_MAY_CHANGE = ("training.resume", "training.run_dir", "training.max_steps", "training.log_every",
                     "training.checkpoint_every", "training.keep_last", "training.eval_every",
                     "training.num_eval_samples", "training.classifier", "training.max_nonfinite_steps",
                     "training.tensorboard", "training.progress", "training.compile", "training.start_over",
                     "training.init", "training.threads", "training.fid_reference", "training.fid_samples",
                     "training.inception_weights", "device", "dataset.root", "dataset.download", "solver",
                     "seed_checkpoint",
                     # GRPO's lr is constant after warm-up, so its iteration count sets only how long the
                     # run goes (like max_steps); train.py's epochs set the LR schedule and stay fixed.
                     "grpo.epochs")


# Keys added after checkpoints were already being written, with the value that reproduces what those
# older runs did: a checkpoint without the key is compared as if it held this value, so resuming an old
# independent-coupling run is no change, while resuming an old GRPO run under Flow-GRPO's new defaults
# is refused (pass the old value to continue it as it was).
ADDED_KEYS = {"training.coupling.name": "independent", "training.coupling.pairs": None,
              "training.coupling.within_class": True, "grpo.detach_uncond": False, "grpo.timestep_selection": "random",
              "grpo.guidance_interval": [0.0, 1.0]}


def flatten(node, prefix: str = "") -> dict:
    """Nested mappings -> {dotted key: leaf value}."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    out = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def resume_changes(saved, current, source: Path) -> dict[str, list]:
    """The keys this command changes relative to the checkpoint's config -> {key: [old, new]}; a change
    outside RESUME_MAY_CHANGE is refused (it would silently change the run being continued)."""
    check_compatible(saved, current, source)
    old, new = flatten(to_plain(saved)), flatten(to_plain(current))
    for key, value in ADDED_KEYS.items():
        if key in new and key not in old:
            old[key] = value
    changes = {key: [old.get(key), new.get(key)] for key in sorted(set(old) | set(new))
               if old.get(key) != new.get(key)}
    refused = [key for key in changes if not any(key == k or key.startswith(f"{k}.") for k in RESUME_MAY_CHANGE)]
    if refused:
        shown = ", ".join(f"{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in refused)
        raise ConfigError(f"resuming {source} would change {shown}; these keys fix the run being continued. Resume "
                          f"with the original values, or start a new training.run_dir. Keys a resume may change: "
                          f"{', '.join(RESUME_MAY_CHANGE)}")
    return changes


def record_resume(run_dir: Path, step: int, changes: dict) -> None:
    """Append one line per resume to RUN_DIR/resumes.jsonl: when, from which step, what changed."""
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step, "changes": changes},
                           default=str) + "\n")


# --- logging ------------------------------------------------------------------------------------


class MetricLogger:
    """One logging path: console, metrics.jsonl and TensorBoard, written by rank 0 only. The files
    open at the first write, so a run that ends before logging anything leaves none."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.run_dir, self.enabled, self.tensorboard = run_dir, enabled, tensorboard
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        self.jsonl = None

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
            raise RunError(f"cannot write the run's logs in {self.run_dir} ({e.strerror or e}); check the "
                           f"directory's permissions and free space, or choose another training.run_dir") from e

    def print(self, *args) -> None:
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(" ".join(str(a) for a in args))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._open()
        try:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        except OSError as e:
            raise RunError(f"cannot append to {self.path} ({e.strerror or e}); the checkpoints written so far "
                           f"are intact") from e
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def figure(self, step: int, tag: str, figure) -> None:
        if self.enabled and self.tensorboard:
            self._open()
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
