"""cloud/ and scripts/sky_chain.py: every task YAML parses with SkyPilot's own loader (offline, no
credentials), recovers exit 75, holds no secret value, and its Hydra overrides compose; the smoke chain's own
`run:` commands survive a SIGTERM (exit 75, re-run) and a SIGKILL (re-run) bit for bit, a stage refuses
to start without its predecessor's finished.json, and a finished chain re-launched does nothing.

SkyPilot is the `cloud` dependency group (`uv sync --group cloud`; .ci/run installs it). Without it the
file fails under CI (CI=true, so breakage is never hidden) and is skipped, with the install command as
the reason, on a developer's base install, where `uv run pytest` must pass."""

import copy
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch
import yaml

try:
    import sky  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs the cloud group: a missing `sky` is a failure there, never a skip
    pytest.skip("SkyPilot is not installed: `uv sync --group cloud` (docs/cloud.md)", allow_module_level=True)
from sky.utils import dag_utils, schemas  # noqa: E402
from sky.volumes.volume import Volume  # noqa: E402

import cloud_chain
import runtime
from config import EvalConfig, apply_schema, compose, load_config, validate_eval
from conftest import ROOT, assert_same_state, final_state, load_script
from run_dir import FINISHED

CLOUD = ROOT / "cloud"
YAMLS = sorted(CLOUD.glob("*.yaml"))
sky_chain = load_script("sky_chain")  # the command line; the chain itself is cloud_chain.py
launch_stage = load_script("launch_stage")


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def tasks_of(text: str) -> list[dict]:
    """The task documents of a single task or a pipeline (whose first document holds only `name`)."""
    docs = docs_of(text)
    return docs[1:] if len(docs) > 1 and set(docs[0]) <= {"name", "execution"} else docs


def is_volume(doc: dict) -> bool:
    return "type" in doc and "run" not in doc


def rendered_chains() -> dict[str, str]:
    return {
        "default": cloud_chain.dump(cloud_chain.render()),
        "runpod-spot": cloud_chain.dump(cloud_chain.render(infra="runpod/CA", use_spot=True, run_name="x")),
        "bucket-no-eval": cloud_chain.dump(cloud_chain.render(bucket="my-bucket", evaluate=False, infra="aws")),
        "smoke": cloud_chain.dump(cloud_chain.smoke_chain("/tmp/smoke-root")[0]),
    }


ALL_TEXTS = {**{p.name: p.read_text() for p in YAMLS}, **{f"rendered:{k}": v for k, v in rendered_chains().items()}}


def parse(text: str):
    """SkyPilot's own parsers: sky.volumes.volume.Volume for a volume, the pipeline loader otherwise."""
    docs = docs_of(text)
    if len(docs) == 1 and is_volume(docs[0]):
        volume = Volume.from_yaml_config(copy.deepcopy(docs[0]))
        volume.validate(skip_cloud_compatibility=True)
        return volume
    return dag_utils.load_chain_dag_from_yaml_str(text)


def test_the_cloud_files_exist_and_agree_with_the_runtime():
    names = {p.name for p in YAMLS}
    assert {
        "train.yaml",
        "runpod_volume.yaml",
        "runpod_latent_cache.yaml",
        "runpod_imagenet256_chain.yaml",
        "multinode_train.yaml",
    } <= names, names
    assert (cloud_chain.FINISHED, cloud_chain.EXIT_OK, cloud_chain.EXIT_ERROR, cloud_chain.EXIT_PREEMPTED) == (
        FINISHED,
        runtime.EXIT_OK,
        runtime.EXIT_ERROR,
        runtime.EXIT_PREEMPTED,
    )


@pytest.mark.parametrize("name", sorted(ALL_TEXTS))
def test_every_yaml_parses_with_skypilots_loader(name):
    parsed = parse(ALL_TEXTS[name])
    if isinstance(parsed, Volume):
        assert parsed.cloud == "runpod" and parsed.zone, parsed.to_yaml_config()
        return
    tasks = tasks_of(ALL_TEXTS[name])
    assert [t.name for t in parsed.tasks] == [t["name"] for t in tasks]
    assert parsed.is_chain()


