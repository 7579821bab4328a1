"""Fault injection: every defect found by breaking the project as a user would ("reliability at
the edges"), reproduced and kept fixed, plus random SIGKILLs during a run that must resume bit for bit.

Guarantees under test (README, "Robustness"): a run is finished only when its final outputs exist and
a re-run completes whatever is missing; SIGTERM at any point exits 75; readers never write; a resume
changes only the keys run_dir.RESUME_MAY_CHANGE lists and records them; one process owns a run dir;
bad values and faults are one `error:` line naming the key or path, exit 1.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checkpoint as ckpt
import runtime
from config import ConfigError, load_config
from conftest import FAST, ROOT, assert_same_state, final_state, run_train, train_subprocess
from run_dir import FINISHED

SHORT = ["training.max_steps=40", "training.checkpoint_every=10", "training.batch_size=64"]


def run_command(*args, timeout=300, **env):
    """A real process; returns (exit code, stdout, stderr)."""
    result = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
    )
    return result.returncode, result.stdout, result.stderr


def assert_one_error_line(stderr: str, *needles: str):
    """The error contract: no traceback, the first line starts with `error:` and names what it must."""
    assert "Traceback" not in stderr, stderr[-3000:]
    first = stderr.strip().splitlines()[0]
    assert first.startswith("error: "), stderr[-3000:]
    for needle in needles:
        assert needle in stderr, (needle, stderr[-3000:])


def wait_for(condition, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"exited early ({process.returncode}):\n{process.stdout.read()[-3000:]}")
        time.sleep(0.01)
    process.kill()
    raise AssertionError("timed out")


def snapshot(directory):
    return {
        str(p.relative_to(directory)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
    }


# --- 1. the final evaluation is part of the run ----------------------------------------------------


def test_sigterm_during_the_final_evaluation_exits_75_and_the_rerun_writes_the_outputs(tmp_path):
    run_dir = tmp_path / "run"
    # 40 steps, then a final evaluation of 400k samples that takes seconds: SIGTERM lands inside it.
    args = [*SHORT, "training.num_eval_samples=400000", "training.resume=auto"]
    process = train_subprocess(run_dir, *args)
    wait_for(lambda: [s for s, _ in ckpt.list_checkpoints(run_dir)][-1:] == [40], process)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == runtime.EXIT_PREEMPTED, output[-3000:]
    assert "SIGTERM during the final evaluation" in output
    assert not (run_dir / "samples.npz").exists() and not (run_dir / FINISHED).exists()
    # The same command (a requeue) finishes the missing part from the step-40 checkpoint; a cheaper
    # evaluation here, since num_eval_samples may change on resume.
    assert run_train(run_dir, *SHORT, "training.resume=auto", "training.num_eval_samples=300") == 0
    assert (run_dir / "samples.npz").is_file() and (run_dir / "samples.png").is_file()
    marker = json.loads((run_dir / FINISHED).read_text())
    assert marker["step"] == 40 and marker["outputs"] == ["samples.png", "samples.npz"]
    assert len(np.load(run_dir / "samples.npz")["points"]) == 300
    before = snapshot(run_dir)
    assert run_train(run_dir, *SHORT, "training.resume=auto", "training.num_eval_samples=300") == 0
    assert {k: v for k, v in snapshot(run_dir).items() if k != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"
    }  # a finished run's re-run writes nothing


def test_a_finished_run_missing_its_outputs_is_completed(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(run_dir, *SHORT) == 0
    (run_dir / "samples.npz").unlink()
    assert run_train(run_dir, *SHORT, "training.resume=auto") == 0
    assert (run_dir / "samples.npz").is_file()


# --- 2. resume=auto never silently starts over ------------------------------------------------------


def damage_every_checkpoint(run_dir):
    for _, path in ckpt.list_checkpoints(run_dir):
        with open(path / "model.safetensors", "r+b") as f:
            f.seek(100)
            f.write(b"\xff" * 8)


def test_resume_auto_refuses_every_time_when_no_checkpoint_verifies(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(run_dir, *SHORT) == 0
    damage_every_checkpoint(run_dir)
    lines_before = (run_dir / "metrics.jsonl").read_text().count("\n")
    for _ in range(2):  # the second try (a requeue) must not start from step 0
        with pytest.raises(ckpt.CheckpointError, match="not starting over it.*training.start_over=true"):
            run_train(run_dir, *SHORT, "training.resume=auto")
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == lines_before
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".corrupt"))
    # The documented way out keeps everything: the old attempt moves to attempt_1/.
    assert run_train(run_dir, *SHORT, "training.resume=auto", "training.start_over=true") == 0
    assert (run_dir / "attempt_1" / "metrics.jsonl").read_text().count("\n") == lines_before
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)][-1] == 40


# --- 3. readers never write -------------------------------------------------------------------------


def test_inference_skips_a_damaged_checkpoint_and_changes_nothing(tmp_path, capsys):
    import inference

    run_dir = tmp_path / "run"
    assert run_train(run_dir, *SHORT) == 0
    newest = ckpt.list_checkpoints(run_dir)[-1][1]
    with open(newest / "state.pt", "ab") as f:
        f.write(b"junk")
    before = snapshot(run_dir)
    for target in (run_dir, run_dir / "checkpoints" / "latest"):
        assert inference.main([f"checkpoint={target}", f"out={tmp_path / 'out'}", "n_per_class=2", "device=cpu"]) == 0
        captured = capsys.readouterr()
        assert "step 30" in captured.out  # the newest valid one
        # the fallback is said on stderr (it was on stdout, easily lost) and recorded with the samples
        assert f"WARNING: checkpoint {newest}" in captured.err and "WARNING" not in captured.out
        recorded = json.loads((tmp_path / "out" / "metrics.json").read_text())["checkpoint_fallback"]
        assert str(newest) in recorded and "failed verification" in recorded
    assert snapshot(run_dir) == before  # nothing renamed, nothing written


def test_training_init_and_grpo_seed_resolution_do_not_write_either(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(run_dir, *SHORT) == 0
    damage_every_checkpoint(run_dir)
    before = snapshot(run_dir)
    with pytest.raises(ckpt.CheckpointError, match="holds no complete checkpoint"):
        run_train(tmp_path / "child", *SHORT, f"training.init.checkpoint={run_dir}")
    assert snapshot(run_dir) == before


# --- 4. resume does not silently change the run ------------------------------------------------------


@pytest.mark.parametrize("change", ["training.lr=0.01", "training.batch_size=128", "seed=5"])
def test_resume_refuses_keys_that_define_the_run(tmp_path, change):
    run_dir = tmp_path / "run"
    assert run_train(run_dir, *SHORT[1:], "training.max_steps=20") == 0
    original = (run_dir / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=rf"would change {change.split('=')[0]}: .*fix the run"):
        run_train(run_dir, *SHORT, "training.resume=auto", change)
    assert (run_dir / "config.yaml").read_text() == original


def test_resume_may_extend_the_run_and_records_it(tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(run_dir, *SHORT[1:], "training.max_steps=20") == 0
    original = (run_dir / "config.yaml").read_text()
    assert run_train(run_dir, *SHORT, "training.resume=auto") == 0
    assert (run_dir / "config.yaml").read_text() == original  # the original config is kept
    history = [json.loads(line) for line in (run_dir / "resumes.jsonl").read_text().splitlines()]
    assert history[-1]["step"] == 20 and history[-1]["changes"]["training.max_steps"] == [20, 40]


# --- 5. one owner per run directory ------------------------------------------------------------------


def test_a_second_trainer_in_the_same_run_dir_refuses_and_a_killed_owner_leaves_no_lock(tmp_path):
    run_dir = tmp_path / "run"
    long = ["training.max_steps=3000", "training.checkpoint_every=20", "training.batch_size=64"]
    owner = train_subprocess(run_dir, *long)
    wait_for(lambda: ckpt.list_checkpoints(run_dir), owner)
    with pytest.raises(runtime.RunError, match=rf"in use by another process \(pid {owner.pid} "):
        run_train(run_dir, *long, "training.resume=auto")
    assert owner.poll() is None  # the owner is unharmed
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert run_train(run_dir, *SHORT, "training.resume=auto") == 0  # the lock died with its owner


# --- 6. model values are validated before anything is written ---------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.base_ch=abc", r"model.base_ch = 'abc': must be int"),
        ("model.base_ch=-4", r"model.base_ch = -4: must be >= 1"),
        ("model.dropout=nan", r"model.dropout = nan: must be finite"),
        ("model.num_heads=3", r"model = .* cannot be built"),
    ],
)
def test_bad_model_values_fail_at_validation_with_the_key(tmp_path, override, message):
    base = ["experiment=digits_cfg"] if "heads" not in override else ["experiment=imagenet256_latent_dit_smoke"]
    with pytest.raises(ConfigError, match=message):
        load_config([*base, override])
    if override not in ("model.base_ch=-4", "model.num_heads=3"):
        return  # the command line: one schema check and one model that cannot be built (a process each)
    code, _, err = run_command("train.py", *base, override, f"training.run_dir={tmp_path / 'run'}")
    assert code == 1
    assert_one_error_line(err, override.split("=")[0].split(".")[-1])
    assert not (tmp_path / "run").exists()


def test_moons_hidden_dim_type_is_checked():
    with pytest.raises(ConfigError, match=r"model.hidden_dim = 'abc': must be int"):
        load_config(["model.hidden_dim=abc"])


# --- 7. inference refuses bad values and non-finite samples ------------------------------------------


@pytest.fixture(scope="module")
def moons_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("moons") / "run"
    assert run_train(run_dir, *SHORT) == 0
    return run_dir


@pytest.mark.parametrize(
    "override, message",
    [
        ("n_per_class=0", "n_per_class = 0: must be >= 1"),
        ("n_per_class=-2", "n_per_class = -2: must be >= 1"),
        ("num_samples=0", "num_samples = 0: must be >= 1"),
        ("num_samples=10", "class-conditional .* use n_per_class"),
        ("guidance_scale=inf", "guidance_scale = inf: must be finite"),
    ],
)
def test_inference_rejects_bad_values(moons_run, tmp_path, override, message):
    import inference

    with pytest.raises(ConfigError, match=message):
        inference.main([f"checkpoint={moons_run}", f"out={tmp_path / 'out'}", override, "device=cpu"])
    assert not (tmp_path / "out").exists()


def test_non_finite_samples_are_refused_with_the_step_and_setting(moons_run, tmp_path):
    code, _, err = run_command(
        "inference.py", f"checkpoint={moons_run}", f"out={tmp_path / 'out'}", "guidance_scale=1e308", "device=cpu"
    )
    assert code == 1
    assert_one_error_line(err, "NaN/inf", "solver step", "guidance_scale=1e+308")
    assert not (tmp_path / "out" / "samples.npz").exists()


# --- 8. faults are one error line naming the path and cause -----------------------------------------


DISK_FULL_AT_STEP_20 = """
import sys
import torch, checkpoint
real_save = torch.save
def full(obj, path, *a, **k):
    if isinstance(obj, dict) and obj.get("step") == 20:
        raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 1234 vs 1200")
    return real_save(obj, path, *a, **k)
