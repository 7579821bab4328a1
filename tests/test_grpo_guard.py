"""The fidelity guard (rl/guard.py) on scripted evaluation sequences, and the one rule by which a path names a
checkpoint (checkpoint.resolve_checkpoint: a run dir means its published best when it has one)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import checkpoint as ckpt
from rl.guard import FidelityGuard


def settings(**overrides):
    values = dict(
        min_accuracy=0.9, max_fd_ratio=2.0, patience=2, action="rollback", lr_factor=0.5, max_rollbacks=1, samples="ode"
    )
    return SimpleNamespace(**{**values, **overrides})


def evaluation(accuracy, fd, reward):
    return {"eval/ode/classifier_accuracy": accuracy, "eval/ode/classifier_fd": fd, "eval/ode/reward": reward}


def test_the_guard_keeps_the_best_good_checkpoint_and_rolls_back_then_stops():
    guard = FidelityGuard(settings())
    script = [  # (iteration, accuracy, classifier-FD, reward) -> (decision, restore step, best, lr scale)
        (0, 0.95, 10.0, -5.0, "ok", None, 0, 1.0),  # the seed: FD reference 10, so the bound is 20
        (10, 0.96, 12.0, -4.0, "ok", None, 10, 1.0),
        (20, 0.97, 15.0, -4.5, "ok", None, 10, 1.0),  # good (the rollback target) but a lower reward: not best
        (30, 0.85, 15.0, -3.0, "violation", None, 10, 1.0),  # accuracy below 0.9: a higher reward does not count
        (40, 0.95, 25.0, -2.0, "rollback", 20, 10, 0.5),  # FD 25 > 2 x 10: second in a row -> back to 20, lr x 0.5
        (50, 0.92, 18.0, -3.5, "ok", None, 50, 0.5),
        (60, math.nan, 18.0, -1.0, "violation", None, 50, 0.5),  # NaN fails
        (70, 0.50, 18.0, -1.0, "stop", 50, 50, 0.5),  # max_rollbacks = 1 spent: restore 50 and stop
    ]
    for step, accuracy, fd, reward, kind, restore, best, lr_scale in script:
        decision = guard.check(step, evaluation(accuracy, fd, reward))
        assert (decision.kind, decision.restore_step, guard.best_step, guard.lr_scale) == (
            kind,
            restore,
            best,
            lr_scale,
        ), (step, decision)
    assert guard.stopped and "stopping" in guard.stopped and guard.rollbacks == 1
    assert guard.protected_steps() == {50}
    assert guard.best_reward == -3.5 and guard.good_step == 50
    # the whole state survives a checkpoint: a resumed run takes the same decisions
    again = FidelityGuard(settings())
    again.load_state_dict(torch.load(_roundtrip(guard.state_dict()), weights_only=True))
    assert again.state_dict() == guard.state_dict()


def _roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_the_final_evaluation_is_recorded_never_acted_on():
    guard = FidelityGuard(settings(patience=1))
    guard.check(0, evaluation(0.95, 10.0, -5.0))
    decision = guard.check(60, evaluation(0.40, 170.0, -1.0), final=True)
    assert decision.kind == "final" and not decision.satisfied and decision.restore_step is None
    assert guard.final_satisfied is False and guard.rollbacks == 0 and guard.best_step == 0
    assert guard.summary()["final_satisfies"] is False and "accuracy >= 0.9" in guard.summary()["constraint"]


def test_action_stop_restores_the_last_good_checkpoint_and_a_failing_seed_stops_without_one():
    guard = FidelityGuard(settings(action="stop", patience=1))
    guard.check(0, evaluation(0.95, 10.0, -5.0))
    guard.check(10, evaluation(0.95, 11.0, -4.0))
    decision = guard.check(20, evaluation(0.95, 30.0, -1.0))
    assert (decision.kind, decision.restore_step) == ("stop", 10) and "grpo.guard.action = stop" in decision.message
    weak = FidelityGuard(settings(patience=2))
    assert weak.check(0, evaluation(0.60, 10.0, -5.0)).kind == "violation"  # the seed itself fails
    decision = weak.check(10, evaluation(0.70, 10.0, -4.0))
    assert (decision.kind, decision.restore_step) == ("stop", None) and "not even the seed" in decision.message
    assert weak.best_step is None and weak.protected_steps() == set()


def test_the_guard_names_what_it_needs():
    with pytest.raises(KeyError, match="eval/sde/classifier_fd"):
        FidelityGuard(settings(samples="sde")).check(0, {"eval/sde/classifier_accuracy": 1.0, "eval/sde/reward": 0.0})


# --- which checkpoint a path means --------------------------------------------------------------------


def save(run_dir, step, keep_last=None, protect=None):
    weights = {"w": torch.full((2,), float(step))}
    return ckpt.save_checkpoint(
        run_dir, step, weights, None, {"optimizer": {}}, OmegaConf.create({}), keep_last, protect=protect
    )


def test_a_run_dir_means_its_published_best_latest_its_newest(tmp_path):
    run = tmp_path / "run"
    for step in (0, 10, 20):
        save(run, step)
    assert ckpt.resolve_checkpoint(run).name == "step_0000020"  # nothing published: the newest
    with pytest.raises(ckpt.CheckpointError, match="published no best"):
        ckpt.resolve_checkpoint(run / "checkpoints" / "best")
    ckpt.write_best(run, 10, {"reward": -1.0})
    marker = json.loads((run / "checkpoints" / "best.json").read_text())
    assert marker["checkpoint"] == "step_0000010" and marker["reward"] == -1.0
    assert ckpt.resolve_checkpoint(run).name == "step_0000010"
    assert ckpt.resolve_checkpoint(run / "checkpoints" / "best").name == "step_0000010"
    assert ckpt.resolve_checkpoint(run / "checkpoints" / "latest").name == "step_0000020"
    assert ckpt.resolve_checkpoint(run, best=False).name == "step_0000020"  # what a resume continues
    assert ckpt.load_checkpoint(run).model["w"][0] == 10.0
    # pruning spares the protected steps (the guard's best and rollback target)
    save(run, 30, keep_last=1, protect={10})
    assert [step for step, _ in ckpt.list_checkpoints(run)] == [10, 30]
    # a damaged best is an error, never a silent fall-back to a checkpoint the run did not publish
    (run / "checkpoints" / "step_0000010" / "model.safetensors").write_bytes(b"broken")
    with pytest.raises(ckpt.CheckpointError, match="step_0000010"):
        ckpt.resolve_checkpoint(run)