def test_the_committed_chain_is_what_sky_chain_renders():
    expected = cloud_chain.dump(cloud_chain.render(infra="runpod/CA"))
    assert (CLOUD / "runpod_imagenet256_chain.yaml").read_text() == expected, (
        "re-render: uv run python scripts/sky_chain.py render --infra runpod/CA "
        "--out cloud/runpod_imagenet256_chain.yaml"
    )
    assert [d["name"] for d in tasks_of(expected)] == ["masked80", "unmasked20", "eval"]


@pytest.mark.parametrize("name", ["train.yaml", "runpod_imagenet256_chain.yaml", "multinode_train.yaml"])
def test_a_typo_in_a_resource_key_is_caught_by_the_parser(name):
    text = (CLOUD / name).read_text()
    assert re.search(r"^\s+accelerators:", text, flags=re.M)
    broken = re.sub(r"^(\s+)accelerators:", r"\1accelerator:", text, count=1, flags=re.M)
    with pytest.raises(Exception, match="accelerator"):
        parse(broken)
    with pytest.raises(Exception, match="run_comand|Invalid task YAML"):
        parse(text.replace("\nrun: ", "\nrun_comand: ", 1))


@pytest.mark.parametrize("name", sorted(ALL_TEXTS))
def test_no_yaml_holds_a_secret_value(name):
    text = ALL_TEXTS[name]
    for doc in docs_of(text):
        secrets = doc.get("secrets", {})
        assert all(value is None for value in secrets.values()), (name, secrets)
        for key, value in (doc.get("envs") or {}).items():
            assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", key), (name, key)
            assert not re.match(r"(hf|sk|rp|ghp)_[A-Za-z0-9]{8,}", str(value)), (name, key)
    assert not re.search(r"\b(hf|ghp|rpa)_[A-Za-z0-9]{16,}", text), name


@pytest.mark.parametrize("name", sorted(ALL_TEXTS))
def test_every_gpu_task_recovers_exit_75_and_resumes(name):
    allowed = set(schemas.get_resources_schema()["properties"]["job_recovery"]["anyOf"][1]["properties"])
    for task in tasks_of(ALL_TEXTS[name]):
        if is_volume(task):
            continue
        resources = task.get("resources", {})
        trains = "train.py" in task["run"] or "eval_imagenet.py" in task["run"]
        if "accelerators" not in resources and not trains:  # the smoke chain's CPU cache task
            continue
        recovery = resources.get("job_recovery")
        assert isinstance(recovery, dict) and set(recovery) <= allowed, (name, recovery)
        assert isinstance(recovery["max_restarts_on_errors"], int) and recovery["max_restarts_on_errors"] >= 1
        assert runtime.EXIT_PREEMPTED in recovery["recover_on_exit_codes"], (name, recovery)
        if "train.py" in task["run"]:
            assert "training.resume=auto" in task["run"], (name, task["name"])
            assert "$RUN_NAME" in task["run"] and task["envs"]["RUN_NAME"], (name, task["name"])
        mounts = {**(task.get("volumes") or {}), **(task.get("file_mounts") or {})}
        assert "/checkpoints" in mounts or "CKPT_ROOT" in task.get("envs", {}), (name, task["name"])


