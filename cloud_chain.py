"""SkyPilot job chains of training stages as data: render a chain (one task per stage, in order) to a
pipeline YAML and parse it with SkyPilot's own loader; the stage hand-off checks (`finished.json`, a
complete evaluation); and the local simulation that runs a chain's `setup:` and `run:` in a copy of
exactly what SkyPilot uploads. scripts/sky_chain.py is the command line; docs/cloud.md the runbook.

Nothing here imports torch: rendering a chain takes seconds.
"""

import copy
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent

FINISHED = "finished.json"  # run_dir.FINISHED (not imported: runtime pulls in torch; tests check they agree)
EXIT_OK, EXIT_ERROR, EXIT_PREEMPTED = 0, 1, 75  # runtime.EXIT_* (the same check)

H1024 = "imagenet256_latent_dit_m2_moe_layerwise_h1024_d20_e16_c2_moew05"
DEFAULT_STAGES = [("masked80", f"{H1024}_masked80"), ("unmasked20", f"{H1024}_unmasked20")]
SMOKE_STAGES = [("masked", "imagenet256_latent_dit_smoke"), ("unmasked", "imagenet256_latent_dit_smoke_unmasked")]
# tiny step counts for the smoke chain (12 steps a stage, a checkpoint every 2, a 4-sample eval)
SMOKE_OVERRIDES = [
    "training.epochs=6",
    "training.checkpoint_every=2",
    "training.tensorboard=false",
    "training.progress=false",
]
SMOKE_EVAL = ["device=cpu", "num_steps=2", "chunk_size=2", "batch_size=2"]

STAGE_NAME = re.compile(r"[a-z0-9_-]+")  # stage names become path parts inside the bash `run:`
WORKDIR = "."  # the repository: `sky jobs launch cloud/...yaml` is run from its root (launch sets it absolute)
CKPT_ROOT = "/checkpoints"  # the persistent volume (RunPod network volume) or bucket mount of every task
DEFAULT_VOLUME = "nanoflow-data"
SECRETS = {"HF_TOKEN": None}  # a null reference: the value comes from `--secret HF_TOKEN` at launch, never a file
SETUP = "\n".join(
    [
        "command -v uv >/dev/null 2>&1 || python3 -m pip install --user uv",
        'export PATH="$PATH:$HOME/.local/bin"',
        "uv sync --locked",
    ]
)
PATH_LINE = 'export PATH="$PATH:$HOME/.local/bin"'  # appended: a uv already on PATH wins


def job_recovery(max_restarts_on_errors: int = 3) -> dict:
    """resources.job_recovery of every GPU task (sky/utils/schemas.py, SkyPilot 0.14): preemptions are
    always recovered; exit 75 (SIGTERM, checkpoint saved) is recovered without counting as an error."""
    return {
        "strategy": "FAILOVER",
        "max_restarts_on_errors": max_restarts_on_errors,
        "recover_on_exit_codes": [EXIT_PREEMPTED],
    }


