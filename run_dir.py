"""The run directory for the life of one command: one owner, its config, resume or refuse, the stop
signal, and the finished marker. Both trainers, eval_imagenet.py and scripts/generate_pairs.py use it.

    with Run(run_dir, runtime, tensorboard=True) as run:      # the owner lock, the logger, SIGTERM
        source = run.checkpoint_to_resume(resume, start_over)   # None: a fresh start
        ... load it; run.accept_resume(saved_config, config, source, step) refuses what may not change
        if not run.start(config, step, target_steps):          # config.yaml; False: already finished
            return EXIT_OK
        while step < target_steps:                             # the trainer's own loop
            ...
            stop, save, evaluate = run.due(step, target_steps, cfg.training)
            if save: save; if stop: return EXIT_PREEMPTED; if evaluate: evaluate
        with run.final_phase():                                # SIGTERM here raises Preempted (exit 75)
            write the outputs
            run.finish(step, outputs)                          # finished.json, written last

A run is finished when finished.json names its last step and every output it lists exists; a re-run of
a finished run writes nothing. One process owns a run directory at a time (an flock on RUN/.lock).
"""

import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

import checkpoint as ckpt
from cli import exit_on_help
from config import ConfigError, require_tracking_packages, to_plain
from presets import entry_point_help
from runtime import EXIT_PREEMPTED, MetricLogger, Preempted, RunError, Runtime, broadcast_object, device_runtime

# --- where a run lives ---------------------------------------------------------------------------


def resolve_run_dir(cfg, runtime: Runtime) -> Path:
    """training.run_dir, or runs/<experiment>_<timestamp> chosen once on rank 0."""
    if cfg.training.run_dir:
        return Path(cfg.training.run_dir)
    if cfg.training.resume == "auto":
        raise ConfigError("training.resume = 'auto' needs training.run_dir (the run to continue)")
    stamp = broadcast_object(time.strftime("%Y%m%d-%H%M%S") if runtime.is_main else None, runtime)
    return Path("runs") / f"{cfg.experiment}_{stamp}"


def fit_from_command_line(argv: list[str] | None, doc: str, entry: str, load, trainer_cls) -> int:
    """The training entry points: `--help`, the config `load(argv)`, the device, then
    trainer_cls(cfg, runtime, run_dir).fit() -> the process exit code."""
    argv = sys.argv[1:] if argv is None else argv
    exit_on_help(argv, doc, *entry_point_help(entry))
    cfg = load(argv)
    require_tracking_packages(cfg.training)
    with device_runtime(cfg.device) as runtime:
        return trainer_cls(cfg, runtime, resolve_run_dir(cfg, runtime)).fit()


# --- the run directory: one owner at a time -------------------------------------------------------


class RunDirLock:
    """An advisory lock (flock) on RUN_DIR/.lock held for the life of the owning process: a second
    trainer started in the same directory refuses, naming the first. The kernel drops the lock when
    its holder dies, so a SIGKILLed owner never leaves it stuck."""

    def __init__(self, run_dir: Path, key: str = "training.run_dir"):
        self.path = Path(run_dir) / ".lock"
        self.key = key  # the setting that chose the directory, for the messages
        self.file = None

    def acquire(self) -> "RunDirLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            file = open(self.path, "a+")
        except OSError as e:
            raise RunError(
                f"run dir {self.path.parent} is not writable ({e.strerror}); choose another {self.key}"
            ) from e
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            owner = file.read().strip() or "unknown"
            file.close()
            raise RunError(
                f"run dir {self.path.parent} is in use by another process ({owner}); wait for it to "
                f"finish, stop it, or choose another {self.key}"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{' '.join(sys.argv)[:200]}"
        )
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "tb",
    "config.yaml",
    "resumes.jsonl",
    "samples.png",
    "samples.npz",
    "eval.json",
    "finished.json",
)  # what a run writes; start_over moves them aside


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


def write_finished(run_dir: Path, step: int, outputs: list[str], record: dict | None = None) -> None:
    """Mark the run finished: the final checkpoint (step, manifest sha256), the outputs that exist and the
    trainer's `record` (e.g. GRPO's fidelity guard verdict). No wall-clock time (the file's mtime has it):
    an interrupted run ends with the same bytes."""
    name = ckpt.step_dir_name(step)
    manifest = run_dir / "checkpoints" / name / "manifest.json"
    marker = {
        "step": step,
        "checkpoint": name,
        "manifest_sha256": ckpt.sha256_file(manifest) if manifest.is_file() else None,
        "outputs": outputs,
        **(record or {}),
    }
    ckpt.atomic_write_text(run_dir / FINISHED, json.dumps(marker, indent=2))