def test_the_multinode_task_uses_the_rendezvous_variables():
    text = (CLOUD / "multinode_train.yaml").read_text()
    task = tasks_of(text)[0]
    assert task["num_nodes"] >= 2 and "scripts/launch_stage.py train.py" in task["run"]
    assert "RunPod" in text
    env = {
        "SKYPILOT_NUM_NODES": "2",
        "SKYPILOT_NUM_GPUS_PER_NODE": "8",
        "SKYPILOT_NODE_RANK": "1",
        "SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2",
        "RUN_NAME": "h1024",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        args = launch_stage.torchrun_args("train.py", ["experiment=x"])
    assert args == [
        "--nnodes=2",
        "--node_rank=1",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=10.0.0.1:29500",
        "--rdzv_id=h1024",
        "--nproc_per_node=8",
        "train.py",
        "experiment=x",
    ]


# --- the code on the VM, one process per GPU -------------------------------------------------------------


def run_tasks(name: str) -> list[dict]:
    return [t for t in tasks_of(ALL_TEXTS[name]) if not is_volume(t)]


@pytest.mark.parametrize("name", sorted(ALL_TEXTS))
def test_every_task_uploads_the_repository_as_its_workdir(name):
    """SkyPilot runs setup/run in ~/sky_workdir and puts code there only from `workdir`: without it
    `uv sync --locked` and `python train.py` find nothing on a fresh VM."""
    if not run_tasks(name):
        return
    dag = parse(ALL_TEXTS[name])
    for task, parsed in zip(run_tasks(name), dag.tasks):
        assert task.get("workdir") == ".", (name, task["name"])
        assert parsed.workdir == ".", (name, task["name"])


@pytest.mark.parametrize("name", sorted(ALL_TEXTS))
def test_every_training_and_eval_stage_starts_one_process_per_gpu(name):
    for task in run_tasks(name):
        for program in ("train.py", "eval_imagenet.py"):
            for line in task["run"].replace("\\\n", " ").splitlines():
                if f" {program} " in line and not line.lstrip().startswith("#"):
                    assert f"scripts/launch_stage.py {program}" in line, (name, task["name"], line)


def test_the_launcher_counts_processes_and_keeps_exit_75(monkeypatch):
    for key in ("SKYPILOT_NUM_NODES", "SKYPILOT_NODE_RANK", "SKYPILOT_NODE_IPS"):
        monkeypatch.delenv(key, raising=False)
    for gpus in ("", "0", "1"):  # unset, a CPU-only node, one GPU: the entry point itself, no torchrun
        monkeypatch.setenv("SKYPILOT_NUM_GPUS_PER_NODE", gpus)
        assert launch_stage.torchrun_args("train.py", []) is None
    monkeypatch.setenv("SKYPILOT_NUM_GPUS_PER_NODE", "8")
    assert launch_stage.torchrun_args("train.py", ["a=1"]) == ["--standalone", "--nproc_per_node=8", "train.py", "a=1"]
    monkeypatch.setenv("SKYPILOT_NUM_GPUS_PER_NODE", "eight")
    with pytest.raises(SystemExit, match=r"SKYPILOT_NUM_GPUS_PER_NODE='eight'"):
        launch_stage.torchrun_args("train.py", [])
    assert launch_stage.exit_code_of_failures([75, 75]) == 75
    assert launch_stage.exit_code_of_failures([75, -15]) == 75  # one rank saved, the other was signalled
    assert launch_stage.exit_code_of_failures([75, 1]) == 1  # a real error on any rank is an error
    assert launch_stage.exit_code_of_failures([-9]) == 1


def test_the_upload_holds_the_code_and_not_the_ignored_folders(tmp_path):
    (ROOT / "runs").mkdir(exist_ok=True)
    copy_dir = cloud_chain.upload_copy(ROOT, tmp_path / "workdir")
    for needed in (
        "pyproject.toml",
        "uv.lock",
        "train.py",
        "eval_imagenet.py",
        "scripts/launch_stage.py",
        "scripts/sky_chain.py",
        "configs/config.yaml",
    ):
        assert (copy_dir / needed).is_file(), needed
    assert not (copy_dir / "runs").exists() and not (copy_dir / ".venv").exists()


def test_simulate_refuses_a_task_without_workdir_and_fails_when_the_upload_lacks_a_file(tmp_path):
    docs, envs = cloud_chain.smoke_chain(tmp_path / "a")
    del docs[1]["workdir"]
    lines = []
    assert cloud_chain.simulate(docs, envs, log=lines.append) == 1
    assert "no workdir, so SkyPilot uploads no code" in "\n".join(lines)

    # A workdir that lacks the lock file: setup's `uv sync --locked` fails on the simulated VM, as it would.
    partial = cloud_chain.upload_copy(ROOT, tmp_path / "partial")
    (partial / "uv.lock").unlink()
    docs, envs = cloud_chain.smoke_chain(tmp_path / "b")
    docs = docs[:2]
    docs[1]["workdir"] = str(partial)
    docs[1]["resources"] = {"job_recovery": {"max_restarts_on_errors": 0}}
    lines = []
    assert cloud_chain.simulate(docs, envs, log=lines.append) == 2
    assert "uv.lock is missing" in "\n".join(lines)


# --- the Hydra overrides of every run: compose with the project's schema ---------------------------------


def expand(text: str, env: dict) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), text)