checkpoint.torch.save = full
import runtime, train
runtime.run_main(train.main, sys.argv[1:])
"""

FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
limit = int(sys.argv.pop(1))
import runtime, train
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
runtime.run_main(train.main, sys.argv[1:])
"""


def test_disk_full_mid_run_is_one_line_naming_the_intact_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run_command("-c", DISK_FULL_AT_STEP_20, f"training.run_dir={run_dir}", *FAST, *SHORT)
    assert code == 1
    assert_one_error_line(
        err,
        "could not write checkpoint",
        str(run_dir / "checkpoints" / "step_0000020"),
        f"the last complete checkpoint {run_dir / 'checkpoints' / 'step_0000010'} is intact",
    )
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))  # the partial write is cleaned up
    assert run_train(run_dir, *SHORT, "training.resume=auto") == 0  # and the run continues from step 10


def test_a_file_system_refusing_writes_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run_command("-c", FILE_SIZE_LIMIT, "100000", f"training.run_dir={run_dir}", *FAST, *SHORT)
    assert code == 1  # the 290 kB model file is over the limit
    assert_one_error_line(err, "could not write checkpoint", "File too large", "no earlier checkpoint exists")


def test_missing_latent_cache_and_dataset_folders_are_one_line(tmp_path):
    code, _, err = run_command(
        "train.py",
        "experiment=imagenet256_latent_dit_smoke",
        f"dataset.path={tmp_path / 'none'}",
        f"training.run_dir={tmp_path / 'a'}",
    )
    assert code == 1 and len(err.strip().splitlines()) <= 4
    assert_one_error_line(err, "latent cache", str(tmp_path / "none"))
    code, _, err = run_command(
        "train.py",
        "experiment=fashion_cfg",
        f"dataset.root={tmp_path / 'none'}",
        "dataset.download=false",
        f"training.run_dir={tmp_path / 'b'}",
    )
    assert code == 1
    assert_one_error_line(err, "fashion_mnist", str(tmp_path / "none" / "FashionMNIST" / "raw"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_truncated_cifar_batch_is_named(tmp_path, monkeypatch):
    from test_datasets import skip_cifar_md5, write_cifar10

    import datasets

    write_cifar10(tmp_path)
    skip_cifar_md5(monkeypatch)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:500])
    with pytest.raises(datasets.DatasetNotFoundError, match=r"unreadable: data_batch_3 \(not a complete pickle"):
        datasets.load_cifar10(root=tmp_path, download=False)