def is_finished(run_dir: Path, step: int) -> bool:
    """True when the run's marker names this step and every output it lists exists."""
    try:
        marker = json.loads((run_dir / FINISHED).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return marker.get("step") == step and all((run_dir / name).exists() for name in marker.get("outputs", []))


def refuse_inside_run(out, key: str = "out") -> None:
    """A reader (inference.py, eval_imagenet.py) must not write into a run directory: its samples.npz would
    replace the run's own final outputs. OUT, or a folder above it, that is a run directory (its
    config.yaml beside checkpoints/, or finished.json) is refused, before anything is read or written. A
    folder that merely holds a checkpoints/ folder (a volume mounted at /checkpoints) is not a run."""
    out = Path(out).expanduser().resolve()
    for folder in [out, *out.parents]:
        is_run = (folder / "config.yaml").is_file() and (folder / "checkpoints").is_dir()
        if is_run or (folder / FINISHED).is_file():
            raise ConfigError(
                f"{key} = {str(out)!r} is inside the run directory {folder}, whose outputs it would overwrite; "
                f"write somewhere else, e.g. {key}={folder.parent / (folder.name + '_samples')}"
            )


# --- the stop signal ------------------------------------------------------------------------------


PREEMPTED_IN_FINAL_PHASE = (
    f"SIGTERM during the final evaluation: its outputs are not written; exiting with code "
    f"{EXIT_PREEMPTED} (requeue the same command to finish)"
)


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
            raise Preempted(PREEMPTED_IN_FINAL_PHASE)

    _raising = False

    @contextlib.contextmanager
    def raising(self):
        """Within: SIGTERM raises Preempted at once (for work with no step boundary to stop at)."""
        if self.requested:
            raise Preempted(PREEMPTED_IN_FINAL_PHASE)
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


# --- resume ---------------------------------------------------------------------------------------


def find_resume_checkpoint(
    run_dir: Path, resume: str | None, runtime: Runtime, log, start_over: bool = False
) -> str | None:
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
            raise ConfigError(
                f"training.run_dir = {str(run_dir)!r} already holds checkpoints; pass "
                f"training.resume=auto to continue it, or choose another training.run_dir"
            )
        if not start_over:
            raise ckpt.CheckpointError(
                f"no checkpoint under {run_dir / 'checkpoints'} verifies (damaged ones are kept as step_*.corrupt); "
                f"not starting over it. Restore a good copy, or pass training.start_over=true to move this attempt "
                f"to {run_dir}/attempt_N/ and train from step 0"
            )
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
                f"{section} = {to_plain(current.get(section))}; resume with the original {section} config or start "
                f"a new run_dir"
            )


# Keys a resume may change: how long to run, how often to log / save / evaluate, where the data and
# the evaluation classifier are, the device, and the evaluation sampler. Everything else (seed, lr,
# batch size, epochs, dataset, GRPO recipe, ...) defines the run's trajectory and must stay as it was.
RESUME_MAY_CHANGE = (
    "training.resume",
    "training.run_dir",
    "training.max_steps",
    "training.log_every",
    "training.checkpoint_every",
    "training.keep_last",
    "training.eval_every",
    "training.num_eval_samples",
    "training.classifier",
    "training.max_nonfinite_steps",
    "training.tensorboard",
    "training.wandb",
    "training.wandb_project",
    "training.progress",
    "training.compile",
    "training.start_over",
    "training.init",
    "training.threads",
    "training.fid_reference",
    "training.fid_samples",
    "training.inception_weights",
    "device",
    "dataset.root",
    "dataset.download",
    "solver",
    "seed_checkpoint",
    # GRPO's lr is constant after warm-up, so its iteration count sets only how long the
    # run goes (like max_steps); train.py's epochs set the LR schedule and stay fixed.
    "grpo.epochs",
)


