"""The fidelity guard of a GRPO run (grpo.guard.*): reward may rise only while the samples stay on the data.

At every evaluation the guard checks a constraint on the evaluation samples (`samples`: the ODE or the SDE
ones), scored by the evaluation classifier, which the policy never sees:

    classifier_accuracy >= min_accuracy   and   classifier_fd <= max_fd_ratio x the seed's classifier_fd

(the seed's FD is the iteration-0 evaluation's). An evaluation that satisfies it is "good": its checkpoint is
the rollback target, and the good one with the highest evaluation reward so far is the run's `best`
(RUN/checkpoints/best.json, what `inference.py checkpoint=RUN` samples). After `patience` violating
evaluations in a row the guard acts: "rollback" restores the last good checkpoint's weights and optimizer
state and multiplies the learning rate by lr_factor (at most max_rollbacks times, then it stops); "stop"
restores them and ends the run there. Without any good checkpoint (the seed itself fails) it stops.

The guard is plain data (`state_dict`), saved in every checkpoint, so a resumed run takes the same decisions;
it never touches files itself: `FidelityGuard.check` returns a `Decision` the trainer carries out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ACTIONS = ("rollback", "stop")
SAMPLES = ("ode", "sde")


@dataclass
class Decision:
    """What one check found and what the trainer must do: kind in {"ok", "violation", "rollback", "stop",
    "final"}; restore_step: the checkpoint whose weights to restore (rollback / stop), else None."""

    kind: str
    satisfied: bool
    message: str
    restore_step: int | None = None
    new_best: bool = False


class FidelityGuard:
    """The constraint and its bookkeeping (module docstring). `settings`: grpo.guard (min_accuracy,
    max_fd_ratio, patience, action, lr_factor, max_rollbacks, samples)."""

    def __init__(self, settings):
        self.min_accuracy = float(settings.min_accuracy)
        self.max_fd_ratio = float(settings.max_fd_ratio)
        self.patience = int(settings.patience)
        self.action = str(settings.action)
        self.lr_factor = float(settings.lr_factor)
        self.max_rollbacks = int(settings.max_rollbacks)
        self.samples = str(settings.samples)
        # the state a resume must restore (state_dict): plain numbers, so state.pt stays weights_only
        self.seed_fd: float | None = None
        self.violations = 0  # violating evaluations in a row
        self.rollbacks = 0
        self.lr_scale = 1.0  # multiplies the scheduled learning rate (lr_factor per rollback)
        self.good_step: int | None = None  # the last good evaluation's iteration: the rollback target
        self.best_step: int | None = None
        self.best_reward: float | None = None
        self.last_checked: int | None = None  # the iteration of the last check (a resume may owe one)
        self.stopped: str | None = None  # why the guard ended the run, once it has
        self.final_satisfied: bool | None = None

    # -- the constraint --

    def keys(self) -> tuple[str, str, str]:
        """The evaluation keys the guard reads: accuracy, classifier-FD, reward."""
        kind = self.samples
        return f"eval/{kind}/classifier_accuracy", f"eval/{kind}/classifier_fd", f"eval/{kind}/reward"

    def describe(self) -> str:
        seed = f"{self.seed_fd:.4g}" if self.seed_fd is not None else "the seed's"
        return (
            f"{self.samples} samples: classifier accuracy >= {self.min_accuracy:g} and classifier-FD <= "
            f"{self.max_fd_ratio:g} x {seed}"
        )

    def violated_by(self, values: dict[str, float]) -> list[str]:
        """The parts of the constraint `values` fail, in words ([] = satisfied; NaN fails)."""
        accuracy_key, fd_key, _ = self.keys()
        accuracy, fd = values[accuracy_key], values[fd_key]
        failed = []
        if not accuracy >= self.min_accuracy:
            failed.append(f"accuracy {accuracy:.3f} < {self.min_accuracy:g}")
        limit = self.max_fd_ratio * self.seed_fd
        if not fd <= limit:
            failed.append(f"classifier-FD {fd:.4g} > {self.max_fd_ratio:g} x seed's {self.seed_fd:.4g} = {limit:.4g}")
        return failed

    def check(self, step: int, values: dict[str, float], final: bool = False) -> Decision:
        """Check iteration `step`'s evaluation values (eval/<samples>/classifier_accuracy, classifier_fd,
        reward; the first check is the seed's and fixes the FD reference) and decide. final: the run's
        last evaluation: recorded, never acted on."""
        accuracy_key, fd_key, reward_key = self.keys()
        missing = [key for key in (accuracy_key, fd_key, reward_key) if key not in values]
        if missing:
            raise KeyError(f"the fidelity guard needs {', '.join(missing)} (training.classifier must be set)")
        if self.seed_fd is None:
            self.seed_fd = float(values[fd_key])
        self.last_checked = step
        failed = self.violated_by(values)
        reward = float(values[reward_key])
        if not failed:
            self.violations = 0
            self.good_step = step
            new_best = self.best_reward is None or (math.isfinite(reward) and reward > self.best_reward)
            if new_best:
                self.best_step, self.best_reward = step, reward
            if final:
                self.final_satisfied = True
            return Decision("final" if final else "ok", True, f"iteration {step} satisfies the guard", None, new_best)
        what = f"iteration {step} violates the guard ({'; '.join(failed)})"
        if final:
            self.final_satisfied = False
            return Decision("final", False, what)
        self.violations += 1
        if self.violations < self.patience:
            return Decision("violation", False, f"{what}: {self.violations} in a row of patience {self.patience}")
        self.violations = 0
        if self.good_step is None:
            self.stopped = f"{what}; no evaluation has satisfied it, not even the seed's: stopping the run"
            return Decision("stop", False, self.stopped)
        if self.action == "rollback" and self.rollbacks < self.max_rollbacks:
            self.rollbacks += 1
            self.lr_scale *= self.lr_factor
            return Decision(
                "rollback",
                False,
                f"{what}, {self.patience} in a row: rolling back to iteration {self.good_step}'s checkpoint with "
                f"lr x {self.lr_scale:g} (rollback {self.rollbacks} of {self.max_rollbacks})",
                self.good_step,
            )
        why = "grpo.guard.action = stop" if self.action == "stop" else f"{self.max_rollbacks} rollbacks already"
        self.stopped = (
            f"{what}, {self.patience} in a row ({why}): restoring iteration {self.good_step}'s checkpoint and "
            f"stopping the run"
        )
        return Decision("stop", False, self.stopped, self.good_step)

    def owes_check(self, step: int, eval_every: int, target_steps: int) -> bool:
        """A run resumed at an evaluation step whose checkpoint was saved before this guard's check there."""
        due = bool(eval_every) and step % eval_every == 0 and 0 < step < target_steps
        return due and self.last_checked != step

    def protected_steps(self) -> set[int]:
        """Checkpoints pruning must keep: the rollback target and the best."""
        return {step for step in (self.good_step, self.best_step) if step is not None}

    def summary(self) -> dict:
        """What eval.json / finished.json record about the guard."""
        return {
            "constraint": self.describe(),
            "final_satisfies": self.final_satisfied,
            "best_step": self.best_step,
            "best_reward": self.best_reward,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "stopped": self.stopped,
        }

    # -- state --

    STATE = (
        "seed_fd",
        "violations",
        "rollbacks",
        "lr_scale",
        "good_step",
        "best_step",
        "best_reward",
        "last_checked",
        "stopped",
        "final_satisfied",
    )

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        for key in self.STATE:
            setattr(self, key, state[key])
