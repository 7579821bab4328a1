"""The one checkpoint format, writer and loader (training resume, inference, eval, GRPO seed).

Layout: RUN_DIR/checkpoints/step_XXXXXXX/ with
  model.safetensors   raw weights (no `module.` / `_orig_mod.` prefixes)
  ema.safetensors     EMA weights (absent when EMA is off)
  state.pt            the writer's dict plus step and format_version (torch.load(weights_only=True)):
                      the trainer's holds the optimizer, EMA update count, non-finite streak, and the
                      epoch / batch position for inspection; GRPO's the optimizer and non-finite streak.
                      No RNG state: every draw is seeded from (seed, rank, step), so the step restores it.
  config.yaml         the resolved config of the run
  manifest.json       sha256 + size of every file above and `meta` (sample_shape, ...); written last
A checkpoint is written to a hidden temp dir and renamed into place, so a directory named
step_* is complete unless its bytes were damaged later, which the manifest catches.
RUN_DIR/checkpoints/latest is a symlink to the newest step_* dir, replaced atomically after each save.
RUN_DIR/checkpoints/best.json names the run's published checkpoint when its trainer chose one (a GRPO run's
fidelity guard: the best checkpoint that satisfies its constraint), e.g. {"step": 20, "checkpoint": "step_0000020"}.

Which checkpoint a path means (`resolve_checkpoint`), one rule: a step_* dir is itself; RUN/checkpoints/latest
is the newest that verifies; RUN/checkpoints/best is best.json's; a run dir is what the run published: best.json's
checkpoint when it wrote one, else the newest that verifies. Resuming always continues the newest (best=False).

Readers (inference, the GRPO seed, training.init) never modify a run directory: a damaged checkpoint
is skipped with a warning. Only the run's owner (resume=auto, under the run-dir lock) moves damaged
ones aside as step_*.corrupt.
"""

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step_(\d{7,})$")
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or incompatible."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    config: DictConfig
    model: dict[str, torch.Tensor] | None
    ema: dict[str, torch.Tensor] | None
    state: dict | None
    meta: dict  # free-form facts for loaders, e.g. sample_shape, num_classes


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DDP's `module.` and torch.compile's `_orig_mod.` prefixes; contiguous CPU copies."""
    out = {}
    for name, tensor in state_dict.items():
        name = name.replace("_orig_mod.", "").removeprefix("module.").replace(".module.", ".")
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | Path):
    """Yield a temporary path beside PATH; when the block ends without an error, rename it onto PATH.
    Readers see the old file or the new one, never a part; a failed write leaves no temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        if error.filename or not error.errno:
            raise
        # a write into an open file (disk full) names no file: name the one that was being written
        raise OSError(error.errno, error.strerror, str(path)) from error
    finally:
        tmp.unlink(missing_ok=True)


# --- shards: a file written whole, with its size and sha256 recorded beside it ------------------------


def digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def record_digest(path: str | Path) -> None:
    """Write PATH.sha256 ("<sha256> <bytes>") for a file just written atomically: the shard is done only
    when its record exists and matches (a truncated or damaged shard is found on resume)."""
    path = Path(path)
    atomic_write_text(digest_path(path), f"{sha256_file(path)} {path.stat().st_size}\n")