def command_args(run: str, program: str, env: dict) -> list[list[str]]:
    """The argv after PROGRAM of every command in a run script, with the task's variables substituted."""
    out = []
    for line in run.replace("\\\n", " ").splitlines():
        if program in line:
            words = shlex.split(expand(line, env))
            out.append(words[words.index(program) + 1 :])
    return out


SUBSTITUTE = {
    "SKYPILOT_TASK_ID": "sky-managed-x_1_0",
    "SKYPILOT_NODE_RANK": "0",
    "SKYPILOT_NUM_NODES": "2",
    "SKYPILOT_NUM_GPUS_PER_NODE": "8",
    "SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2",
    "MASTER": "10.0.0.1",
}


@pytest.mark.parametrize("name", sorted(ALL_TEXTS))
def test_the_overrides_in_every_run_compose_and_validate(name):
    checked = 0
    for task in tasks_of(ALL_TEXTS[name]):
        if is_volume(task):
            continue
        env = {**SUBSTITUTE, **{k: str(v) for k, v in (task.get("envs") or {}).items()}}
        for args in command_args(task["run"], "train.py", env):
            cfg = load_config(args)
            assert cfg.training.resume == "auto" and cfg.training.run_dir.startswith("/checkpoints/"), args
            if "unmasked" in task["name"]:
                assert cfg.training.init.checkpoint.endswith("/masked80") or cfg.training.init.checkpoint.endswith(
                    "/masked"
                ), args
            checked += 1
        for args in command_args(task["run"], "eval_imagenet.py", env):
            cfg = apply_schema(compose(args, config_name="eval"), EvalConfig)
            validate_eval(cfg)
            checked += 1
    assert checked or name in ("runpod_latent_cache.yaml", "runpod_volume.yaml"), name


# --- the smoke chain, simulated locally ------------------------------------------------------------------


def run_chain(root, fault=None):
    lines = []
    docs, envs = cloud_chain.smoke_chain(root)
    code = cloud_chain.simulate(docs, envs, fault=fault, log=lines.append)
    return code, "\n".join(lines)


def snapshot(directory):
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }  # .lock: the owner record