# Keys added after checkpoints were already being written, with the value that reproduces what those
# older runs did: a checkpoint without the key is compared as if it held this value, so resuming an old
# independent-coupling run is no change, while resuming an old GRPO run under Flow-GRPO's new defaults
# is refused (pass the old value to continue it as it was).
ADDED_KEYS = {
    "training.coupling.name": "independent",
    "training.coupling.pairs": None,
    "training.coupling.within_class": True,
    "grpo.detach_uncond": False,
    "grpo.timestep_selection": "random",
    "grpo.guidance_interval": [0.0, 1.0],
    "training.wandb": "off",
    "training.wandb_project": "nanoflow",
    # the stable-objective options and the fidelity guard: absent means off, as those runs were
    "grpo.objective": "flow_grpo",
    "grpo.lr_schedule": "constant",
    "grpo.min_lr_ratio": 0.0,
    "grpo.ratio_norm": False,
    "grpo.sampler": "sde",
    "grpo.window.size": None,
    "grpo.window.mode": "fixed",
    "grpo.window.start": 0,
    "grpo.window.stride": 1,
    "grpo.window.every": 1,
    "grpo.nft.beta": 1.0,
    "grpo.nft.advantage_max": 5.0,
    "grpo.nft.timesteps": 4,
    "grpo.guard.enabled": False,
    "grpo.guard.min_accuracy": 0.9,
    "grpo.guard.max_fd_ratio": 3.0,
    "grpo.guard.patience": 2,
    "grpo.guard.action": "rollback",
    "grpo.guard.lr_factor": 0.5,
    "grpo.guard.max_rollbacks": 3,
    "grpo.guard.samples": "ode",
    "flow.meanflow.endpoint_fraction": 0.0,  # flow-map runs started before the knob drew no endpoints
    "flow.meanflow.guidance_interval": [0.0, 1.0],  # flow-map runs started before it folded CFG at every t
}


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
    changes = {key: [old.get(key), new.get(key)] for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}
    refused = [key for key in changes if not any(key == k or key.startswith(f"{k}.") for k in RESUME_MAY_CHANGE)]
    if refused:
        shown = ", ".join(f"{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in refused)
        raise ConfigError(
            f"resuming {source} would change {shown}; these keys fix the run being continued. Resume "
            f"with the original values, or start a new training.run_dir. Keys a resume may change: "
            f"{', '.join(RESUME_MAY_CHANGE)}"
        )
    return changes


def record_resume(run_dir: Path, step: int, changes: dict) -> None:
    """Append one line per resume to RUN_DIR/resumes.jsonl: when, from which step, what changed."""
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(
            json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "step": step, "changes": changes}, default=str)
            + "\n"
        )


# --- the lifecycle --------------------------------------------------------------------------------


