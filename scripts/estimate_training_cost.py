"""Training cost of a staged recipe: images, EFLOPs, throughput, GPU-hours and dollars per stage and in total.

    # the write-up's ImageNet-256 H1024 run, with its measured H100-hours per stage
    uv run python scripts/estimate_training_cost.py model=nanoflow_h1024_d20 \\
        stages.masked.mask_ratio=0.75 stages.masked.epochs=240 stages.masked.gpu_hours=41.8397 \\
        stages.unmasked.mask_ratio=0 stages.unmasked.epochs=40 stages.unmasked.gpu_hours=21.9317

    # a plan: the same recipe at an assumed 40 % MFU on H100s at $3.30/GPU-hour
    uv run python scripts/estimate_training_cost.py model=nanoflow_h1024_d20 mfu=0.4 \\
        stages.masked.mask_ratio=0.75 stages.masked.epochs=240 stages.unmasked.mask_ratio=0 stages.unmasked.epochs=40

    # any model, from its training FLOPs per image (e.g. the latent U-Net's 16.4 G, 400 epochs)
    uv run python scripts/estimate_training_cost.py stages.unet.train_gflops=16.4 stages.unet.epochs=400 \\
        stages.unet.gpu_hours=16.5

The model is as in scripts/estimate_dit_complexity.py: model=NAME|CONFIG.yaml [model.KEY=VALUE ...].
Stages run in the order given; stage NAME takes stages.NAME.KEY=VALUE with keys
  mask_ratio    deferred-masking ratio of the stage (DiT models; default 0)
  epochs        passes over images_per_epoch images (ImageNet-1k train: 1,281,167), or
  images        images seen
  train_gflops  training GFLOPs per image; default: scripts/estimate_dit_complexity.py on the model
and at most one measured speed: `gpu_hours` (GPU-hours the stage took), `images_per_s` (of the whole
job, all `gpus` together) or `benchmark` (a JSON file from `scripts/benchmark_train.py ... out=FILE`,
measured on one GPU and scaled linearly to `gpus`). Without one, the stage runs at `mfu` of
`peak_tflops` per GPU.
Training FLOPs per image are 3 x forward (forward + backward), as in the estimator.
"""

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from build import meta_dit_from_keys
from cli import markdown_table, parse_keys, pick
from config import ConfigError, check
from dit_compute import complexity
from runtime import run_main

IMAGENET_TRAIN_IMAGES = 1_281_167
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM, bf16 tensor cores without sparsity
STAGE_KEYS = {"mask_ratio", "epochs", "images", "train_gflops", "gpu_hours", "images_per_s", "benchmark"}


@dataclass
class StageKeys:
    mask_ratio: float | None = None
    epochs: float | None = None
    images: int | None = None
    train_gflops: float | None = None
    gpu_hours: float | None = None
    images_per_s: float | None = None
    benchmark: str | None = None


@dataclass
class CostConfig:
    model: dict[str, Any] | None = None  # model=NAME|CONFIG.yaml [model.KEY=VALUE ...] (omit with train_gflops)
    stages: dict[str, StageKeys] = field(default_factory=dict)  # required: stages.NAME.KEY=VALUE (see above)
    images_per_epoch: int = IMAGENET_TRAIN_IMAGES
    gpus: int = 1  # GPUs the job runs on (wall-clock hours only)
    mfu: float = 0.4  # assumed model-FLOP utilisation
    peak_tflops: float = H100_BF16_DENSE_TFLOPS  # per GPU
    usd_per_gpu_hour: float = 3.30
    json: bool = False  # print JSON instead of a markdown table


def check_stage(name: str, keys: dict) -> dict:
    """A stage's set keys ({'mask_ratio': 0.75, 'epochs': 240}) -> {'name': name, ...}, checked; a
    `benchmark` file is read into its measured images/s per GPU."""
    stage = {"name": name, **{k: v for k, v in keys.items() if v is not None}}
    unknown = sorted(set(stage) - {"name"} - STAGE_KEYS)
    check(not unknown, f"stages.{name}", keys, f"{', '.join(unknown)} is not one of: {', '.join(sorted(STAGE_KEYS))}")
    check(("epochs" in stage) != ("images" in stage), f"stages.{name}", keys, "give exactly one of epochs or images")
    check(
        sum(key in stage for key in ("gpu_hours", "images_per_s", "benchmark")) <= 1,
        f"stages.{name}",
        keys,
        "give at most one of gpu_hours, images_per_s or benchmark",
    )
    if "benchmark" in stage:  # a measured speed: scripts/benchmark_train.py ... out=FILE.json (one GPU)
        measured = json.loads(Path(str(stage.pop("benchmark"))).read_text())
        stage["images_per_s_per_gpu"] = float(measured["images_per_s"])
        stage["measured_mfu"] = measured.get("mfu")
    return stage