def shard_problem(path: str | Path) -> str | None:
    """None when PATH and its record agree; else what is wrong (missing, no record, size, sha256)."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        sha256, size = digest_path(path).read_text().split()
    except (OSError, ValueError):
        return f"no size and sha256 recorded in {digest_path(path).name}"
    if path.stat().st_size != int(size):
        return f"{path.stat().st_size} bytes, {size} recorded (truncated?)"
    if sha256_file(path) != sha256:
        return "sha256 differs from the recorded one (damaged)"
    return None


def shard_done(path: str | Path, log) -> bool:
    """Whether a shard is complete. One that exists but fails its record is moved aside as
    *.corrupt (log says so) so that it is redone; nothing is deleted."""
    path = Path(path)
    problem = shard_problem(path)
    if problem is None:
        return True
    if path.is_file():
        aside = path.with_name(path.name + ".corrupt")
        log(f"WARNING: {path}: {problem}; moving it aside to {aside.name} and redoing it")
        os.replace(path, aside)
        digest_path(path).unlink(missing_ok=True)
    return False


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: dict[str, torch.Tensor],
    ema: dict[str, torch.Tensor] | None,
    state: dict,
    config: DictConfig,
    keep_last: int | None = None,
    meta: dict | None = None,
    protect: set[int] | None = None,
) -> Path:
    """Atomically write step_XXXXXXX under run_dir/checkpoints; returns its path. Pruning to keep_last
    spares the steps in `protect` (e.g. the guard's rollback target and best).

    Writing the same step twice keeps the first copy if it verifies (a re-save after resume
    is a no-op) and refuses otherwise: nothing already saved is overwritten.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    if final.exists():
        verify_checkpoint(final)
        return final
    for stale in root.glob(".tmp_*"):  # left by a process killed mid-save (one owner per run dir: the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp_{step_dir_name(step)}_{os.getpid()}"
    files = {"model.safetensors": lambda p: save_file(clean_state_dict(model), p)}
    if ema is not None:
        files["ema.safetensors"] = lambda p: save_file(clean_state_dict(ema), p)
    full_state = _canonical({**state, "format_version": FORMAT_VERSION, "step": step})
    files["state.pt"] = lambda p: torch.save(full_state, p)
    files["config.yaml"] = lambda p: Path(p).write_text(OmegaConf.to_yaml(config, resolve=True))
    try:
        tmp.mkdir()
        for name, write in files.items():
            write(str(tmp / name))
        _write_manifest(tmp, step, list(files), meta or {})
        _fsync_dir(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
    except (OSError, RuntimeError, SafetensorError) as error:  # ENOSPC, EROFS, EACCES; torch.save's "unexpected pos"
        shutil.rmtree(tmp, ignore_errors=True)
        previous = [path for _, path in list_checkpoints(run_dir)]
        intact = (
            f"the last complete checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        )
        cause = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"could not write checkpoint {final} ({type(error).__name__}: {cause}; disk full or "
            f"not writable?); {intact}"
        ) from error
    point_latest(root, final.name)
    if keep_last:
        prune_checkpoints(run_dir, keep_last, protect)
    return final


def _canonical(value):
    """`value` rebuilt with interned strings and fresh containers. Pickle memoises strings and containers
    by identity, so a state holding strings read back from a checkpoint (a resumed run's optimizer keys)
    would otherwise pickle to other bytes than the same state built in one process: state.pt, and with it
    the manifest and finished.json, must not depend on whether the run was interrupted."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        return {_canonical(k): _canonical(v) for k, v in value.items()}
    if type(value) in (list, tuple):  # exact types: a namedtuple or torch.Size is left as it is
        return type(value)(_canonical(v) for v in value)
    return value


def point_latest(root: Path, name: str) -> None:
    """root/latest -> name, as a relative symlink swapped in atomically (a reader sees old or new)."""
    tmp = root / f".tmp_latest_{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(name, tmp)
        os.replace(tmp, root / "latest")
    except OSError:  # a file system without symlinks: readers resolve `latest` by listing instead
        tmp.unlink(missing_ok=True)


def _write_manifest(directory: Path, step: int, names: list[str], meta: dict) -> None:
    # no wall-clock time in it (the file's mtime has that): an interrupted run writes the same bytes
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "meta": meta,
        "files": {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size} for n in names},
    }
    with open(directory / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(path: str | Path) -> dict:
    """Check the manifest against the files; returns the manifest or raises CheckpointError."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no manifest.json: it is incomplete (interrupted save?)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: manifest.json is unreadable ({e})") from None
    for required in ("model.safetensors", "state.pt", "config.yaml"):
        if required not in files:
            raise CheckpointError(f"checkpoint {path}: manifest does not list {required}")
    for name, meta in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if file.stat().st_size != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} has {file.stat().st_size} bytes, manifest says {meta['bytes']} (truncated?)"
            )
        if sha256_file(file) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} fails its sha256 check (corrupted on disk)")
    return manifest


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step_* dir under run_dir/checkpoints, oldest first (unverified)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def _warn(message: str) -> None:
    print(message, file=sys.stderr)  # a warning, never mixed into a command's output on stdout


