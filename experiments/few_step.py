"""Quality per compute: NFE-vs-quality curves of independent, minibatch-OT, reflow (1 and 2 rounds) and
one-step distillation, each with the training seconds it cost. Writes OUT/few_step_<stage>.json and
OUT/few_step_<stage>.png (OUT: runs/few_step/<stage>, beside the runs) and prints the markdown table;
update_docs=true writes them to the tracked experiments/few_step_<stage>.json and
experiments/figures/few_step_<stage>.png instead (experiments/few_step.md quotes those).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/few_step.py stage=moons
    OMP_NUM_THREADS=1 .venv/bin/python experiments/few_step.py stage=digits epochs=30 pairs=6000 update_docs=true

Every stage is one `train.py` / `scripts/generate_pairs.py` process on one thread, run one at a time and
timed in CPU seconds (user + sys, start-up included; the wall time is recorded too, but on a shared
machine it measures the neighbours); a finished stage is reused with its recorded time.
Sampling is Euler on the uniform grid at 1, 2, 4, 8, 32 steps (NFE = steps; a guided step is one
forward of 2B rows), from the EMA weights. moons: sliced W2 of 4,000 samples to the 8,000 training
points (metrics.sliced_wasserstein). digits: accuracy and classifier-FD of 500 samples (50 per digit)
under runs/classifiers/digits.safetensors.
"""

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cli import parse_keys
from config import check, check_choice
from runtime import run_main

ROOT = Path(__file__).resolve().parents[1]

NFES = (1, 2, 4, 8, 32)
STAGES = {  # stage -> (teacher experiment, minibatch-OT experiment, reflow experiment, distill experiment)
    "moons": ("moons", "moons_ot", "moons_reflow", "moons_distill"),
    "digits": ("digits_cfg", "digits_cfg", "digits_reflow", None),
}


