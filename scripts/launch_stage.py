"""Run an entry point on every GPU of a SkyPilot node (torchrun), keeping the project's exit codes.

    # in a task's `run:` (SkyPilot sets the SKYPILOT_* variables on every node)
    uv run python scripts/launch_stage.py train.py experiment=... training.resume=auto
    # the same on this machine: two CPU processes (gloo), as `sky_chain.py simulate --gpus-per-node 2` does
    SKYPILOT_NUM_GPUS_PER_NODE=2 uv run python scripts/launch_stage.py train.py training.max_steps=4

Processes per node: $SKYPILOT_NUM_GPUS_PER_NODE (0 on a CPU-only node counts as 1). Nodes:
$SKYPILOT_NUM_NODES, this node's rank $SKYPILOT_NODE_RANK, the rendezvous on the first line of
$SKYPILOT_NODE_IPS (the head node). One process on one node runs the entry point directly (no torchrun:
the same process tree as `python train.py`). Otherwise torch.distributed.run starts the ranks; it reports
any rank's failure as exit 1, so a stop on SIGTERM (every failed rank exited 75 or was signalled, or the
launcher itself got the SIGTERM) is turned back into 75, the code SkyPilot's job_recovery re-runs without
counting an error.
"""

import os
import sys

EXIT_ERROR, EXIT_PREEMPTED = 1, 75  # runtime.EXIT_* (not imported: runtime pulls in torch before it is needed)
RENDEZVOUS_PORT = 29500


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"error: ${name}={value!r}: expected an integer") from None


def torchrun_args(entry: str, args: list[str]) -> list[str] | None:
    """The torch.distributed.run argv for this node, or None when one process on one node suffices."""
    nproc = max(_int_env("SKYPILOT_NUM_GPUS_PER_NODE", 1), 1)
    nodes = max(_int_env("SKYPILOT_NUM_NODES", 1), 1)
    if nproc == 1 and nodes == 1:
        return None
    if nodes == 1:
        # --standalone: a local rendezvous on a free port, so two stages on one machine never collide
        launch = ["--standalone"]
    else:
        head = (os.environ.get("SKYPILOT_NODE_IPS", "").strip().splitlines() or [""])[0].strip()
        if not head:
            raise SystemExit(f"error: $SKYPILOT_NODE_IPS is empty: {nodes} nodes need the head node's address")
        launch = [
            f"--nnodes={nodes}",
            f"--node_rank={_int_env('SKYPILOT_NODE_RANK', 0)}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={head}:{RENDEZVOUS_PORT}",
            f"--rdzv_id={os.environ.get('RUN_NAME', 'nanoflow')}",
        ]
    return [*launch, f"--nproc_per_node={nproc}", entry, *args]


def exit_code_of_failures(exit_codes: list[int]) -> int:
    """torchrun's failed ranks -> one exit code: 75 when every one stopped for a SIGTERM, else 1."""
    stopped = [code == EXIT_PREEMPTED or code < 0 for code in exit_codes]
    return EXIT_PREEMPTED if exit_codes and all(stopped) and EXIT_PREEMPTED in exit_codes else EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else EXIT_ERROR
    entry, args = argv[0], argv[1:]
    if not os.path.isfile(entry):
        print(f"error: {entry}: no such entry point in {os.getcwd()}", file=sys.stderr)
        return EXIT_ERROR
    launch = torchrun_args(entry, args)
    if launch is None:
        os.execv(sys.executable, [sys.executable, entry, *args])
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(launch))
    except ChildFailedError as error:
        return exit_code_of_failures([failure.exitcode for failure in error.failures.values()])
    except SignalException:
        # torchrun got the SIGTERM too and has passed it to every rank, which saved and stopped
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
