"""run_dir.py: the owner lock, archiving an attempt, the finished marker, the resume policy, the stop signal
and the Run lifecycle, in-process on tiny run directories."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import checkpoint as ckpt
import run_dir
from config import ConfigError, load_config
from run_dir import FINISHED, RUN_FILES, Run, RunDirLock
from runtime import Preempted, RunError, Runtime

CPU = Runtime(device=torch.device("cpu"))


def save_tiny_checkpoint(directory, step, config=None):
    config = OmegaConf.create({"model": {"name": "mlp"}, "training": {"lr": 1e-3}}) if config is None else config
    return ckpt.save_checkpoint(directory, step, model={"w": torch.ones(2)}, ema=None, state={}, config=config)


# --- where a run lives ---------------------------------------------------------------------------


def test_run_dir_default_is_experiment_and_timestamp():
    import torch

    from run_dir import resolve_run_dir
    from runtime import Runtime

    cfg = load_config([])
    run_dir = resolve_run_dir(cfg, Runtime(device=torch.device("cpu")))
    assert run_dir.parent == Path("runs") and run_dir.name.startswith("moons_cfg_")
    with pytest.raises(ConfigError, match="training.run_dir"):
        resolve_run_dir(load_config(["training.resume=auto"]), Runtime(device=torch.device("cpu")))


def test_an_explicit_run_dir_is_used_as_given(tmp_path):
    cfg = load_config([f"training.run_dir={tmp_path / 'mine'}", "training.resume=auto"])
    assert run_dir.resolve_run_dir(cfg, CPU) == tmp_path / "mine"


# --- one owner ---------------------------------------------------------------------------------------


def test_a_second_lock_on_the_same_dir_refuses_naming_the_first_then_succeeds_after_release(tmp_path):
    first = RunDirLock(tmp_path / "run").acquire()
    owner = (tmp_path / "run" / ".lock").read_text()
    assert owner.startswith(f"pid {os.getpid()} on ")
    with pytest.raises(RunError, match=rf"in use by another process \(pid {os.getpid()} on .*\); wait"):
        RunDirLock(tmp_path / "run").acquire()
    assert RunDirLock(tmp_path / "other").acquire().file is not None  # another dir is free
    first.release()
    first.release()  # idempotent
    second = RunDirLock(tmp_path / "run").acquire()
    second.release()


def test_an_unwritable_run_dir_is_a_run_error_naming_it(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(RunError, match=r"run dir .*file/run is not writable"):
        RunDirLock(tmp_path / "file" / "run").acquire()


# --- start over: archive an attempt -------------------------------------------------------------------


def test_archive_attempt_moves_the_run_files_and_counts_attempts(tmp_path):
    for name in ("metrics.jsonl", "config.yaml", FINISHED):
        (tmp_path / name).write_text(name)
    (tmp_path / "checkpoints" / "step_0000010").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")  # not a run file: stays
    target = run_dir.archive_attempt(tmp_path)
    assert target == tmp_path / "attempt_1"
    assert sorted(p.name for p in target.iterdir()) == sorted(["metrics.jsonl", "config.yaml", FINISHED, "checkpoints"])
    assert (target / "checkpoints" / "step_0000010").is_dir() and (target / "config.yaml").read_text() == "config.yaml"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attempt_1", "notes.txt"]
    (tmp_path / "metrics.jsonl").write_text("second")
    assert run_dir.archive_attempt(tmp_path) == tmp_path / "attempt_2"
    assert (tmp_path / "attempt_2" / "metrics.jsonl").read_text() == "second"
    assert set(RUN_FILES) >= {"checkpoints", "samples.npz", "finished.json"}


# --- the finished marker ----------------------------------------------------------------------------


def test_finished_round_trip_and_a_missing_output_is_not_finished(tmp_path):
    assert not run_dir.is_finished(tmp_path, 5)  # no marker
    (tmp_path / "samples.png").write_bytes(b"png")
    (tmp_path / "samples.npz").write_bytes(b"npz")
    run_dir.write_finished(tmp_path, 5, ["samples.png", "samples.npz"])
    marker = json.loads((tmp_path / FINISHED).read_text())
    assert marker["step"] == 5 and marker["checkpoint"] == "step_0000005" and marker["manifest_sha256"] is None
    assert run_dir.is_finished(tmp_path, 5)
    assert not run_dir.is_finished(tmp_path, 6)  # a longer target is not finished
    (tmp_path / "samples.npz").unlink()
    assert not run_dir.is_finished(tmp_path, 5)
    (tmp_path / FINISHED).write_text("{truncated")
    assert not run_dir.is_finished(tmp_path, 5)
    assert not list(tmp_path.glob(".*tmp*"))


def test_finished_marker_records_the_final_checkpoints_manifest(tmp_path):
    path = save_tiny_checkpoint(tmp_path, 7)
    run_dir.write_finished(tmp_path, 7, [])
    marker = json.loads((tmp_path / FINISHED).read_text())
    assert marker["manifest_sha256"] == ckpt.sha256_file(path / "manifest.json") and marker["outputs"] == []
    assert run_dir.is_finished(tmp_path, 7)


# --- the resume policy ------------------------------------------------------------------------------


def test_resume_reads_keys_added_later_as_their_old_behaviour():
    """A checkpoint written before training.coupling / Flow-GRPO's defaults existed: its missing keys
    compare as the behaviour it had, so an old independent run resumes unchanged and an old GRPO run is
    refused under the new defaults (naming the key) until the old value is passed."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from run_dir import resume_changes

    new = OmegaConf.create(
        {"training": {"lr": 1e-3, "coupling": {"name": "independent", "pairs": None, "within_class": True}}}
    )
    old = OmegaConf.create({"training": {"lr": 1e-3}})
    assert resume_changes(old, new, Path("ckpt")) == {}
    grpo_old = OmegaConf.create({"grpo": {"lr": 1e-4}})
    grpo_new = OmegaConf.create({"grpo": {"lr": 1e-4, "detach_uncond": True, "timestep_selection": "random"}})
    with pytest.raises(ConfigError, match="grpo.detach_uncond: False -> True"):
        resume_changes(grpo_old, grpo_new, Path("ckpt"))
    grpo_new.grpo.detach_uncond = False
    assert resume_changes(grpo_old, grpo_new, Path("ckpt")) == {}


