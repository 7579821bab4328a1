"""Flow maps (MeanFlow, flow_map.py) against the few-step table (experiments/few_step.md): quality at
1, 2, 4, 8 and 32 flow-map jumps, with the training CPU seconds each model cost. Writes
flow_maps_<tag>.json and flow_maps_<tag>.png (quality against NFE) beside the runs in `out` (with
update_docs=true: the tracked experiments/ and experiments/figures/ files instead) and prints the
markdown table (experiments/flow_maps.md).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/flow_maps.py stage=moons
    OMP_NUM_THREADS=1 .venv/bin/python experiments/flow_maps.py stage=digits epochs=30
    OMP_NUM_THREADS=1 .venv/bin/python experiments/flow_maps.py stage=fashion data_root=data/standin_digits28 \
        tag=digits28 classifier=runs/classifiers/digits28.safetensors

Training and evaluation are few_step.py's own (`few_step.train`, `few_step.evaluate`): one `train.py`
process on one thread per model, timed in CPU seconds (user + sys, start-up included); the same samples
(seed 1), metrics and classifier. Models: `scratch` (the stage's *_meanflow preset) and, with
convert=true, `converted` (the stage's flow-matching teacher, then its conversion preset or the flow-map
preset with CONVERT, started from it with training.init.checkpoint; its cost includes the teacher's) and the teacher
itself, sampled with Euler and its run's guidance as few_step.py samples it (the same-day reference).
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from few_step import NFES, evaluate, plot, results_paths, train

from cli import parse_keys
from config import check, check_choice
from runtime import run_main

# (flow map, teacher, conversion: a preset, or the flow-map preset with CONVERT)
STAGES = {
    "moons": ("moons_meanflow", "moons", "moons_meanflow_convert"),
    "digits": ("digits_meanflow", "digits_cfg", None),
    "fashion": ("fashion_meanflow", "fashion_cfg", "fashion_meanflow_convert"),  # Fashion-MNIST or a stand-in
}
CLASSIFIERS = {"digits": "runs/classifiers/digits.safetensors", "fashion": "runs/classifiers/fashion.safetensors"}
# what moons_meanflow_convert adds to moons_meanflow: the teacher's time features, the interval-splitting
# target (the JVP of a network with 1000x time features is mostly a fast ripple in t), no warmup
CONVERT = ("model.time_scale=1000.0", "flow.meanflow.derivative=split", "training.warmup_steps=0")


@dataclass
class FlowMapsConfig:
    stage: str | None = None  # required: moons | digits | fashion
    out: str | None = None  # run directory root, also where the table goes (null: runs/flow_maps/<tag>)
    update_docs: bool = False  # write the table and figure into the tracked experiments/ files instead
    epochs: int | None = None  # training.epochs of every run (null: each preset's)
    convert: bool = False  # also the teacher -> flow map conversion (implies teacher)
    teacher: bool = False  # also train (or reuse) and score the stage's flow-matching teacher
    curriculum_steps: int = 0  # conversion: steps over which the largest r - t widens from 0 to 1 (0: off)
    classifier: str | None = None  # the evaluation classifier (null: the stage's, CLASSIFIERS)
    data_root: str | None = None  # dataset.root of every run (a 28x28 stand-in; download off)
    tag: str | None = None  # names the results experiments/flow_maps_<tag>.json (null: the stage)
    overrides: str = ""  # extra train.py overrides for every flow-map run, space-separated
    guidance: float = 1.0  # the flow maps' solver.guidance_scale when scored: 1 for CFG folded in at a fixed
    # scale, the model's input w for one trained with guidance as a condition (moons: unconditional, unused)


def main(argv: list[str] | None = None) -> int:
    args = parse_keys(sys.argv[1:] if argv is None else argv, FlowMapsConfig, __doc__)
    check(args.stage is not None, "stage", args.stage, f"is required; choose one of: {', '.join(sorted(STAGES))}")
    check_choice("stage", args.stage, sorted(STAGES))
    tag = args.tag or args.stage
    out = Path(args.out or f"runs/flow_maps/{tag}")
    check(args.guidance >= 1, "guidance", args.guidance, "must be >= 1 (1 = no guidance)")
    json_path, figure = results_paths(f"flow_maps_{tag}", out, args.update_docs)
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    timings["_path"] = str(timings_path)
    flow_map, teacher, conversion = STAGES[args.stage]
    epochs = [f"training.epochs={args.epochs}"] if args.epochs else []
    classifier = args.classifier or CLASSIFIERS.get(args.stage)
    extra = [] if args.stage == "moons" else ["training.classifier=" + classifier]
    if args.data_root:
        extra += [f"dataset.root={args.data_root}", "dataset.download=false"]
    tuned = args.overrides.split()
    cost = {"scratch": train(out, "scratch", flow_map, timings, *epochs, *tuned, *extra)}
    if args.convert or args.teacher:
        teacher_cost = train(out, "teacher", teacher, timings, *epochs, *extra)
    if args.convert:
        preset, overrides = (conversion, ()) if conversion else (flow_map, CONVERT)
        student = train(
            out,
            "converted",
            preset,
            timings,
            *overrides,
            f"training.init.checkpoint={out / 'teacher'}",
            f"flow.meanflow.curriculum_steps={args.curriculum_steps}",
            *epochs,
            *tuned,
            *extra,
        )
        cost["converted"] = teacher_cost + student
    guidance = None if args.stage == "moons" else args.guidance
    table = {}
    for name, seconds in cost.items():
        scores = evaluate(args.stage, out / name, guidance, classifier, "flow_map")
        table[name] = {"seconds": seconds, "nfe": {str(k): v for k, v in scores.items()}}
    if args.convert or args.teacher:  # the teacher as few_step.py scores it (Euler, its run's guidance)
        scores = evaluate(args.stage, out / "teacher", None, classifier)
        table["teacher (Euler)"] = {"seconds": timings["teacher"], "nfe": {str(k): v for k, v in scores.items()}}
    timings.pop("_path")
    json_path.write_text(json.dumps({"timings": timings, "table": table}, indent=2))
    plot_key = "sliced_w2" if args.stage == "moons" else "classifier_fd"
    plot(tag, table, plot_key, figure, xlabel="NFE (flow-map jumps; the teacher: Euler steps)")
    print(f"wrote {json_path} and {figure}")
    keys = ["sliced_w2"] if args.stage == "moons" else ["classifier_accuracy", "classifier_fd"]
    print("\n| model | training CPU s | " + " | ".join(f"{k} @ {n}" for k in keys for n in NFES) + " |")
    print("|---|---|" + "---|" * (len(keys) * len(NFES)))
    for name, row in table.items():
        cells = " | ".join(f"{row['nfe'][str(n)][k]:.4f}" for k in keys for n in NFES)
        print(f"| {name} | {row['seconds']:.0f} | {cells} |")
    return 0


if __name__ == "__main__":
    run_main(main)
