"""SkyPilot chains of training stages: render, validate, launch, simulate; and the stage hand-off check.

    # the ImageNet-256 chain (masked80 -> unmasked20 -> eval) as one SkyPilot pipeline YAML, printed
    uv run python scripts/sky_chain.py render --dry-run
    # ... written (cloud/runpod_imagenet256_chain.yaml is this file, kept in sync by tests/test_cloud_chain.py)
    uv run python scripts/sky_chain.py render --infra runpod/CA --out cloud/runpod_imagenet256_chain.yaml
    # validated by SkyPilot's own loader, each stage's cost estimated, then launched as a managed job
    uv run python scripts/sky_chain.py launch --infra runpod/CA --gpus H100:8 --no-use-spot --run-name h1024-a
    # any presets: --stage NAME=PRESET (in order; each stage starts from the previous one's weights)
    uv run python scripts/sky_chain.py render --stage masked=imagenet256_latent_dit_smoke \\
        --stage unmasked=imagenet256_latent_dit_smoke_unmasked --override training.epochs=6 --dry-run
    # the chain on this machine: each task's `setup:` and `run:` in a copy of exactly the files SkyPilot
    # uploads (SKYPILOT_* set, `uv run` -> this venv), with a SIGTERM (exit 75, re-run as job_recovery
    # does) or a SIGKILL (re-run) injected into a stage; --gpus-per-node 2 runs each stage as 2 CPU ranks
    uv run python scripts/sky_chain.py simulate --smoke --root /tmp/chain --preempt masked --kill unmasked

    # used by the chain's `run:` commands (exit 0 if so, 1 with one `error:` line if not)
    uv run python scripts/sky_chain.py require-finished /checkpoints/h1024-a/masked80
    uv run python scripts/sky_chain.py eval-done /checkpoints/h1024-a/eval [--samples-only]

The chain is cloud_chain.py's: the YAML is built as data (dicts -> yaml.safe_dump_all); SkyPilot parses it with
sky.utils.dag_utils.load_chain_dag_from_yaml_str (sky.Task.from_yaml_config per task) before anything is
written or launched. Every task's `workdir` is the repository (SkyPilot uploads it without what
.gitignore or a .skyignore excludes, and runs `setup:` and `run:` there); every stage starts its entry point
through scripts/launch_stage.py, one process per GPU of the node. Cost estimates (which import torch) are
made by `launch` only, so `render` takes seconds. docs/cloud.md is the runbook.
"""

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from cli import pick
from cloud_chain import (
    CKPT_ROOT,
    DEFAULT_STAGES,
    DEFAULT_VOLUME,
    EXIT_ERROR,
    EXIT_OK,
    FINISHED,
    check_finished,
    dump,
    eval_done,
    load_dag,
    render,
    signal_when_checkpointed,
    simulate,
    smoke_chain,
)

ROOT = Path(__file__).resolve().parents[1]


# --- costs -----------------------------------------------------------------------------------------------