def run(command: list[str], timings: dict, name: str, done: bool) -> float:
    """Run one stage as its own process (unless done) and record its wall seconds."""
    if done and name in timings:
        return timings[name]
    print("$", " ".join(command), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds (user + sys) of the one-thread process: on a shared machine the wall time measures the
    # neighbours, the CPU time the work itself. Both are kept.
    timings[name] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    timings[f"{name}_wall"] = time.perf_counter() - started
    Path(timings["_path"]).write_text(json.dumps({k: v for k, v in timings.items() if k != "_path"}, indent=2))
    return timings[name]


def train(out: Path, name: str, experiment: str, timings: dict, *overrides: str) -> float:
    run_dir = out / name
    return run(
        [
            "train.py",
            f"experiment={experiment}",
            f"training.run_dir={run_dir}",
            "training.progress=false",
            "training.tensorboard=false",
            *overrides,
        ],
        timings,
        name,
        (run_dir / "finished.json").is_file(),
    )


def pairs(out: Path, name: str, teacher: str, num_pairs: int, timings: dict, *overrides: str) -> float:
    pair_dir = out / "pairs" / name
    return run(
        [
            "scripts/generate_pairs.py",
            f"checkpoint={out / teacher}",
            f"out={pair_dir}",
            f"num_pairs={num_pairs}",
            "device=cpu",
            *overrides,
        ],
        timings,
        f"pairs_{name}",
        (pair_dir / "manifest.json").is_file(),
    )


def evaluate(
    stage: str, checkpoint: Path, guidance: float | None, classifier: str | None, method: str = "euler", nfes=NFES
) -> dict[int, dict]:
    """{NFE: metrics} for one model: `method` (Euler; flow_map for a flow map) at every NFE in nfes."""
    import torch

    import metrics
    from build import build_dataset, load_eval_classifier, load_run
    from sampling import generate, measure_straightness

    torch.set_num_threads(1)
    results, scorer = {}, None
    for nfe in nfes:
        overrides = {"method": method, "num_steps": nfe, "grid": "uniform"}
        if guidance is not None:
            overrides["guidance_scale"] = guidance
        loaded = load_run(checkpoint, "cpu", solver_overrides=overrides)
        count = 4000 if stage == "moons" else 500
        samples, labels = generate(loaded.sampler, loaded.solver, loaded.sample_shape, count, seed=1)
        values = {"straightness": measure_straightness(loaded.sampler, loaded.solver, loaded.sample_shape, 128, seed=1)}
        if stage == "moons":
            dataset = build_dataset(loaded.config.dataset, "cpu")
            values["sliced_w2"] = metrics.sliced_wasserstein(samples, dataset.x)
        else:
            if scorer is None:
                scorer = load_eval_classifier(classifier, loaded.config.dataset, "cpu", count, seed=0)
            values.update(scorer.score(samples, labels))
        results[nfe] = values
        print(checkpoint.name, nfe, {k: round(v, 4) for k, v in values.items()}, flush=True)
    return results


def plot(stage: str, table: dict, key: str, path: Path, xlabel: str = "NFE (Euler steps)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for name, row in table.items():
        axis.plot(NFES, [row["nfe"][str(n)][key] for n in NFES], marker="o", label=f"{name} ({row['seconds']:.0f} s)")
    axis.set_xscale("log", base=2)
    axis.set_xticks(NFES, [str(n) for n in NFES])
    if key != "classifier_accuracy":
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(key)
    axis.set_title(f"{stage}: {key} vs NFE (training seconds, cumulative)")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def results_paths(name: str, out: Path, update_docs: bool) -> tuple[Path, Path]:
    """-> (table json, figure png) named `name`: beside the runs in `out`, or the tracked experiments/ files
    when asked; an `out` inside experiments/ is refused, so no tracked file changes unasked."""
    docs = (ROOT / "experiments").resolve()
    check(
        not out.resolve().is_relative_to(docs),
        "out",
        str(out),
        f"is inside {docs}, whose files are tracked; choose a folder outside it (update_docs=true writes the "
        f"table and figure there)",
    )
    if update_docs:
        return ROOT / f"experiments/{name}.json", ROOT / f"experiments/figures/{name}.png"
    return out / f"{name}.json", out / f"{name}.png"


@dataclass
class FewStepConfig:
    stage: str | None = None  # required: moons | digits
    out: str | None = None  # run directory root, also where the table goes (null: runs/few_step/<stage>)
    update_docs: bool = False  # write the table and figure into the tracked experiments/ files instead
    pairs: int = 50_000  # reflow pairs per round
    epochs: int | None = None  # digits: training.epochs of the teacher / OT runs
    reflow_epochs: int | None = None  # training.epochs of the reflow students
    classifier: str = "runs/classifiers/digits.safetensors"


def main(argv: list[str] | None = None) -> int:
    args = parse_keys(sys.argv[1:] if argv is None else argv, FewStepConfig, __doc__)
    check(args.stage is not None, "stage", args.stage, f"is required; choose one of: {', '.join(sorted(STAGES))}")
    check_choice("stage", args.stage, sorted(STAGES))
    check(args.pairs >= 1, "pairs", args.pairs, "must be >= 1")
    out = Path(args.out or f"runs/few_step/{args.stage}")
    json_path, figure_path = results_paths(f"few_step_{args.stage}", out, args.update_docs)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    teacher, ot, reflow, distill = STAGES[args.stage]
    epochs = [f"training.epochs={args.epochs}"] if args.epochs else []
    reflow_epochs = [f"training.epochs={args.reflow_epochs}"] if args.reflow_epochs else []
    extra = ["training.classifier=" + args.classifier] if args.stage == "digits" else []

    timings["_path"] = str(timings_path)  # run() saves after every stage, so an interrupted table resumes
    cost = {}
    cost["independent"] = train(out, "independent", teacher, timings, *epochs, *extra)
    cost["minibatch_ot"] = train(
        out, "minibatch_ot", ot, timings, "training.coupling.name=minibatch_ot", *epochs, *extra
    )

    def on_pairs(pair_set: str, init: str) -> list[str]:
        return [f"training.coupling.pairs={out / 'pairs' / pair_set}", f"training.init.checkpoint={out / init}"]

    # Reflow round k trains on pairs drawn from round k - 1 (the teacher for k = 1), starting from its weights.
    generated = {}
    for k, previous in ((1, "independent"), (2, "reflow_1")):
        generated[k] = pairs(out, f"rf{k}", previous, args.pairs, timings)
        seconds = train(out, f"reflow_{k}", reflow, timings, *on_pairs(f"rf{k}", previous), *reflow_epochs, *extra)
        cost[f"reflow_{k}"] = cost[previous] + generated[k] + seconds
    if distill:
        seconds = train(out, "reflow_1_distill", distill, timings, *on_pairs("rf2", "reflow_1"), *reflow_epochs)
        cost["reflow_1_distill"] = cost["reflow_1"] + generated[2] + seconds

    # Guidance: the teacher and OT models sample with their run's guidance; reflow students learnt the
    # guided field from guided pairs, so they sample with guidance 1.
    guided = {"independent": None, "minibatch_ot": None}
    table = {}
    for name in cost:
        guidance = guided.get(name, 1.0) if args.stage == "digits" else None
        table[name] = {
            "seconds": cost[name],
            "nfe": {str(k): v for k, v in evaluate(args.stage, out / name, guidance, args.classifier).items()},
        }
    timings.pop("_path")
    json_path.write_text(json.dumps({"timings": timings, "table": table}, indent=2))
    key = "sliced_w2" if args.stage == "moons" else "classifier_fd"
    plot(args.stage, table, key, figure_path)
    print(f"wrote {json_path} and {figure_path}")
    keys = [key] if args.stage == "moons" else ["classifier_accuracy", "classifier_fd"]
    print("\n| model | training s (cumulative) | " + " | ".join(f"{k} @ {n}" for k in keys for n in NFES) + " |")
    print("|---|---|" + "---|" * (len(keys) * len(NFES)))
    for name, row in table.items():
        cells = " | ".join(f"{row['nfe'][str(n)][k]:.4f}" for k in keys for n in NFES)
        print(f"| {name} | {row['seconds']:.0f} | {cells} |")
    print(
        "\nstraightness (Euler x32): "
        + ", ".join(f"{n} {r['nfe']['32']['straightness']:.4f}" for n, r in table.items())
    )
    return 0


if __name__ == "__main__":
    run_main(main)