def test_grpo_refuses_a_2d_seed_clearly(moons_run, tmp_path):
    code, _, err = run_command(
        "train_grpo.py",
        "experiment=digits_grpo_jpeg",
        f"seed_checkpoint={moons_run}",
        f"training.run_dir={tmp_path / 'grpo'}",
        "device=cpu",
    )
    assert code == 1
    assert_one_error_line(err, "rewards score images", "'moons'")


def test_debug_flag_shows_the_traceback(tmp_path):
    code, _, err = run_command("train.py", "model.hidden_dim=abc", NANOFLOW_DEBUG="1")
    assert code == 1 and "Traceback" in err


# --- 9. non-finite training is loud ------------------------------------------------------------------


def test_a_nan_in_the_data_warns_and_fails_the_final_evaluation(tmp_path, capsys):
    import datasets
    from trainer import Trainer

    # One epoch at batch 64 is 125 steps: the NaN point is drawn exactly once.
    cfg = load_config(
        [
            f"training.run_dir={tmp_path / 'run'}",
            *FAST,
            "training.max_steps=125",
            "training.checkpoint_every=125",
            "training.batch_size=64",
        ]
    )
    data = datasets.load_moons()
    data.x[123] = float("nan")
    with pytest.raises(runtime.RunError, match="final evaluation at step 125: sliced_w2 = nan"):
        Trainer(cfg, runtime.setup_runtime("cpu"), tmp_path / "run", dataset=data).fit()
    assert "WARNING: 1 optimizer step(s) between steps 0 and" in capsys.readouterr().out
    assert not (tmp_path / "run" / FINISHED).exists()