class Run:
    """One command's hold on a run directory (module docstring). Rank 0 owns the files; every rank
    shares the decisions (what to resume, when to stop)."""

    def __init__(
        self,
        run_dir: Path,
        runtime: Runtime,
        tensorboard: bool = False,
        key: str = "training.run_dir",
        wandb: str = "off",
        wandb_project: str = "nanoflow",
    ):
        self.dir, self.runtime, self.tensorboard, self.key = Path(run_dir), runtime, tensorboard, key
        self.wandb, self.wandb_project = wandb, wandb_project
        self.log = MetricLogger(self.dir, enabled=False, tensorboard=False)  # nothing is written before open
        self.stop = StopSignal(runtime)
        self.resumed = None  # (step, changed keys) once accept_resume has run
        self._lock = None

    def __enter__(self) -> "Run":
        if self.runtime.is_main:
            self._lock = RunDirLock(self.dir, self.key).acquire()
        self.log = MetricLogger(self.dir, self.runtime.is_main, self.tensorboard, self.wandb, self.wandb_project)
        self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop.__exit__(*exc)
        self.log.close()
        if self._lock is not None:
            self._lock.release()
        return False

    def checkpoint_to_resume(self, resume: str | None, start_over: bool = False) -> str | None:
        return find_resume_checkpoint(self.dir, resume, self.runtime, self.log.print, start_over=start_over)

    def accept_resume(self, saved_config, config, source: Path, step: int, unit: str = "step") -> dict:
        """Refuse a resume that changes what fixes the run; print and remember (for resumes.jsonl) what
        it changes -> {key: [old, new]}."""
        changes = resume_changes(saved_config, config, source)
        changes.pop("training.resume", None)
        self.resumed = (step, changes)
        changed = "; changed: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()) if changes else ""
        self.log.print(f"resumed from {source} at {unit} {step}{changed}")
        return changes

    def start(self, config, step: int, target_steps: int, unit: str = "step") -> bool:
        """Write config.yaml (a resume keeps the original; resumes.jsonl records the changes) -> False when
        the run is already finished at target_steps (nothing to do), else True."""
        if self.runtime.is_main and not (self.dir / "config.yaml").exists():
            ckpt.atomic_write_text(self.dir / "config.yaml", OmegaConf.to_yaml(config, resolve=True))
        if step >= target_steps and (not self.runtime.is_main or is_finished(self.dir, step)):
            self.log.print(f"run {self.dir} already finished at {unit} {step} (target {target_steps}); nothing to do")
            return False
        if self.resumed is not None and self.runtime.is_main:
            record_resume(self.dir, *self.resumed)
        plain = to_plain(config)
        self.log.config(step, plain, flatten(plain))
        return True

    def stop_requested(self, step: int, unit: str = "step") -> bool:
        """The SIGTERM vote (every rank agrees); when it passes, say so: the caller saves and exits 75."""
        if not self.stop.agreed():
            return False
        self.log.print(f"SIGTERM: saving {unit} {step} and exiting with code {EXIT_PREEMPTED} (requeue to resume)")
        return True

    def due(self, step: int, target_steps: int, run_cfg, unit: str = "step") -> tuple[bool, bool, bool]:
        """What a loop owes after `step` (run_cfg: training.*) -> (stop, save, evaluate): stop on an agreed
        SIGTERM (after saving); save at checkpoint_every, at the last step and before stopping; evaluate at
        eval_every (the last step's evaluation is the final one)."""
        stop = self.stop_requested(step, unit)
        save = stop or step % run_cfg.checkpoint_every == 0 or step == target_steps
        evaluate = bool(run_cfg.eval_every) and step % run_cfg.eval_every == 0 and step != target_steps
        return stop, save, evaluate and not stop

    @contextlib.contextmanager
    def final_phase(self):
        """The final evaluation and outputs: SIGTERM here raises Preempted at once (there is no step to
        finish), the outputs are not written, and the entry point exits 75; a requeue completes them."""
        with self.stop.raising():
            yield

    def finish(self, step: int, outputs: list[str], record: dict | None = None) -> None:
        """Mark the run finished (rank 0), after its outputs exist; `record` joins the marker."""
        if self.runtime.is_main:
            write_finished(self.dir, step, outputs, record)

    # -- sharded work: a directory filled chunk by chunk by any number of ranks (eval_imagenet.py,
    # scripts/generate_pairs.py). A chunk is written atomically; the caller says which ones are complete.

    def claim(self, path: Path, settings: dict, what: str, write, recorded=None) -> None:
        """Rank 0 writes the settings at the first run (write(path, settings), atomically), or refuses a
        directory whose recorded settings differ, naming the keys; every rank then agrees. recorded: the
        file's JSON -> the settings it records (default: the file is the settings)."""
        if self.runtime.is_main:
            if path.is_file():
                saved = json.loads(path.read_text())
                saved = recorded(saved) if recorded else saved
                if json.dumps(saved, sort_keys=True) != json.dumps(settings, sort_keys=True):
                    differ = sorted(k for k in settings if saved.get(k) != settings[k])
                    raise RunError(
                        f"out = {str(self.dir)!r} holds {what} made with other settings (differing: "
                        f"{', '.join(differ)}); use another out directory or the original settings"
                    )
            else:
                self.dir.mkdir(parents=True, exist_ok=True)
                write(path, settings)
        if self.runtime.distributed:
            dist.barrier()

    def my_chunks(self, num_chunks: int) -> range:
        """This rank's share of the chunks: r, r + W, r + 2W, ..."""
        return range(self.runtime.rank, num_chunks, self.runtime.world_size)

    def require_chunks(self, num_chunks: int, exists, where: Path) -> None:
        """After every rank's share: each chunk must exist (exists(c) -> bool), else RunError."""
        if self.runtime.distributed:
            dist.barrier()
        if not self.runtime.is_main:
            return
        missing = [c for c in range(num_chunks) if not exists(c)]
        if missing:
            raise RunError(f"{len(missing)} chunks missing in {where} after sampling (first {missing[0]})")