def stage_costs(docs: list[dict], gpus: int, usd_per_gpu_hour: float | None = None) -> list[dict]:
    """Each training stage's estimate from scripts/estimate_training_cost.py json=true (a subprocess: scripts
    do not import scripts), from the composed config's model, epochs and mask ratio."""
    from config import load_config, to_plain

    rows = []
    for task in docs[1:]:
        envs = task.get("envs", {})
        if "EXPERIMENT" not in envs:
            continue
        cfg = load_config(
            [
                f"experiment={envs['EXPERIMENT']}",
                "training.init.checkpoint=none-needed-here",
                *shlex.split(envs.get("EXTRA_OVERRIDES", "")),
            ]
        )
        model = to_plain(cfg.model)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            yaml.safe_dump(model, handle)
        stage = f"stages.{task['name']}"
        command = [
            sys.executable,
            str(ROOT / "scripts" / "estimate_training_cost.py"),
            f"model={handle.name}",
            f"{stage}.mask_ratio={model.get('mask_ratio', 0.0)}",
            f"{stage}.epochs={cfg.training.epochs}",
            f"gpus={gpus}",
            "json=true",
        ]
        if usd_per_gpu_hour is not None:
            command += [f"usd_per_gpu_hour={usd_per_gpu_hour}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
        finally:
            os.unlink(handle.name)
        rows.append(json.loads(result.stdout)[0])
    return rows


def gpu_count(gpus: str | None) -> int:
    return int(gpus.split(":")[1]) if gpus and ":" in gpus else 1


# --- command line ----------------------------------------------------------------------------------------


def _stages(values) -> list[tuple[str, str]]:
    if not values:
        return list(DEFAULT_STAGES)
    out = []
    for value in values:
        name, sep, preset = value.partition("=")
        if not sep or not name or not preset:
            raise ValueError(f"--stage {value!r}: expected NAME=PRESET")
        out.append((name, preset))
    return out


def _render_from_args(args) -> list[dict]:
    return render(
        _stages(args.stage),
        **pick(args, "name", "run_name", "gpus", "infra", "use_spot", "max_restarts", "bucket", "num_samples"),
        overrides=args.override,
        volume=None if args.bucket else args.volume,
        evaluate=not args.no_eval,
        reference=args.reference or None,
    )


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("require-finished", help="exit 0 if RUN_DIR holds a finished run, else 1")
    check.add_argument("run_dir")
    done = sub.add_parser("eval-done", help="exit 0 if an evaluation directory is complete, else 1")
    done.add_argument("out_dir")
    done.add_argument("--samples-only", action="store_true", help="samples.npz suffices (metrics=false)")
    for command in ("render", "launch"):
        p = sub.add_parser(command, help=f"{command} a chain of presets")
        p.add_argument(
            "--stage", action="append", help="NAME=PRESET, in order (default: the H1024 masked80 -> unmasked20)"
        )
        p.add_argument("--override", action="append", default=[], help="a Hydra override for every training stage")
        p.add_argument("--name", default="nanoflow-imagenet256", help="the pipeline (chain) name")
        p.add_argument(
            "--run-name", default="h1024-chain", help="stable run id: run dirs are /checkpoints/RUN_NAME/STAGE"
        )
        p.add_argument("--gpus", default="H100:1", help="accelerators per node, e.g. H100:1, H100:8")
        p.add_argument("--infra", default=None, help="e.g. runpod, runpod/CA, aws/us-east-1, k8s")
        p.add_argument("--use-spot", action=argparse.BooleanOptionalAction, default=False)
        p.add_argument("--max-restarts", type=int, default=3, help="job_recovery.max_restarts_on_errors")
        p.add_argument("--volume", default=DEFAULT_VOLUME, help="SkyPilot volume mounted at /checkpoints")
        p.add_argument("--bucket", default=None, help="a bucket mounted at /checkpoints instead of a volume")
        p.add_argument("--no-eval", action="store_true")
        p.add_argument("--num-samples", type=int, default=50000)
        p.add_argument(
            "--reference",
            default=f"{CKPT_ROOT}/reference/VIRTUAL_imagenet256_labeled.npz",
            help="reference statistics on the volume ('' = samples only)",
        )
        p.add_argument("--usd-per-gpu-hour", type=float, default=None)
        p.add_argument(
            "--dry-run", action="store_true", help="print the YAML and stop (launch: with each stage's cost estimate)"
        )
        p.add_argument("--out", default=None, help="write the YAML here")
        p.add_argument("--secret", action="append", default=[], help="launch only: NAME (value from the environment)")
    sim = sub.add_parser("simulate", help="run a chain's run: commands locally")
    sim.add_argument("yaml", nargs="?", help="a rendered chain YAML (default: --smoke)")
    sim.add_argument("--smoke", action="store_true", help="the smoke chain with tiny steps")
    sim.add_argument("--root", required=True, help="local stand-in for the volume (CKPT_ROOT)")
    sim.add_argument("--env", action="append", default=[], help="KEY=VALUE for every task")
    sim.add_argument("--preempt", action="append", default=[], help="SIGTERM this stage after its first checkpoint")
    sim.add_argument("--kill", action="append", default=[], help="SIGKILL this stage after its first checkpoint")
    sim.add_argument(
        "--gpus-per-node",
        type=int,
        default=0,
        help="SKYPILOT_NUM_GPUS_PER_NODE of the simulated node (N > 0: N CPU ranks per stage)",
    )
    args = parser.parse_args(argv)

    if args.command == "require-finished":
        problem = check_finished(args.run_dir)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_ERROR
        print(f"{Path(args.run_dir) / FINISHED}: finished")
        return EXIT_OK
    if args.command == "eval-done":
        if eval_done(args.out_dir, args.samples_only):
            print(f"evaluation {args.out_dir} already complete; nothing to do")
            return EXIT_OK
        return EXIT_ERROR
    if args.command == "simulate":
        bad = [item for item in args.env if "=" not in item or item.startswith("=")]
        if bad:
            return fail(f"--env {bad[0]!r}: expected KEY=VALUE")
        if args.yaml:
            try:
                docs = [d for d in yaml.safe_load_all(Path(args.yaml).read_text()) if d is not None]
            except (OSError, yaml.YAMLError) as error:
                return fail(f"{args.yaml}: not a readable chain YAML ({str(error).splitlines()[0]})")
            if len(docs) < 2 or not all(isinstance(d, dict) and "run" in d for d in docs[1:]):
                return fail(f"{args.yaml}: expected a pipeline (a `name:` document, then tasks with `run:`)")
            envs = {"CKPT_ROOT": str(Path(args.root) / "checkpoints")}
        else:
            docs, envs = smoke_chain(args.root)
        envs.update(dict(item.split("=", 1) for item in args.env))
        signals = {**{s: signal.SIGTERM for s in args.preempt}, **{s: signal.SIGKILL for s in args.kill}}
        code = simulate(
            docs, envs, fault=signal_when_checkpointed(signals) if signals else None, gpus_per_node=args.gpus_per_node
        )
        print(f"chain exit {code}")
        return code

    try:
        docs = _render_from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    text = dump(docs)
    try:
        dag = load_dag(text)  # SkyPilot's parser: a schema error stops here, before anything is written
    except ImportError:
        return fail("SkyPilot is not installed: `uv sync --group cloud` (docs/cloud.md)")
    if args.command == "render":
        if args.out:
            Path(args.out).write_text(text)
            print(f"wrote {args.out}: {len(dag.tasks)} tasks ({', '.join(t.name for t in dag.tasks)})")
        else:
            print(text)
        return EXIT_OK
    if args.dry_run:
        print(text)
    for row in stage_costs(docs, gpu_count(args.gpus), args.usd_per_gpu_hour):
        print(
            f"estimate {row['name']}: {row['eflops']:.2f} EFLOPs, {row['gpu_hours']:.1f} GPU-hours, "
            f"{row['wall_hours']:.1f} h wall, ${row['usd']:.2f} (at {row['mfu']:.0%} MFU; "
            "scripts/estimate_training_cost.py)",
            file=sys.stderr,
        )
    if args.dry_run:
        return EXIT_OK

    import sky

    secrets = [(name, os.environ[name]) for name in args.secret if name in os.environ]
    missing = [name for name in args.secret if name not in os.environ]
    if missing:
        print(f"error: --secret {', '.join(missing)}: not set in the environment", file=sys.stderr)
        return EXIT_ERROR
    for task in docs[1:]:
        task["workdir"] = str(ROOT)  # the upload's source, wherever `launch` is run from
    text = dump(docs)
    from sky.utils import dag_utils

    dag = dag_utils.load_chain_dag_from_yaml_str(text, secrets_overrides=secrets or None)
    dag.name = args.name
    request_id = sky.jobs.launch(dag, name=args.run_name)
    job_ids, _ = sky.stream_and_get(request_id)
    print(f"managed job {job_ids}: `sky jobs logs {job_ids[0] if job_ids else ''}`, `sky jobs queue`")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
