"""Figures and table of the digits JPEG-GRPO sweep (sweep.sh) for experiment.md.

    uv run python experiments/jpeg_compression_grpo/plot.py [sweep_dir=runs/grpo_sweep] [best=RUN@ITERATION]
        [measure=payload|total] [tag=SUFFIX]

Reads every run's metrics.jsonl. Every evaluation (same labels and noise each time, the seed's ODE
solver: for the 16x16 sweep 32 Heun steps, guidance 3 on t everywhere, since runs/digits_cfg predates
the [0.6, 1] interval; for the 28x28 runs fashion_cfg's 1.75 on [0, 0.6]) is one point: JPEG bpp reduction
against the seed's, and classifier accuracy against the requested digits. Writes pareto.png,
reward_curves.png, and with best=, before_after.png (seed | post-trained, same noise), into
experiments/jpeg_compression_grpo/figures/ (each name + tag, e.g. pareto_28.png with tag=_28). The x axis
is the payload (default) or total JPEG bpp reduction; the 28x28 bar is in total bpp. Prints a markdown
table of every run's evaluations.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIGURES = Path(__file__).resolve().parent / "figures"
BAR_REDUCTION, BAR_ACCURACY = 20.0, 0.90


def load_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [d for d in lines if "eval/ode/reward" in d], [d for d in lines if "reward/mean" in d]


def points(evals: list[dict], measure: str = "payload") -> list[tuple[int, float, float, float, float]]:
    """(iteration, payload or total bpp reduction %, accuracy, total bpp, classifier-FD) per evaluation."""
    key = "eval/ode/jpeg_payload_bpp" if measure == "payload" else "eval/ode/jpeg_bpp"
    return [
        (
            d["step"],
            100 * (1 - d[key] / evals[0][key]),
            d["eval/ode/classifier_accuracy"],
            d["eval/ode/jpeg_bpp"],
            d["eval/ode/classifier_fd"],
        )
        for d in evals
    ]


def main(sweep_dir: Path, best: str | None, measure: str = "payload", tag: str = "") -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    runs = {p.name: load_run(p) for p in sorted(sweep_dir.iterdir()) if (p / "metrics.jsonl").is_file()}
    figure, axis = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    axis.axvspan(BAR_REDUCTION, 100, ymin=0, ymax=1, color="none")
    axis.fill_between([BAR_REDUCTION, 100], BAR_ACCURACY, 1.02, color="tab:green", alpha=0.12, label="the bar")
    furthest = 0.0
    for name, (evals, _) in runs.items():
        pts = points(evals, measure)
        axis.plot([p[1] for p in pts], [p[2] for p in pts], "o-", ms=3, label=name)
        furthest = max([furthest] + [p[1] for p in pts])
    axis.set_xlim(left=min(-5, axis.get_xlim()[0]), right=min(100, max(40, furthest + 10)))
    axis.set_ylim(0, 1.02)
    axis.set_xlabel(f"JPEG {measure} bpp reduction vs seed (%)")
    axis.set_ylabel("classifier accuracy (requested digit)")
    axis.set_title("digits JPEG-GRPO: every evaluation of each run")
    axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(FIGURES / f"pareto{tag}.png")
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6.5, 3.5), dpi=120)
    for name, (_, train) in runs.items():
        axis.plot([d["step"] for d in train], [-d["reward/mean"] for d in train], label=name, lw=1)
    axis.set_xlabel("iteration")
    axis.set_ylabel("rollout JPEG bpp (= -reward)")
    if any("combined" in name for name in runs):
        axis.set_title("rollout reward (combined runs: -reward includes -log p)", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(FIGURES / f"reward_curves{tag}.png")
    plt.close(figure)

    print(f"| run | iteration | JPEG bpp (total) | {measure} reduction | accuracy | classifier-FD |")
    print("|---|---|---|---|---|---|")
    for name, (evals, _) in runs.items():
        for step, reduction, accuracy, total, fd in points(evals, measure):
            print(f"| {name} | {step} | {total:.2f} | {reduction:.1f} % | {accuracy:.2f} | {fd:.1f} |")

    if best:
        name, _, iteration = best.partition("@")
        before_after(sweep_dir / name, int(iteration) if iteration else None, tag)


def before_after(run_dir: Path, iteration: int | None, tag: str = "") -> None:
    """Seed | post-trained ODE samples from the same noise, 5 per digit."""
    import torch

    import checkpoint
    from build import load_run
    from figures import close_figure, comparison_figure
    from sampling import generate

    target = run_dir if iteration is None else run_dir / "checkpoints" / checkpoint.step_dir_name(iteration)
    policy = load_run(target, "cpu")
    seed = load_run(policy.config.seed_checkpoint_resolved.path, "cpu")
    with torch.no_grad():
        before, labels = generate(seed.sampler, policy.solver, policy.sample_shape, 50, seed=0)
        after, _ = generate(policy.sampler, policy.solver, policy.sample_shape, 50, seed=0)
    figure = comparison_figure(before, after, labels, "digits")
    figure.suptitle(
        f"left: seed | right: {run_dir.name} @ {policy.checkpoint.step} (same noise and labels)", fontsize=9, y=1.02
    )
    figure.savefig(FIGURES / f"before_after{tag}.png", bbox_inches="tight")
    close_figure(figure)


@dataclass
class PlotConfig:
    sweep_dir: str = "runs/grpo_sweep"  # the sweep's run directories (each with metrics.jsonl)
    best: str | None = None  # RUN@ITERATION to mark, e.g. combined_kl0@200
    measure: str = "payload"  # payload | total (JPEG bits per pixel with or without the constant image's)
    tag: str = ""  # suffix of the figure files


def cli(argv: list[str] | None = None) -> int:
    from cli import parse_keys

    args = parse_keys(sys.argv[1:] if argv is None else argv, PlotConfig, __doc__)
    main(Path(args.sweep_dir), args.best, args.measure, args.tag)
    return 0


if __name__ == "__main__":
    from runtime import run_main

    run_main(cli)
