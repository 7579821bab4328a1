"""Reflow pairs: N (noise, sample, label) triples of a teacher's ODE, for `training.coupling.name=pairs`.

    python scripts/generate_pairs.py checkpoint=runs/moons out=runs/pairs/moons_rf1 num_pairs=100000
    torchrun --nproc_per_node=8 scripts/generate_pairs.py checkpoint=runs/c10 out=DIR num_pairs=1000000 \\
        solver=heun num_steps=64 guidance_scale=1

Rectified flow (Liu et al. 2022, arXiv 2209.03003, alg. 1): sample X0 ~ N(0, I), solve the teacher's ODE
to X1 = ODE[v](X0), then train a new flow on the coupling (X0, X1); its paths are straighter, so few Euler
steps suffice. Repeat on the student's pairs for 2-, 3-rectified flows.

Pair i has label i mod K (class-balanced; -1 for an unconditional teacher) and its noise is row
i - c * chunk_size of a draw seeded by (seed, c) for its chunk c. A chunk is the unit of work: rank r of
W solves chunks r, r + W, ... in batches of `batch_size` starting at the chunk's first row, so any
number of ranks writes the same bytes. Each chunk is written atomically; a killed run re-run with the
same command solves only the missing chunks. out/settings.json fixes the settings at the first run (a
directory holding other settings is refused); out/manifest.json (settings + every chunk's sha256) is
written last and marks the directory complete.

Guidance: with guidance_scale != 1 the samples are those of the guided field, so a student trained on
them learns the guided field itself; sample it with guidance_scale=1.
"""

import math
import time
from pathlib import Path

import torch

import checkpoint as ckpt
import couplings
from build import load_run
from config import PairsConfig, load_tool_config, solver_overrides, to_plain, validate_pairs
from run_dir import Run
from runtime import EXIT_OK, EXIT_PREEMPTED, derive_seed, device_runtime, run_main
from sampling import NonFiniteSamplesError, sample_kwargs


def chunk_inputs(chunk: int, rows: range, seed: int, shape, num_classes):
    """The noise [n, *shape] and labels [n] (-1: unconditional) of pair rows `rows` of chunk `chunk`."""
    noise = torch.randn((len(rows), *shape), generator=torch.Generator().manual_seed(derive_seed(seed, chunk, 0xF10)))
    labels = torch.tensor([i % num_classes for i in rows]) if num_classes else torch.full((len(rows),), -1)
    return noise, labels


class PairGeneration:
    def __init__(self, cfg, runtime):
        self.cfg, self.runtime = cfg, runtime
        self.out = Path(cfg.out)
        self.run = load_run(cfg.checkpoint, runtime.device, use_ema=cfg.use_ema, solver_overrides=solver_overrides(cfg))
        self.batch_size = cfg.batch_size or (128 if runtime.device.type == "cpu" else 1024)
        self.num_chunks = math.ceil(cfg.num_pairs / cfg.chunk_size)

    def settings(self) -> dict:
        run, cfg = self.run, self.cfg
        return {
            "teacher": {
                "checkpoint": str(run.checkpoint.path),
                "step": run.checkpoint.step,
                "use_ema": cfg.use_ema,
                "manifest_sha256": ckpt.sha256_file(run.checkpoint.path / "manifest.json"),
                "experiment": run.config.get("experiment"),
            },
            "solver": to_plain(run.solver),
            "guidance_scale": run.solver.guidance_scale,
            "seed": cfg.seed,
            "num_pairs": cfg.num_pairs,
            "chunk_size": cfg.chunk_size,
            "batch_size": self.batch_size,
            "dataset": run.config.dataset.name,
            "sample_shape": list(run.sample_shape),
            "num_classes": run.sampler.num_classes,
            "labels": "pair i: i mod num_classes (-1 for an unconditional teacher)",
            "noise": "chunk c: torch.randn([rows, *sample_shape]) from a CPU generator seeded by "
            "derive_seed(seed, c, 0xF10)",
        }

    @torch.no_grad()
    def solve_chunk(self, chunk: int) -> None:
        cfg, run, device = self.cfg, self.run, self.runtime.device
        rows = range(chunk * cfg.chunk_size, min((chunk + 1) * cfg.chunk_size, cfg.num_pairs))
        noise, labels = chunk_inputs(chunk, rows, cfg.seed, run.sample_shape, run.sampler.num_classes)
        samples = []
        for b in range(0, len(rows), self.batch_size):
            x0 = noise[b : b + self.batch_size].to(device)
            y = labels[b : b + self.batch_size].to(device) if run.sampler.num_classes else None
            x1 = run.sampler.sample(x0, y, **sample_kwargs(run.solver)).x
            if not bool(torch.isfinite(x1).all()):
                raise NonFiniteSamplesError(
                    f"pairs {rows[b]}.. of chunk {chunk} are NaN/inf with solver "
                    f"{run.solver.method} x{run.solver.num_steps}, guidance_scale="
                    f"{run.solver.guidance_scale}; nothing was written for that chunk"
                )
            samples.append(x1.float().cpu())
        couplings.write_chunk(self.out, chunk, noise, torch.cat(samples), labels)

    def run_all(self) -> int:
        with Run(self.out, self.runtime, key="out") as run:
            settings = self.settings()
            run.claim(self.out / "settings.json", settings, "pairs", write=couplings.write_json)
            if (self.out / "manifest.json").is_file():
                run.log.print(f"{self.out} is complete ({self.cfg.num_pairs} pairs); nothing to do")
                return EXIT_OK
            mine = run.my_chunks(self.num_chunks)
            todo = [c for c in mine if not couplings.chunk_path(self.out, c).is_file()]
            started = time.perf_counter()
            bar = run.log.progress(len(mine), len(mine) - len(todo), None, f"pairs x{self.runtime.world_size}", "chunk")
            for chunk in todo:
                if run.stop.requested:  # each rank stops at its own chunk boundary: finished chunks are kept
                    run.log.print(f"SIGTERM: stopping before chunk {chunk}; exiting with code {EXIT_PREEMPTED}")
                    return EXIT_PREEMPTED
                self.solve_chunk(chunk)
                bar.update(1)
            bar.close()
            run.require_chunks(
                self.num_chunks, lambda c: couplings.chunk_path(self.out, c).is_file(), self.out / "chunks"
            )
            if self.runtime.is_main:
                with run.final_phase():
                    couplings.write_manifest(self.out, settings, self.num_chunks)
                teacher, solver = self.run.checkpoint, self.run.solver
                print(
                    f"{self.cfg.num_pairs} pairs from {teacher.path} (step {teacher.step}, {solver.method} "
                    f"x{solver.num_steps}, guidance {solver.guidance_scale}) -> {self.out} "
                    f"({time.perf_counter() - started:.1f} s this run)"
                )
        return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    cfg = load_tool_config(argv, __doc__, "pairs", PairsConfig, keys="key=value; configs/pairs/pairs.yaml")
    validate_pairs(cfg)
    with device_runtime(cfg.device) as runtime:
        return PairGeneration(cfg, runtime).run_all()


if __name__ == "__main__":
    run_main(main)