# --- 10. smaller ones -----------------------------------------------------------------------------------


def test_max_steps_beyond_the_schedule_is_said(tmp_path, capsys):
    assert run_train(tmp_path / "run", "training.epochs=1", "training.batch_size=1000", "training.max_steps=50") == 0
    assert "training.max_steps = 50 exceeds the LR schedule's 8 steps" in capsys.readouterr().out


def test_unknown_model_key_names_the_model_arguments():
    with pytest.raises(ConfigError) as info:
        load_config(["model.hiddendim=3"])
    message = str(info.value)
    assert "model.hiddendim is not an argument of model 'class_cond_mlp'; allowed: dim, hidden_dim" in message
    assert "'+'" not in message


def test_latest_is_a_real_symlink_to_the_newest_checkpoint(moons_run):
    latest = moons_run / "checkpoints" / "latest"
    assert latest.is_symlink() and latest.resolve() == ckpt.list_checkpoints(moons_run)[-1][1].resolve()


def test_classifier_script_takes_the_training_dataset_keys():
    from conftest import load_script

    cfg = load_script("train_classifier").parse_args(
        ["dataset=fashion_mnist", "dataset.root=/data/x", "dataset.download=false", "out=c.safetensors"]
    )
    assert (cfg.dataset, cfg.root, cfg.download) == ("fashion_mnist", "/data/x", False)