@pytest.mark.slow  # 80 s: CI runs it (`uv run pytest -m slow` in .ci/run)
def test_the_smoke_chain_survives_a_preemption_and_a_kill_bitwise_and_reruns_as_a_noop(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    faulty = cloud_chain.signal_when_checkpointed({"masked": signal.SIGTERM, "unmasked": signal.SIGKILL})
    with ThreadPoolExecutor(2) as pool:  # the two chains are independent: one per core
        clean_run = pool.submit(run_chain, tmp_path / "clean")
        faulty_run = pool.submit(run_chain, tmp_path / "faulty", faulty)
        (code, log), (faulty_code, faulty_log) = clean_run.result(), faulty_run.result()
    assert code == 0, log[-4000:]
    assert "try 1" not in log  # uninterrupted: every stage once
    code, log = faulty_code, faulty_log
    assert code == 0, log[-4000:]
    assert "stage masked try 0: exit 75" in log, log[-4000:]  # SIGTERM -> checkpoint saved -> 75 -> re-run
    assert "stage unmasked try 0: exit -9" in log, log[-4000:]  # SIGKILL -> re-run from the last checkpoint
    assert "stage masked try 1: exit 0" in log and "stage unmasked try 1: exit 0" in log
    for stage in ("masked", "unmasked"):
        a = tmp_path / "clean" / "checkpoints" / "smoke-chain" / stage
        b = tmp_path / "faulty" / "checkpoints" / "smoke-chain" / stage
        assert_same_state(final_state(a), final_state(b))
        assert final_state(a)[3].name == final_state(b)[3].name
        assert (b / FINISHED).is_file()
    eval_a = tmp_path / "clean" / "checkpoints" / "smoke-chain" / "eval" / "samples.npz"
    eval_b = tmp_path / "faulty" / "checkpoints" / "smoke-chain" / "eval" / "samples.npz"
    assert eval_a.read_bytes() == eval_b.read_bytes()

    # A finished chain launched again: every stage exits 0 at once and no file changes.
    before = snapshot(tmp_path / "faulty")
    code, log = run_chain(tmp_path / "faulty")
    assert code == 0, log[-4000:]
    assert "already finished" in log and "already complete; nothing to do" in log, log[-4000:]
    assert snapshot(tmp_path / "faulty") == before


def test_the_hand_off_verifies_every_file_of_the_final_checkpoint(tmp_path):
    """Only the manifest's sha256 was checked: a flipped byte in the final model.safetensors passed."""
    from conftest import run_train

    run = tmp_path / "stage"
    assert run_train(run, "training.max_steps=10", "training.checkpoint_every=10", "training.num_eval_samples=50") == 0
    assert cloud_chain.check_finished(run) is None
    weights = run / "checkpoints" / "step_0000010" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    problem = cloud_chain.check_finished(run)
    assert (
        problem == f"{weights} does not match its size and sha256 in {weights.parent / 'manifest.json'}: "
        "the checkpoint is damaged"
    ), problem
    assert sky_chain.main(["require-finished", str(run)]) == 1
    marker = json.loads((run / FINISHED).read_text())
    (run / FINISHED).write_text(json.dumps({**marker, "manifest_sha256": None}))  # no longer disables the check
    assert "records no manifest_sha256" in cloud_chain.check_finished(run)


def test_a_stage_refuses_to_start_without_its_predecessors_marker(tmp_path):
    docs, envs = cloud_chain.smoke_chain(tmp_path)
    unmasked = next(t for t in docs[1:] if t["name"] == "unmasked")
    lines = []
    env = cloud_chain.stage_env(unmasked, 2, envs, cloud_chain._uv_shim(tmp_path / "shim"))
    assert cloud_chain.run_stage(unmasked, env, log=lines.append) == 1
    output = "\n".join(lines)
    marker = tmp_path / "checkpoints" / "smoke-chain" / "masked" / FINISHED
    assert f"error: {marker} is missing" in output, output
    assert not (tmp_path / "checkpoints" / "smoke-chain" / "unmasked").exists()  # train.py never started

    # A run dir with checkpoints but no marker (stopped mid-run) is refused too, naming the file.
    (marker.parent / "checkpoints").mkdir(parents=True)
    assert sky_chain.main(["require-finished", str(marker.parent)]) == 1
    assert cloud_chain.check_finished(marker.parent).startswith(f"{marker} is missing")
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    assert not cloud_chain.eval_done(eval_dir) and not cloud_chain.eval_done(eval_dir, samples_only=True)
    (eval_dir / "samples.npz").write_bytes(b"")
    assert cloud_chain.eval_done(eval_dir, samples_only=True) and not cloud_chain.eval_done(eval_dir)


def test_render_dry_run_prints_a_parseable_chain_without_importing_torch():
    """Rendering is YAML only (seconds): cost estimates, which import torch, are made by `launch`."""
    code = (
        "import importlib.util, sys; "
        "spec = importlib.util.spec_from_file_location('sky_chain', 'scripts/sky_chain.py'); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "c = m.main(['render', '--dry-run', '--infra', 'runpod/CA', '--gpus', 'H100:8', '--use-spot', "
        "'--stage', 'masked=imagenet256_latent_dit_smoke', "
        "'--stage', 'unmasked=imagenet256_latent_dit_smoke_unmasked', '--override', 'training.epochs=3']); "
        "assert c == 0, c; assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    dag = dag_utils.load_chain_dag_from_yaml_str(result.stdout)
    assert [t.name for t in dag.tasks] == ["masked", "unmasked", "eval"]
    assert all(r.use_spot for t in dag.tasks for r in t.resources)
    assert "estimate" not in result.stderr


@pytest.mark.slow  # SkyPilot's optimizer prices the chain; the render dry run stays in the fast suite
def test_launch_dry_run_prints_the_chain_and_its_costs(capsys):
    assert (
        sky_chain.main(
            [
                "launch",
                "--dry-run",
                "--infra",
                "runpod/CA",
                "--gpus",
                "H100:1",
                "--stage",
                "masked=imagenet256_latent_dit_smoke",
                "--stage",
                "unmasked=imagenet256_latent_dit_smoke_unmasked",
                "--override",
                "training.epochs=3",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert [t.name for t in dag_utils.load_chain_dag_from_yaml_str(out).tasks] == ["masked", "unmasked", "eval"]
    assert re.search(r"estimate masked: .* GPU-hours, .*\$", err) and "estimate unmasked:" in err, err
    assert os.environ.get("SKYPILOT_TASK_ID") is None  # the simulation never leaks its variables here


@pytest.mark.parametrize("name", ['x";touch /tmp/pwned;"', "Masked", "a b", "", "eval"])
def test_a_stage_name_that_is_not_a_plain_word_is_refused(name, capsys):
    assert sky_chain.main(["render", "--stage", f"{name}=imagenet256_latent_dit_smoke"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def smoke_stage(root, gpus_per_node: int, *overrides):
    """The smoke chain's cache task and masked stage only, simulated with GPUS_PER_NODE ranks."""
    docs = cloud_chain.render(
        SMOKE_MASKED,
        name="nanoflow-smoke",
        run_name="ranks",
        overrides=[*cloud_chain.SMOKE_OVERRIDES, *overrides],
        cache_dir=str(root / "data" / "cache"),
        vae=str(root / "data" / "vae"),
        smoke_cache=True,
        evaluate=False,
        gpus=None,
    )
    lines = []
    code = cloud_chain.simulate(
        docs, {"CKPT_ROOT": str(root / "checkpoints")}, log=lines.append, gpus_per_node=gpus_per_node
    )
    return code, "\n".join(lines), root / "checkpoints" / "ranks" / "masked"


SMOKE_MASKED = cloud_chain.SMOKE_STAGES[:1]


@pytest.mark.slow  # two simulated stages, one of them 2 ranks (gloo): ~1 min on the 2-core machine
def test_a_two_gpu_stage_trains_what_one_process_does_with_the_same_global_batch(tmp_path):
    code, log, two = smoke_stage(tmp_path / "two", 2)
    assert code == 0, log[-4000:]
    code, log, one = smoke_stage(tmp_path / "one", 0, "training.grad_accum=2")
    assert code == 0, log[-4000:]
    ddp, single = final_state(two), final_state(one)
    assert ddp[3].name == single[3].name
    for index in (0, 1):  # the project's torchrun equivalence (tests/test_distributed.py): float tolerance
        for key in single[index]:
            torch.testing.assert_close(ddp[index][key], single[index][key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--root", "R", "--env", "NOEQUALS"], "--env 'NOEQUALS': expected KEY=VALUE"),
        (["simulate", "CHAIN", "--root", "R"], "CHAIN: not a readable chain YAML"),
        (["simulate", "LIST", "--root", "R"], "LIST: expected a pipeline"),
    ],
)
def test_bad_simulate_arguments_are_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "CHAIN").write_text("name: x\n---\nrun: [unclosed\n")
    (tmp_path / "LIST").write_text("- just\n- a list\n")
    argv = [str(tmp_path / a) if a in ("R", "CHAIN", "LIST") else a for a in argv]
    assert sky_chain.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.split(":")[-1].strip() in err and err.count("\n") == 1, err


def test_render_without_skypilot_is_one_line(monkeypatch, capsys):
    def missing(*args, **kwargs):
        raise ImportError("No module named 'sky'")

    monkeypatch.setattr(sky_chain, "load_dag", missing)
    assert sky_chain.main(["render", "--dry-run"]) == 1
    assert capsys.readouterr().err == "error: SkyPilot is not installed: `uv sync --group cloud` (docs/cloud.md)\n"
