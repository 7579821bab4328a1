"""Sampling throughput of a preset's model: images/s, NFE/s, peak memory and minor page faults.

    uv run python scripts/benchmark_sampling.py experiment=fashion_cfg [num_samples=200 batch=128
        solver=heun num_steps=32 guidance_scale=3 device=auto checkpoint=PATH repeats=1] [train.py overrides]

It times the real `sampling.generate` (the one sampler behind training grids, inference.py and
evaluation) after one untimed warm-up batch. Without `checkpoint=` the model has its random
initialisation (throughput does not depend on the weights, except that zero-initialised output layers
make every sample the same); with it, the checkpoint's EMA weights. NFE counts the model's forward
passes: a guided step is one forward of 2B rows.
"""

import json
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch

from build import build_flow, build_model, load_run
from cli import parse_keys
from config import DEVICES, check, check_choice, load_config, resolve_solver
from datasets import DATASET_INFO
from runtime import run_main, select_device
from sampling import FlowSampler, generate


@dataclass
class BenchSamplingConfig:
    """The benchmark's own keys; every other key=value argument is a train.py override (the preset)."""

    num_samples: int = 200  # timed samples per repeat
    batch: int = 128  # samples per forward
    solver: str | None = None  # the ODE method (null: the preset's or the checkpoint's)
    num_steps: int | None = None
    guidance_scale: float | None = None
    device: str = "auto"
    checkpoint: str | None = None  # time this checkpoint's EMA model (null: the preset's random init)
    repeats: int = 1


def parse(argv: list[str]) -> tuple[BenchSamplingConfig, list[str]]:
    options, overrides = parse_keys(argv, BenchSamplingConfig, __doc__, passthrough=True)
    for key in ("num_samples", "batch", "repeats"):
        check(getattr(options, key) >= 1, key, getattr(options, key), "must be >= 1")
    check_choice("device", options.device, DEVICES)
    return options, overrides


def main(argv: list[str] | None = None) -> dict:
    options, overrides = parse(sys.argv[1:] if argv is None else argv)
    device = select_device(options.device)
    solver_overrides = {
        "method": options.solver,
        "num_steps": options.num_steps,
        "guidance_scale": options.guidance_scale,
    }
    if options.checkpoint:
        run = load_run(options.checkpoint, device, solver_overrides=solver_overrides)
        sampler, solver, shape, name = run.sampler, run.solver, run.sample_shape, run.config.experiment
    else:
        cfg = load_config(overrides)
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device).eval()
        path, _, _ = build_flow(cfg.flow)
        sampler = FlowSampler(model, path, cfg.flow.prediction, getattr(model, "num_classes", None))
        solver = resolve_solver(cfg.solver, solver_overrides)
        shape = tuple(DATASET_INFO[cfg.dataset.name]["shape"])
        if "input_size" in cfg.model:  # a DiT fixes its own input size (smoke presets)
            shape = (cfg.model.get("in_channels", shape[0]), cfg.model.input_size, cfg.model.input_size)
        name = cfg.experiment
    calls = []
    forward = sampler.model.forward
    sampler.model.forward = lambda x, *a, **k: (calls.append(x.shape[0]), forward(x, *a, **k))[1]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generate(
        sampler, solver, shape, min(options.batch, options.num_samples), device=device, batch_size=options.batch
    )  # warm-up: allocator pools, kernels, lazy init
    sync()
    calls.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(options.repeats):
        generate(sampler, solver, shape, options.num_samples, device=device, batch_size=options.batch)
    sync()
    seconds = (time.perf_counter() - start) / options.repeats
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / options.repeats
    result = {
        "experiment": name,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "parameters": sum(p.numel() for p in sampler.model.parameters()),
        "solver": f"{solver.method} x{solver.num_steps}, guidance {solver.guidance_scale}",
        "num_samples": options.num_samples,
        "batch": options.batch,
        "seconds": seconds,
        "images_per_s": options.num_samples / seconds,
        "nfe_per_s": len(calls) / options.repeats / seconds,
        "rows_per_s": sum(calls) / options.repeats / seconds,
        "minor_page_faults": faults,
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    run_main(lambda argv: (main(argv), 0)[1])