# --- the stage hand-off ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_finished(run_dir) -> str | None:
    """None when RUN_DIR holds a finished run: finished.json names a checkpoint whose manifest.json has the
    recorded sha256 and whose every file has the size and sha256 the manifest records, and every output it
    lists exists. Else what is wrong, as one line."""
    run_dir = Path(run_dir)
    marker_path = run_dir / FINISHED
    if not run_dir.is_dir():
        return f"{marker_path} is missing: the run directory {run_dir} does not exist (has the previous stage run?)"
    if not marker_path.is_file():
        return f"{marker_path} is missing: the previous stage has not finished (resume it first)"
    try:
        marker = json.loads(marker_path.read_text())
        step, name = marker["step"], marker["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{marker_path} is unreadable ({error})"
    manifest = run_dir / "checkpoints" / name / "manifest.json"
    if not manifest.is_file():
        return f"{manifest} is missing: {marker_path} names checkpoint {name} (step {step})"
    expected = marker.get("manifest_sha256")
    if not expected:
        return f"{marker_path} records no manifest_sha256 for checkpoint {name}: it cannot be verified"
    if _sha256(manifest) != expected:
        return f"{manifest} does not match the sha256 in {marker_path}"
    # every file of the final checkpoint, as its manifest records it (a flipped byte in the weights)
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{manifest} is unreadable ({error})"
    for file_name, meta in files.items():
        path = manifest.parent / file_name
        if not path.is_file() or path.stat().st_size != meta.get("bytes") or _sha256(path) != meta.get("sha256"):
            return f"{path} does not match its size and sha256 in {manifest}: the checkpoint is damaged"
    for output in marker.get("outputs", []):
        if not (run_dir / output).exists():
            return f"{run_dir / output} is missing: {marker_path} lists it"
    return None


def eval_done(out_dir, samples_only: bool = False) -> bool:
    """An evaluation directory is done when metrics.json exists (samples.npz with --samples-only)."""
    out_dir = Path(out_dir)
    return (out_dir / "metrics.json").is_file() or samples_only and (out_dir / "samples.npz").is_file()


# --- rendering -------------------------------------------------------------------------------------------


def _run_dir(stage: str) -> str:
    return f"$CKPT_ROOT/$RUN_NAME/{stage}"


def train_run(stage: str, previous: str | None, preflight: bool) -> str:
    """The `run:` of a training stage: check the predecessor (and the cache), then train.py with resume=auto.
    $EXTRA_OVERRIDES is left unquoted on purpose: it is a space-separated list of Hydra overrides."""
    lines = [PATH_LINE, f'echo "stage {stage}: run $RUN_NAME, task ${{SKYPILOT_TASK_ID:-local}}"']
    init = []
    if previous is not None:
        lines.append(f'uv run python scripts/sky_chain.py require-finished "{_run_dir(previous)}" || exit 1')
        init = [f'training.init.checkpoint="{_run_dir(previous)}"']
    if preflight:
        lines.append('uv run python scripts/preflight_latent_cache.py cache="$CACHE_DIR/train" quick=true || exit 1')
    args = [
        'experiment="$EXPERIMENT"',
        f'training.run_dir="{_run_dir(stage)}"',
        "training.resume=auto",
        *init,
        'dataset.path="$CACHE_DIR"',
        'dataset.vae="$VAE"',
        "$EXTRA_OVERRIDES",
    ]
    lines.append("exec uv run python scripts/launch_stage.py train.py " + " ".join(args))
    return "\n".join(lines)


def eval_run(stage: str, previous: str, samples_only: bool) -> str:
    flag = " --samples-only" if samples_only else ""
    return "\n".join(
        [
            PATH_LINE,
            f'uv run python scripts/sky_chain.py require-finished "{_run_dir(previous)}" || exit 1',
            f'if uv run python scripts/sky_chain.py eval-done "{_run_dir(stage)}"{flag}; then exit 0; fi',
            f'exec uv run python scripts/launch_stage.py eval_imagenet.py checkpoint="{_run_dir(previous)}" '
            f'out="{_run_dir(stage)}" '
            'num_samples="$NUM_SAMPLES" $EVAL_OVERRIDES',
        ]
    )


def smoke_cache_run() -> str:
    """The smoke chain's first task: the tiny cache (random PNGs + tiny VAE) unless it exists, preflight."""
    return "\n".join(
        [
            PATH_LINE,
            '[ -f "$DATA_ROOT/cache/train/manifest.json" ] || '
            'uv run python scripts/build_latent_cache.py smoke out="$DATA_ROOT" || exit 1',
            'exec uv run python scripts/preflight_latent_cache.py cache="$DATA_ROOT/cache/train" quick=true',
        ]
    )


def resources(gpus: str | None, infra: str | None, use_spot: bool, max_restarts: int) -> dict:
    res = {"use_spot": use_spot, "disk_size": 256, "job_recovery": job_recovery(max_restarts)}
    if gpus:
        res["accelerators"] = gpus
    if infra:
        res["infra"] = infra
    return res


def render(
    stages=DEFAULT_STAGES,
    *,
    name: str = "nanoflow-imagenet256",
    run_name: str = "h1024-chain",
    overrides=(),
    stage_overrides: dict | None = None,
    gpus: str = "H100:1",
    infra: str | None = None,
    use_spot: bool = False,
    max_restarts: int = 3,
    volume: str | None = DEFAULT_VOLUME,
    bucket: str | None = None,
    ckpt_root: str = CKPT_ROOT,
    cache_dir: str = f"{CKPT_ROOT}/cache/imagenet256",
    vae: str = "sd_vae_ft_ema",
    smoke_cache: bool = False,
    evaluate: bool = True,
    num_samples: int = 50000,
    reference: str | None = f"{CKPT_ROOT}/reference/VIRTUAL_imagenet256_labeled.npz",
    eval_overrides=("solver=heun", "num_steps=32", "guidance_scale=1.5"),
) -> list[dict]:
    """The chain as data: [{"name": chain}, task, task, ...], one task per stage, run in order."""
    for stage, _ in stages:
        if not STAGE_NAME.fullmatch(stage) or stage == "eval" and evaluate:
            raise ValueError(
                f"stage name {stage!r}: expected lowercase letters, digits, '_' or '-' "
                "(and not 'eval' when the chain evaluates)"
            )
    stage_overrides = stage_overrides or {}
    common_envs = {"RUN_NAME": run_name, "CKPT_ROOT": ckpt_root}
    storage = {}
    if bucket:
        # MOUNT_CACHED: writes land on local disk first and are uploaded in the background; renames work,
        # so the trainer's atomic checkpoint writes stay atomic on the bucket copy.
        storage["file_mounts"] = {ckpt_root: {"name": bucket, "mode": "MOUNT_CACHED"}}
    elif volume:
        storage["volumes"] = {ckpt_root: volume}
    docs: list[dict] = [{"name": name}]
    if smoke_cache:
        docs.append(
            {
                "name": "cache",
                "resources": {"cpus": "2+", "infra": infra} if infra else {"cpus": "2+"},
                "envs": {**common_envs, "DATA_ROOT": str(Path(cache_dir).parent)},
                "secrets": dict(SECRETS),
                "workdir": WORKDIR,
                **copy.deepcopy(storage),
                "setup": SETUP,
                "run": smoke_cache_run(),
            }
        )
    previous = None
    for index, (stage, preset) in enumerate(stages):
        extra = [*overrides, *stage_overrides.get(stage, [])]
        docs.append(
            {
                "name": stage,
                "resources": resources(gpus, infra, use_spot, max_restarts),
                "envs": {
                    **common_envs,
                    "EXPERIMENT": preset,
                    "CACHE_DIR": cache_dir,
                    "VAE": vae,
                    "EXTRA_OVERRIDES": " ".join(extra),
                },
                "secrets": dict(SECRETS),
                "workdir": WORKDIR,
                **copy.deepcopy(storage),
                "setup": SETUP,
                "run": train_run(stage, previous, preflight=index == 0),
            }
        )
        previous = stage
    if evaluate:
        eval_args = list(eval_overrides) + ([f"reference={reference}"] if reference else ["metrics=false"])
        docs.append(
            {
                "name": "eval",
                "resources": resources(gpus, infra, use_spot, max_restarts),
                "envs": {**common_envs, "NUM_SAMPLES": str(num_samples), "EVAL_OVERRIDES": " ".join(eval_args)},
                "secrets": dict(SECRETS),
                "workdir": WORKDIR,
                **copy.deepcopy(storage),
                "setup": SETUP,
                "run": eval_run("eval", previous, samples_only=reference is None),
            }
        )
    return docs


class _BlockDumper(yaml.SafeDumper):
    """yaml.SafeDumper that writes multi-line strings (the run/setup scripts) as literal blocks."""


def _str_representer(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)

HEADER = (
    "# Rendered by scripts/sky_chain.py (do not edit by hand; re-render). One SkyPilot pipeline: the tasks\n"
    "# below run in order as one managed job. docs/cloud.md is the runbook.\n"
)


def dump(docs: list[dict]) -> str:
    return HEADER + yaml.dump_all(docs, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=120)


# --- SkyPilot's own parser -------------------------------------------------------------------------------


def load_dag(text: str, env_overrides: dict | None = None):
    """Parse a (multi-document) task YAML with SkyPilot's pipeline loader -> sky.Dag (raises on schema errors)."""
    from sky.utils import dag_utils

    envs = list((env_overrides or {}).items()) or None
    return dag_utils.load_chain_dag_from_yaml_str(text, env_overrides=envs)


# --- local simulation ------------------------------------------------------------------------------------


def _uv_shim(directory: Path) -> Path:
    """A `uv` for the simulation (PATH puts it first): `uv run CMD...` runs CMD in this venv, and `uv sync`
    checks that the working directory holds the project and its lock (no install, no network)."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "uv"
    shim.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  run) shift; exec "$@" ;;\n'
        '  sync) for f in pyproject.toml uv.lock; do [ -f "$f" ] || '
        '{ echo "error: uv sync: $(pwd)/$f is missing (was the code uploaded?)" >&2; exit 2; }; done; exit 0 ;;\n'
        '  *) echo "error: uv $1: not simulated" >&2; exit 2 ;;\n'
        "esac\n"
    )
    shim.chmod(0o755)
    return directory


def upload_copy(source: Path, target: Path) -> Path:
    """TARGET: the files SkyPilot uploads as a task's workdir SOURCE (everything but what its own
    sky.data.storage_utils.get_excluded_files lists: .skyignore's patterns, else git's ignore rules)."""
    from sky.data import storage_utils

    source = Path(source).resolve()
    excluded = {os.path.normpath(path) for path in storage_utils.get_excluded_files(str(source))}

    def ignore(directory, names):
        relative = os.path.relpath(directory, source)
        return {name for name in names if os.path.normpath(os.path.join(relative, name)) in excluded}

    shutil.copytree(source, target, ignore=ignore, symlinks=True)
    return target


def stage_env(task: dict, index: int, env_overrides: dict, shim_dir: Path, gpus_per_node: int = 0) -> dict:
    """What SkyPilot gives a task's `setup:` and `run:`: its envs (plus overrides) and the SKYPILOT_*
    variables (GPUs per node: 0 is a CPU-only node, N > 0 starts N CPU ranks through launch_stage.py)."""
    env = {**os.environ, **{k: str(v) for k, v in task.get("envs", {}).items()}, **env_overrides}
    env.update(
        {
            "SKYPILOT_TASK_ID": f"sky-managed-simulated_{env.get('RUN_NAME', 'chain')}_1_{index}",
            "SKYPILOT_NODE_RANK": "0",
            "SKYPILOT_NUM_NODES": "1",
            "SKYPILOT_NODE_IPS": "127.0.0.1",
            "SKYPILOT_NUM_GPUS_PER_NODE": str(gpus_per_node),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PATH"] = os.pathsep.join([str(shim_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_stage(task: dict, env: dict, fault=None, attempt: int = 0, log=print, workdir: Path = ROOT) -> int:
    """One try of a task on a fresh VM: its `setup:`, then its `run:`, each under bash in WORKDIR -> the
    exit code (negative: killed by a signal)."""
    pipes = dict(cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if task.get("setup"):
        setup = subprocess.run(["bash", "-c", task["setup"]], **pipes)
        for line in setup.stdout.splitlines():
            log(f"  [{task['name']}#{attempt} setup] {line}")
        if setup.returncode != 0:
            return setup.returncode
    process = subprocess.Popen(["bash", "-c", task["run"]], start_new_session=True, **pipes)
    if fault is not None:
        fault(task, attempt, process, env)
    output, _ = process.communicate()
    for line in output.splitlines():
        log(f"  [{task['name']}#{attempt}] {line}")
    return process.returncode


def simulate(
    docs: list[dict],
    env_overrides: dict | None = None,
    fault=None,
    log=print,
    max_tries: int = 10,
    gpus_per_node: int = 0,
) -> int:
    """Run a chain's tasks in order as the managed-jobs controller would, each in a copy of what SkyPilot
    uploads from its workdir: a task that exits 0 hands on to the next; one killed by a signal (a lost VM)
    or exiting with a recover_on_exit_codes code is started again (setup, then the same command); any other
    exit is retried up to max_restarts_on_errors times, then fails the chain with that code."""
    env_overrides = {k: str(v) for k, v in (env_overrides or {}).items()}
    with tempfile.TemporaryDirectory(prefix="sky_chain_sim_") as tmp:
        shim = _uv_shim(Path(tmp) / "bin")
        uploads: dict[str, Path] = {}
        for index, task in enumerate(docs[1:]):
            if "workdir" not in task:
                log(f"stage {task['name']}: no workdir, so SkyPilot uploads no code to its VM")
                return EXIT_ERROR
            source = str((ROOT / task["workdir"]).resolve())  # relative: launched from the repository root
            if source not in uploads:
                uploads[source] = upload_copy(Path(source), Path(tmp) / f"sky_workdir_{len(uploads)}")
            recovery = task.get("resources", {}).get("job_recovery") or {}
            recover = set(recovery.get("recover_on_exit_codes") or [])
            errors_left = recovery.get("max_restarts_on_errors", 0)
            env = stage_env(task, index, env_overrides, shim, gpus_per_node)
            for attempt in range(max_tries):
                started = time.perf_counter()
                code = run_stage(task, env, fault, attempt, log, workdir=uploads[source])
                log(f"stage {task['name']} try {attempt}: exit {code} ({time.perf_counter() - started:.1f} s)")
                if code == EXIT_OK:
                    break
                if code < 0 or code in recover:
                    continue
                if errors_left <= 0:
                    return code
                errors_left -= 1
            else:
                return EXIT_ERROR
    return EXIT_OK


def signal_when_checkpointed(stage_signals: dict, log=print):
    """A simulate() fault: on the first try of each stage named in stage_signals, wait for its first
    checkpoint, then send that signal to the stage's process group (SIGTERM: a preemption notice; SIGKILL:
    the VM gone)."""

    def fault(task, attempt, process, env):
        sig = stage_signals.get(task["name"])
        if sig is None or attempt > 0:
            return
        checkpoints = Path(env["CKPT_ROOT"]) / env["RUN_NAME"] / task["name"] / "checkpoints"
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if any(p.name.startswith("step_") for p in checkpoints.glob("step_*")):
                break
            time.sleep(0.005)
        if process.poll() is None:
            log(f"stage {task['name']}: sending {signal.Signals(sig).name}")
            os.killpg(process.pid, sig)

    return fault


def smoke_chain(root, run_name: str = "smoke-chain") -> tuple[list[dict], dict]:
    """The smoke chain (cache -> masked smoke DiT -> unmasked smoke -> samples-only eval) with tiny steps, and
    the env overrides that put /checkpoints under ROOT: what the tests and `simulate --smoke` run."""
    root = Path(root)
    docs = render(
        SMOKE_STAGES,
        name="nanoflow-smoke",
        run_name=run_name,
        overrides=SMOKE_OVERRIDES,
        cache_dir=str(root / "data" / "cache"),
        vae=str(root / "data" / "vae"),
        smoke_cache=True,
        num_samples=4,
        reference=None,
        eval_overrides=SMOKE_EVAL,
        gpus=None,
    )
    return docs, {"CKPT_ROOT": str(root / "checkpoints")}