def test_grpo_run_may_be_extended_on_resume():
    """GRPO's lr is constant after warm-up, so grpo.epochs only sets the run's length: a resume may raise
    it (recorded), while a train.py run's training.epochs (the LR schedule's horizon) stays refused."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from run_dir import resume_changes

    changes = resume_changes(
        OmegaConf.create({"grpo": {"epochs": 30}}), OmegaConf.create({"grpo": {"epochs": 75}}), Path("ckpt")
    )
    assert changes == {"grpo.epochs": [30, 75]}
    with pytest.raises(ConfigError, match="training.epochs: 30 -> 75"):
        resume_changes(
            OmegaConf.create({"training": {"epochs": 30}}), OmegaConf.create({"training": {"epochs": 75}}), Path("ckpt")
        )


def test_resume_changes_refuses_a_key_outside_the_list_and_allows_one_inside():
    saved = OmegaConf.create(
        {"training": {"lr": 1e-3, "max_steps": 10}, "solver": {"num_steps": 16}, "model": {"name": "mlp"}}
    )
    allowed = OmegaConf.create(
        {"training": {"lr": 1e-3, "max_steps": 50}, "solver": {"num_steps": 4}, "model": {"name": "mlp"}}
    )
    assert run_dir.resume_changes(saved, allowed, Path("ckpt")) == {
        "solver.num_steps": [16, 4],
        "training.max_steps": [10, 50],
    }  # solver: every key under it
    refused = OmegaConf.create(
        {"training": {"lr": 2e-3, "max_steps": 10}, "solver": {"num_steps": 16}, "model": {"name": "mlp"}}
    )
    with pytest.raises(ConfigError, match=r"resuming ckpt would change training.lr: 0.001 -> 0.002; "):
        run_dir.resume_changes(saved, refused, Path("ckpt"))
    # a key that merely starts like an allowed one is not allowed
    with pytest.raises(ConfigError, match="training.max_steps_extra"):
        run_dir.resume_changes(
            OmegaConf.create({"training": {"max_steps_extra": 1}}),
            OmegaConf.create({"training": {"max_steps_extra": 2}}),
            Path("ckpt"),
        )


def test_resume_with_another_model_or_flow_is_a_checkpoint_error():
    saved = OmegaConf.create({"model": {"name": "mlp", "hidden": 64}, "flow": {"prediction": "velocity"}})
    with pytest.raises(ckpt.CheckpointError, match="trained with model = .*'hidden': 64.* but this run has model"):
        run_dir.resume_changes(
            saved,
            OmegaConf.create({"model": {"name": "mlp", "hidden": 32}, "flow": {"prediction": "velocity"}}),
            Path("c"),
        )
    with pytest.raises(ckpt.CheckpointError, match="flow"):
        run_dir.resume_changes(
            saved, OmegaConf.create({"model": {"name": "mlp", "hidden": 64}, "flow": {"prediction": "data"}}), Path("c")
        )


def test_flatten_and_record_resume(tmp_path):
    assert run_dir.flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": None}) == {"a.b": 1, "a.c.d": [2], "e": None}
    run_dir.record_resume(tmp_path, 20, {"training.max_steps": [20, 40]})
    run_dir.record_resume(tmp_path, 40, {})
    lines = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert [(line["step"], line["changes"]) for line in lines] == [(20, {"training.max_steps": [20, 40]}), (40, {})]


def test_find_resume_checkpoint_decisions(tmp_path):
    said = []
    find = lambda resume, **kw: run_dir.find_resume_checkpoint(tmp_path / "run", resume, CPU, said.append, **kw)
    assert find(None) is None and find("auto") is None  # a fresh dir: a fresh start
    assert "no checkpoint in" in said[-1]
    assert find("/some/ckpt") == "/some/ckpt"  # an explicit source is passed through unchecked
    save_tiny_checkpoint(tmp_path / "run", 3)
    newest = save_tiny_checkpoint(tmp_path / "run", 6)
    assert find("auto") == str(newest)
    with pytest.raises(ConfigError, match="already holds checkpoints; pass training.resume=auto"):
        find(None)


def test_no_verifying_checkpoint_refuses_unless_start_over_archives_it(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "run", 3)
    (path / "model.safetensors").write_bytes(b"damaged")
    said = []
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint under .* verifies"):
        run_dir.find_resume_checkpoint(tmp_path / "run", "auto", CPU, said.append)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint under .* verifies"):  # every later try too
        run_dir.find_resume_checkpoint(tmp_path / "run", "auto", CPU, said.append)
    assert run_dir.find_resume_checkpoint(tmp_path / "run", "auto", CPU, said.append, start_over=True) is None
    assert "attempt_1" in said[-1] and (tmp_path / "run" / "attempt_1" / "checkpoints").is_dir()
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- the stop signal ----------------------------------------------------------------------------------


def test_sigterm_inside_a_run_sets_the_request_and_the_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with Run(tmp_path / "run", CPU) as run:
        assert not run.stop_requested(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert run.stop.requested and run.stop_requested(3)
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_in_the_final_phase_raises_preempted(tmp_path):
    with Run(tmp_path / "run", CPU) as run:
        with pytest.raises(Preempted, match="exiting with code 75"):
            with run.final_phase():
                os.kill(os.getpid(), signal.SIGTERM)
                raise AssertionError("not reached")
        assert not run.stop._raising and run.stop.requested  # requested stays: a later phase raises at once
    with Run(tmp_path / "run2", CPU) as run:  # no SIGTERM: the final phase runs
        with run.final_phase():
            ran = True
    assert ran


def test_final_phase_raises_at_once_when_the_stop_is_already_requested(tmp_path):
    with Run(tmp_path / "run", CPU) as run:
        run.stop.requested = True
        entered = []
        with pytest.raises(Preempted):
            with run.final_phase():
                entered.append(True)
        assert entered == []


# --- the Run lifecycle -----------------------------------------------------------------------------


def test_a_run_holds_the_lock_while_open(tmp_path):
    with Run(tmp_path / "run", CPU):
        with pytest.raises(RunError, match="in use by another process"):
            with Run(tmp_path / "run", CPU):
                pass
    with Run(tmp_path / "run", CPU) as again:  # released on exit: a new owner takes it
        assert again._lock is not None


def test_run_start_writes_the_config_once_and_keeps_the_original(tmp_path):
    first = OmegaConf.create({"training": {"max_steps": 10}, "seed": 0})
    with Run(tmp_path / "run", CPU) as run:
        assert run.start(first, step=0, target_steps=10)
    original = (tmp_path / "run" / "config.yaml").read_text()
    assert OmegaConf.load(tmp_path / "run" / "config.yaml") == first
    with Run(tmp_path / "run", CPU) as run:
        run.accept_resume(
            first, OmegaConf.create({"training": {"max_steps": 20, "resume": "auto"}, "seed": 0}), Path("ckpt"), step=10
        )
        assert run.resumed == (10, {"training.max_steps": [10, 20]})  # training.resume is not a change
        assert run.start(OmegaConf.create({"training": {"max_steps": 20}, "seed": 0}), step=10, target_steps=20)
    assert (tmp_path / "run" / "config.yaml").read_text() == original
    history = [json.loads(line) for line in (tmp_path / "run" / "resumes.jsonl").read_text().splitlines()]
    assert [(h["step"], h["changes"]) for h in history] == [(10, {"training.max_steps": [10, 20]})]


def test_run_start_is_false_only_for_a_finished_run(tmp_path):
    config = OmegaConf.create({"seed": 0})
    with Run(tmp_path / "run", CPU) as run:
        assert run.start(config, step=10, target_steps=10)  # at the target but unfinished: the outputs are due
        (tmp_path / "run" / "samples.png").write_bytes(b"png")
        run.finish(10, ["samples.png"])
        assert not run.start(config, step=10, target_steps=10)
        assert run.start(config, step=10, target_steps=20)  # extended: more to do


def test_a_resume_may_switch_the_trackers_like_tensorboard():
    """The logging backends do not change the run: a resume may turn W&B on (or TensorBoard off), and a
    checkpoint from before the keys existed resumes with them at their defaults."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from run_dir import resume_changes

    old = OmegaConf.create({"training": {"lr": 1e-3, "tensorboard": True}})
    new = OmegaConf.create(
        {"training": {"lr": 1e-3, "tensorboard": False, "wandb": "offline", "wandb_project": "other"}}
    )
    assert resume_changes(old, new, Path("ckpt")) == {
        "training.tensorboard": [True, False],
        "training.wandb": ["off", "offline"],
        "training.wandb_project": ["nanoflow", "other"],
    }
    defaults = OmegaConf.create(
        {"training": {"lr": 1e-3, "tensorboard": True, "wandb": "off", "wandb_project": "nanoflow"}}
    )
    assert resume_changes(old, defaults, Path("ckpt")) == {}  # nothing to record for a run from before the keys