def latest_valid_checkpoint(run_dir: str | Path, log=_warn, quarantine: bool = False) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are reported, never silently skipped.
    quarantine (the run's owner only): also rename them to step_*.corrupt, so a later save of the same
    step cannot collide with them. Readers leave the directory as it is."""
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            if not quarantine:
                log(f"WARNING: {e}; skipping it and trying the previous checkpoint")
                continue
            quarantined = path.with_name(f"{path.name}.corrupt")
            log(f"WARNING: {e}; moving it aside to {quarantined.name} and trying the previous checkpoint")
            if not quarantined.exists():
                path.rename(quarantined)
    return None


def has_checkpoint_history(run_dir: str | Path) -> bool:
    """Whether run_dir/checkpoints ever held a checkpoint: a step_* dir, or one moved aside as corrupt."""
    root = Path(run_dir) / "checkpoints"
    return root.is_dir() and any(STEP_DIR.match(p.name.removesuffix(".corrupt")) for p in root.iterdir())


BEST = "best.json"  # under RUN/checkpoints: the checkpoint the run published (module docstring)


def write_best(run_dir: str | Path, step: int, record: dict) -> None:
    """RUN/checkpoints/best.json -> step_XXXXXXX (which must exist), with its manifest's sha256 and `record`
    (why it is the best); atomic, and with no wall-clock time, so an interrupted run writes the same bytes."""
    root = Path(run_dir) / "checkpoints"
    name = step_dir_name(step)
    marker = {"step": step, "checkpoint": name, "manifest_sha256": sha256_file(root / name / "manifest.json")}
    atomic_write_text(root / BEST, json.dumps({**marker, **record}, indent=2))


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint RUN/checkpoints/best.json names (verified), or None when the run published none.
    A best.json whose checkpoint is missing or damaged is an error: falling back to another checkpoint
    could publish a policy the run itself rejected."""
    marker_path = Path(run_dir) / "checkpoints" / BEST
    if not marker_path.is_file():
        return None
    try:
        name = json.loads(marker_path.read_text())["checkpoint"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker_path} is unreadable ({e}); sample RUN/checkpoints/latest instead") from None
    path = marker_path.parent / name
    if not path.is_dir():
        raise CheckpointError(
            f"{marker_path} names {name}, which does not exist; sample {marker_path.parent / 'latest'} (the newest) "
            f"or a step_* dir explicitly"
        )
    verify_checkpoint(path)
    return path


def resolve_checkpoint(path: str | Path, best: bool = True) -> Path:
    """A checkpoint dir, a run dir, RUN_DIR/checkpoints/latest or RUN_DIR/checkpoints/best -> a verified
    checkpoint dir (the rule in the module docstring). best=False: a run dir means its newest checkpoint
    (what resuming continues)."""
    path = Path(path)
    if path.name == "best" and not (path / "manifest.json").is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        found = best_checkpoint(run_dir)
        if found is None:
            raise CheckpointError(f"run dir {run_dir} published no best checkpoint ({BEST} is absent); use latest")
        return found
    if path.name == "latest":  # the newest checkpoint that verifies, whatever the symlink points at
        path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        best = False
    if (path / "manifest.json").is_file() or STEP_DIR.match(path.name):
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {path} does not exist")
        verify_checkpoint(path)
        return path
    if path.is_dir() and (path / "checkpoints").is_dir():
        found = best_checkpoint(path) if best else None
        found = found or latest_valid_checkpoint(path)
        if found is None:
            raise CheckpointError(f"run dir {path} holds no complete checkpoint under {path / 'checkpoints'}")
        return found
    raise CheckpointError(
        f"{path} is neither a checkpoint dir (with manifest.json), a run dir (with checkpoints/), "
        f"nor RUN_DIR/checkpoints/latest"
    )


def load_checkpoint(
    path: str | Path,
    map_location="cpu",
    load_model: bool = True,
    load_ema: bool = True,
    load_state: bool = True,
    best: bool = True,
) -> Checkpoint:
    """Resolve (`resolve_checkpoint`, best as there), verify and read a checkpoint; each part can be skipped."""
    path = resolve_checkpoint(path, best)
    manifest = json.loads((path / "manifest.json").read_text())
    device = str(map_location)
    model = load_file(str(path / "model.safetensors"), device=device) if load_model else None
    ema = None
    if load_ema and (path / "ema.safetensors").is_file():
        ema = load_file(str(path / "ema.safetensors"), device=device)
    state = None
    if load_state:
        try:
            state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:  # verified bytes, but not tensors only
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            detail = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else type(error).__name__)
            raise CheckpointError(
                f"checkpoint {path}: state.pt cannot be read as tensors only (torch.load(weights_only=True): "
                f"{detail}); it is never unpickled with code"
            ) from None
    config = OmegaConf.create((path / "config.yaml").read_text())
    return Checkpoint(
        path=path,
        step=int(manifest["step"]),
        config=config,
        model=model,
        ema=ema,
        state=state,
        meta=manifest.get("meta", {}),
    )