# CostConfig's keys that stage_cost takes as they are.
SPEED_AND_PRICE = ("images_per_epoch", "gpus", "mfu", "peak_tflops", "usd_per_gpu_hour")


def stage_cost(
    stage: dict,
    train_flops_per_image: float,
    *,
    images_per_epoch: int = IMAGENET_TRAIN_IMAGES,
    gpus: int = 1,
    mfu: float = 0.4,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
    usd_per_gpu_hour: float = 3.30,
) -> dict:
    """Cost of one stage given its training FLOPs per image; the speed is measured or assumed (mfu)."""
    images = stage["images"] if "images" in stage else stage["epochs"] * images_per_epoch
    flops = images * train_flops_per_image
    if "gpu_hours" in stage:
        gpu_seconds = stage["gpu_hours"] * 3600
    elif "images_per_s" in stage:
        gpu_seconds = images / stage["images_per_s"] * gpus
    elif "images_per_s_per_gpu" in stage:  # measured on one GPU; assumes linear scaling to `gpus`
        gpu_seconds = images / stage["images_per_s_per_gpu"]
    else:
        gpu_seconds = flops / (mfu * peak_tflops * 1e12)
    tflops_per_gpu = flops / gpu_seconds / 1e12
    return {
        "name": stage["name"],
        "mask_ratio": stage.get("mask_ratio", 0.0),
        "images": images,
        "train_gflops_per_image": train_flops_per_image / 1e9,
        "eflops": flops / 1e18,
        "images_per_s": images / (gpu_seconds / gpus),
        "tflops_per_gpu": tflops_per_gpu,
        "mfu": tflops_per_gpu / peak_tflops,
        "gpu_hours": gpu_seconds / 3600,
        "wall_hours": gpu_seconds / gpus / 3600,
        "usd": gpu_seconds / 3600 * usd_per_gpu_hour,
    }


def total_row(rows: list[dict], peak_tflops: float) -> dict:
    gpu_hours = sum(r["gpu_hours"] for r in rows)
    eflops = sum(r["eflops"] for r in rows)
    wall_hours = sum(r["wall_hours"] for r in rows)
    tflops = eflops * 1e18 / (gpu_hours * 3600) / 1e12
    return {
        "name": "total",
        "mask_ratio": None,
        "images": sum(r["images"] for r in rows),
        "train_gflops_per_image": None,
        "eflops": eflops,
        "images_per_s": sum(r["images"] for r in rows) / (wall_hours * 3600),
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak_tflops,
        "gpu_hours": gpu_hours,
        "wall_hours": wall_hours,
        "usd": sum(r["usd"] for r in rows),
    }


COLUMNS = ["stage", "mask", "images", "train GFLOPs/img", "EFLOPs", "images/s", "TFLOP/s per GPU", "MFU"]


def markdown(rows: list[dict], title: str) -> str:
    def cells(r: dict) -> list[str]:
        mask = "" if r["mask_ratio"] is None else f"{r['mask_ratio']:g}"
        per_image = "" if r["train_gflops_per_image"] is None else f"{r['train_gflops_per_image']:.2f}"
        speed = [f"{r['images_per_s']:,.0f}", f"{r['tflops_per_gpu']:.0f}", f"{100 * r['mfu']:.1f} %"]
        cost = [f"{r['gpu_hours']:.2f}", f"{r['wall_hours']:.2f}", f"{r['usd']:,.2f}"]
        return [r["name"], mask, f"{r['images']:,}", per_image, f"{r['eflops']:.2f}", *speed, *cost]

    columns = [*COLUMNS, "GPU-hours", "wall hours", "USD"]
    return markdown_table(title, columns, [cells(r) for r in rows], "l" + "r" * 10)


def main(argv: list[str] | None = None) -> int:
    args = parse_keys(sys.argv[1:] if argv is None else argv, CostConfig, __doc__, named=("model",))
    check(bool(args.stages), "stages", None, "is required: stages.NAME.epochs=E (and the stage's other keys)")
    stages = [check_stage(name, asdict(keys)) for name, keys in args.stages.items()]
    title, model = "training cost", None
    if args.model:
        model, title = meta_dit_from_keys("model", args.model)
    rows = []
    for stage in stages:
        if "train_gflops" in stage:
            per_image = stage["train_gflops"] * 1e9
        elif model is not None:
            per_image = complexity(model, stage.get("mask_ratio", 0.0))["train_flops"]
        else:
            raise ConfigError(f"stages.{stage['name']} needs train_gflops when no model is given")
        rows.append(stage_cost(stage, per_image, **pick(args, *SPEED_AND_PRICE)))
    rows.append(total_row(rows, args.peak_tflops))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(
            markdown(
                rows,
                f"{title} (${args.usd_per_gpu_hour:.2f}/GPU-hour, peak {args.peak_tflops:g} "
                f"TFLOP/s per GPU, {args.gpus} GPU{'s' if args.gpus > 1 else ''})",
            )
        )
    return 0


if __name__ == "__main__":
    run_main(main)
