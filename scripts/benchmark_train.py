"""Training throughput of a preset: images/s, ms/step, peak memory, parameters, FLOPs and MFU.

    uv run python scripts/benchmark_train.py experiment=fashion_cfg [steps=50 warmup=10 batch=128
        device=auto compile=null amp=auto channels_last=null synthetic=true peak_tflops=null out=FILE.json
        profile=TABLE.txt]
        [train.py overrides]

It times the real `Trainer.train_step` (data draw, forward, loss, backward, clip, fused AdamW,
EMA) after `warmup` untimed steps. FLOPs of one step are counted once with
torch.utils.flop_counter (matmuls/convs/attention, forward + backward); MFU = FLOPs per second /
peak, with the peak taken from `peak_tflops` or the GPU's bf16 dense figure. `synthetic=true`
replaces the dataset with random uint8 images of the preset's shape (throughput does not depend
on pixel values), so presets benchmark on machines without the data.
"""

import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cli import parse_keys
from config import check, load_config
from runtime import run_main, setup_runtime
from trainer import Trainer


@dataclass
class BenchTrainConfig:
    """The benchmark's own keys; every other key=value argument is a train.py override."""

    steps: int = 50  # timed steps
    warmup: int = 10  # untimed steps first
    batch: int | None = None  # training.batch_size (null: the preset's)
    device: str | None = None  # device (null: the preset's)
    compile: bool | None = None  # training.compile (null: the preset's)
    amp: str | None = None  # training.amp: auto | bf16 | none (null: the preset's)
    channels_last: bool | None = None  # training.channels_last (null: the preset's)
    synthetic: bool = True  # random uint8 images of the preset's shape instead of the dataset
    peak_tflops: float | None = None  # MFU's peak per GPU (null: the GPU's bf16 dense figure)
    out: str | None = None  # also write the result JSON here
    profile: str | None = None  # also write a torch.profiler table here (+ a chrome trace beside it)


# bf16 dense tensor-core peaks (TFLOP/s) for MFU
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "RTX 4090": 165.2, "RTX 4080": 97.5}


def parse(argv: list[str]) -> tuple[BenchTrainConfig, list[str]]:
    """-> (the benchmark's keys, train.py overrides: the rest, plus the benchmark keys that set training keys)."""
    options, overrides = parse_keys(argv, BenchTrainConfig, __doc__, passthrough=True)
    check(options.steps >= 1, "steps", options.steps, "must be >= 1")
    check(options.warmup >= 0, "warmup", options.warmup, "must be >= 0")
    mapping = {
        "batch": "training.batch_size",
        "device": "device",
        "compile": "training.compile",
        "amp": "training.amp",
        "channels_last": "training.channels_last",
    }
    overrides += [
        f"{mapping[k]}={str(getattr(options, k)).lower()}" for k in mapping if getattr(options, k) is not None
    ]
    return options, overrides


def synthetic_like(dataset_cfg, device, model_cfg=None):
    """Random data with the real dataset's shape, classes and storage dtype. A model that fixes its
    input size (a DiT's input_size, e.g. a smoke preset's 8x8 latents) or its class count wins."""
    import datasets

    name = dataset_cfg.name
    shape, num_classes = datasets.DATASET_INFO[name]["shape"], datasets.DATASET_INFO[name]["num_classes"]
    if model_cfg is not None and "input_size" in model_cfg:
        shape = (model_cfg.get("in_channels", shape[0]), model_cfg.input_size, model_cfg.input_size)
    if model_cfg is not None and "num_classes" in model_cfg:
        num_classes = min(num_classes, model_cfg.num_classes)
    generator = torch.Generator().manual_seed(0)
    count = 4096
    x = torch.randint(0, 256, (count, *shape), generator=generator, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (count,), generator=generator)
    return datasets.InMemoryDataset(
        x=x.to(device), y=y.to(device), num_classes=num_classes, name=name, hflip=dataset_cfg.get("hflip", False)
    )


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def step_flops(trainer) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    step = trainer.step
    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    trainer.step = step
    return counter.get_total_flops()


def profile_steps(trainer, out: Path, sync, steps: int = 3) -> None:
    """A torch.profiler table of `steps` training steps (the top 40 ops by device time, else CPU time),
    plus a chrome trace beside it: where the step's time goes (host syncs, attention kernels, MoE
    gathers, the optimizer and EMA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    step = trainer.step
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            trainer.train_step()
        sync()
    trainer.step = step
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    out.write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    prof.export_chrome_trace(str(out.with_suffix(".trace.json")))


def main(argv: list[str] | None = None) -> dict:
    options, overrides = parse(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as run_dir:
        # A stage that starts from another run (training.init, the unmasked fine-tune) is timed from its
        # random initialisation: the weights do not change the speed.
        no_init = [
            "training.init.checkpoint=null",
            "training.init.model=ema",
            "training.init.ema=ema",
            "training.init.optimizer=false",
            "training.init.step=false",
        ]
        cfg = load_config(
            [
                *overrides,
                *no_init,
                f"training.run_dir={run_dir}",
                "training.tensorboard=false",
                "training.progress=false",
                f"training.max_steps={10**9}",
            ]
        )
        runtime = setup_runtime(cfg.device)
        dataset = None
        if options.synthetic and cfg.dataset.name != "moons":
            dataset = synthetic_like(cfg.dataset, runtime.device, cfg.model)
        trainer = Trainer(cfg, runtime, Path(run_dir), dataset=dataset)
        device = runtime.device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for _ in range(options.warmup):
            trainer.train_step()
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(options.steps):
            trainer.train_step()
        sync()
        seconds = (time.perf_counter() - start) / options.steps
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / options.steps
        flops = step_flops(trainer)
        if options.profile:
            profile_steps(trainer, Path(options.profile), sync)
        result = {
            "experiment": cfg.experiment,
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"cpu x{torch.get_num_threads()} threads",
            "batch": cfg.training.batch_size,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "images_per_s": cfg.training.batch_size / seconds,
            "ms_per_step": seconds * 1e3,
            "peak_memory_mb": peak_memory_mb(device),
            "minor_page_faults_per_step": faults,
            "gflops_per_step": flops / 1e9,
            "achieved_tflops": flops / seconds / 1e12,
            "compile": trainer.forward_model is not trainer.model,
            "amp": str(trainer.amp_dtype),
            "channels_last": trainer.channels_last,
            "synthetic_data": bool(options.synthetic) and cfg.dataset.name != "moons",
        }
        peak = options.peak_tflops
        if peak is None and device.type == "cuda":
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in result["device"]), None)
        if peak:
            result["mfu"] = result["achieved_tflops"] / peak
        print(json.dumps(result, indent=2))
        if options.out:
            Path(options.out).write_text(json.dumps(result, indent=2))
        return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    run_main(lambda argv: (main(argv), 0)[1])