# --- random kills ----------------------------------------------------------------------------------------


@pytest.mark.slow  # three kills at random moments; test_train kills mid-step and mid-save in the fast suite
def test_random_sigkills_then_resume_end_bitwise_identical(tmp_path):
    """Three SIGKILLs at random moments (seeded), each followed by the same command again."""
    long = ["training.max_steps=300", "training.checkpoint_every=15", "training.batch_size=64"]
    assert run_train(tmp_path / "full", *long) == 0
    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    for _ in range(3):
        process = train_subprocess(run_dir, *long, "training.resume=auto")
        time.sleep(rng.uniform(1.5, 4.0))  # start-up takes ~1.5 s; the kill lands in training or a save
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert run_train(run_dir, *long, "training.resume=auto") == 0
    assert_same_state(final_state(tmp_path / "full"), final_state(run_dir))
    torch.testing.assert_close(
        torch.from_numpy(np.load(run_dir / "samples.npz")["points"]),
        torch.from_numpy(np.load(tmp_path / "full" / "samples.npz")["points"]),
        rtol=0,
        atol=0,
    )


def test_a_log_write_that_fails_names_the_file(tmp_path):
    """metrics.jsonl on a full device (/dev/full: every write fails with ENOSPC)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")
    logger = runtime.MetricLogger(run_dir, enabled=True, tensorboard=False)
    with pytest.raises(runtime.RunError, match=r"cannot append to .*metrics.jsonl \(No space left on device\)"):
        logger.scalars(1, {"train/loss": 1.0})


# --- faults are one line, not a traceback ------------------------------------------------------------


class _Code:
    def __reduce__(self):
        return os.system, ("true",)


def test_a_state_pt_that_is_not_tensors_only_is_one_line_and_never_runs(tmp_path):
    """A checkpoint whose state.pt verifies against its manifest but holds a pickled global: the
    weights-only load refused it with a 28-line traceback."""
    run_dir = tmp_path / "run"
    assert run_train(run_dir, *SHORT) == 0
    newest = ckpt.list_checkpoints(run_dir)[-1][1]
    state = torch.load(newest / "state.pt", weights_only=True)
    torch.save({**state, "payload": _Code()}, newest / "state.pt")
    manifest = json.loads((newest / "manifest.json").read_text())  # re-signed, so only the load can refuse it
    manifest["files"]["state.pt"] = {
        "sha256": ckpt.sha256_file(newest / "state.pt"),
        "bytes": (newest / "state.pt").stat().st_size,
    }
    (newest / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_command(
        "train.py", f"training.run_dir={run_dir}", *FAST, *SHORT, "training.max_steps=60", "training.resume=auto"
    )
    assert code == 1 and err.startswith(f"error: checkpoint {newest}: state.pt cannot be read as tensors only")
    assert "posix.system" in err and err.count("\n") == 1, err


def test_a_non_utf8_argument_is_one_error_line_not_a_traceback():
    result = subprocess.run(
        [sys.executable, b"train.py", b"training.run_dir=/tmp/nanoflow_\xff/run", b"training.max_steps=2"],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    err = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == 1 and err.startswith("error: ") and "Traceback" not in err, err