INTERVAL_PREFIX = "interval_embed."
GUIDANCE_PREFIX = "guidance_embed."  # models.GuidanceEmbedding, zero-initialised like the interval embedding


def load_weights(
    module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str, keep_init: tuple[str, ...] = ()
) -> list[str]:
    """load_state_dict(strict) with one readable error naming what does not match. Keys under a prefix in
    keep_init may be absent from `weights` (they keep the module's own initial values); returns those."""
    own = module.state_dict()
    kept = sorted(k for k in set(own) - set(weights) if k.startswith(keep_init)) if keep_init else []
    missing = sorted(set(own) - set(weights) - set(kept))
    unexpected = sorted(set(weights) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in weights and weights[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit this model (was it trained with another model config?)"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict({**{k: own[k] for k in kept}, **weights}, strict=True)
    return kept


def init_from_checkpoint(init, model: torch.nn.Module, ema_model: torch.nn.Module | None, optimizer, device):
    """A fresh run's start from `init` (training.init: checkpoint, model / ema in {model, ema, none},
    optimizer, step), each part on or off -> (the checkpoint's step when init.step else None, its EMA
    update count, a line saying what was loaded). The architecture must match (load_weights names any
    difference); dataset, flow and masking may change, which is the point (masked pretrain -> unmasked).
    Two additions are allowed: a flow map (model.interval_conditioning) started from a checkpoint without
    an interval embedding keeps that embedding's zero init (models.IntervalEmbedding), so it starts as
    exactly the checkpoint's velocity model; likewise a guidance embedding (model.guidance_conditioning,
    models.GuidanceEmbedding) missing from the checkpoint."""

    wanted = {init.model, init.ema} - {"none"}
    loaded = load_checkpoint(
        init.checkpoint,
        map_location=device,
        load_model="model" in wanted,
        load_ema="ema" in wanted,
        load_state=init.optimizer or init.step,
    )
    weights = {"model": loaded.model, "ema": loaded.ema}
    for part, target in (("model", model), ("ema", ema_model)):
        source = getattr(init, part)
        if source == "none" or target is None:
            continue
        if weights[source] is None:
            raise CheckpointError(
                f"training.init.{part} = {source!r}, but checkpoint {loaded.path} has no "
                f"{source}.safetensors; use training.init.{part}=model or none"
            )
        # the attributes every model family keeps its zero-initialised embeddings under (models.ZeroInitEmbedding)
        new = tuple(
            prefix
            for prefix in (INTERVAL_PREFIX, GUIDANCE_PREFIX)
            if getattr(target, prefix.rstrip("."), None) is not None
        )
        kept = load_weights(target, weights[source], f"training.init.checkpoint {loaded.path} ({source})", new)
    if ema_model is not None and init.ema == "none" and init.model != "none":
        ema_model.load_state_dict(model.state_dict())  # the EMA starts where the model starts
    if init.optimizer:
        optimizer.load_state_dict(loaded.state["optimizer"])
    parts = [f"{part} <- {getattr(init, part)}" for part in ("model", "ema")] + [
        part for part in ("optimizer", "step") if getattr(init, part)
    ]
    message = f"initialised from {loaded.path} (step {loaded.step}): {', '.join(parts)}"
    if kept:
        prefixes = ", ".join(f"{p}*" for p in sorted({k.split(".")[0] + "." for k in kept}))
        message += f"; {prefixes} ({len(kept)} tensors) not in it: zero-initialised"
    if not init.step:
        return None, None, message
    return loaded.step, int(loaded.state["ema_num_updates"]), message


def prune_checkpoints(run_dir: str | Path, keep_last: int, protect: set[int] | None = None) -> None:
    """Delete all but the newest `keep_last` step_* checkpoints and those of the steps in `protect`."""
    for step, path in list_checkpoints(run_dir)[:-keep_last]:
        if step not in (protect or ()):
            shutil.rmtree(path, ignore_errors=True)
