"""Sample N images from a class-conditional checkpoint (pixel or latent) and score them with Inception
FID / IS / precision-recall: the number the field compares.

    torchrun --nproc_per_node=8 eval_imagenet.py checkpoint=runs/h1024_unmasked out=runs/eval/h1024 \\
        num_samples=50000 reference=VIRTUAL_imagenet256_labeled.npz solver=heun num_steps=32 guidance_scale=1.5
    python eval_imagenet.py checkpoint=runs/c10 out=runs/eval/c10 num_samples=50000 reference=cifar10_train.npz

Sample i depends only on (checkpoint, sampler settings, seed, i): its label is i mod K (class-balanced
over the K classes) and its noise comes from a generator seeded by (seed, i). The index space is cut
into fixed chunks of `chunk_size`; rank r samples chunks r, r + world, ..., each in batches of
`batch_size` starting at the chunk's first index, so 1, 2 or 8 ranks write bitwise-identical images at
the same batch size (the models are batch-independent, the expert-choice MoE included), and another
batch size gives the same images up to float rounding.

Crash safety: every chunk is one shard file written atomically (out/shards/chunk_*.npz); a killed job
re-run with the same command samples only the missing chunks. out/eval.json records the settings and
their hash (checkpoint manifest sha256 + sampler settings + seed, sizes): a directory holding samples of
another checkpoint or other settings is refused. When every chunk exists, rank 0 writes out/samples.npz
in the ADM format (`arr_0` uint8 N x H x W x 3, `arr_1` labels int64; a fixed zip timestamp, so reruns
give the same bytes) and, with a reference, out/metrics.json with every metric and the full protocol.
"""

import hashlib
import json
import math
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

import checkpoint as ckpt
from build import build_evaluator, latent_vae_id, load_run
from config import ConfigError, EvalConfig, load_tool_config, solver_overrides, to_plain, validate_eval
from datasets import model_space_to_uint8
from ode_solvers import CountCalls
from run_dir import Run, refuse_inside_run
from runtime import EXIT_OK, EXIT_PREEMPTED, Progress, RunError, derive_seed, device_runtime, run_main
from sampling import NonFiniteSamplesError, sample_kwargs

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # samples.npz members carry this timestamp: identical runs, identical bytes


def sample_inputs(indices: range, seed: int, shape: tuple[int, ...], num_classes: int | None):
    """Sample indices -> (noise [n, *shape] float32, labels [n] or None), each row from (seed, i) alone."""
    noise = torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, i))) for i in indices]
    )
    labels = None if num_classes is None else torch.tensor([i % num_classes for i in indices])
    return noise, labels


def to_uint8_rgb(images: torch.Tensor) -> np.ndarray:
    """[n, C, H, W] in [-1, 1] -> uint8 [n, H, W, 3] (grayscale repeated: evaluators expect RGB)."""
    array = model_space_to_uint8(images.cpu()).permute(0, 2, 3, 1).numpy()
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


class Evaluation:
    def __init__(self, cfg, runtime):
        self.cfg, self.runtime = cfg, runtime
        self.out = Path(cfg.out)
        device = runtime.device
        self.run = load_run(cfg.checkpoint, device, use_ema=cfg.use_ema, solver_overrides=solver_overrides(cfg))
        self.sampler, self.solver = self.run.sampler, self.run.solver
        if len(self.run.sample_shape) != 3:
            raise ConfigError(
                f"checkpoint {self.run.checkpoint.path} models {self.run.config.dataset.name!r} samples of shape "
                f"{list(self.run.sample_shape)}; eval_imagenet.py scores images [C, H, W] (inference.py samples "
                f"2-D data)"
            )
        if self.sampler.num_classes is None:
            raise RunError(
                f"checkpoint {self.run.checkpoint.path} is unconditional; eval_imagenet.py samples "
                f"class-balanced labels and needs a class-conditional model"
            )
        # the decoder and the Inception reference, loaded before any sampling: a wrong path fails now
        reference = cfg.reference if cfg.metrics else None
        self.evaluator = build_evaluator(
            self.run.config.dataset,
            device,
            sample_shape=self.run.sample_shape,
            fid_reference=reference,
            inception_weights=cfg.inception_weights,
        )
        self.decode = self.evaluator.decode
        self.batch_size = cfg.batch_size or (250 if device.type == "cuda" else 50)
        self.num_chunks = math.ceil(cfg.num_samples / cfg.chunk_size)
        self.forwards = CountCalls(self.sampler.model)  # the model's forward passes (a guided step is one)
        self.sampler.model = self.forwards

    # -- settings and the output directory --

    def settings(self) -> dict:
        manifest = self.run.checkpoint.path / "manifest.json"
        return {
            "checkpoint": str(self.run.checkpoint.path),
            "checkpoint_step": self.run.checkpoint.step,
            "checkpoint_manifest_sha256": ckpt.sha256_file(manifest),
            "use_ema": self.cfg.use_ema,
            "solver": to_plain(self.solver),
            "seed": self.cfg.seed,
            "num_samples": self.cfg.num_samples,
            "chunk_size": self.cfg.chunk_size,
            "batch_size": self.batch_size,
            "labels": f"class-balanced: sample i has label i mod {self.sampler.num_classes}",
            "noise": "sample i: torch.randn from a CPU generator seeded by derive_seed(seed, i)",
            "sample_shape": list(self.run.sample_shape),
            "decoded_with": latent_vae_id(self.run.config.dataset),
        }

    def complete(self, chunk: int) -> bool:
        return ckpt.shard_problem(self.chunk_path(chunk)) is None

    def chunk_path(self, chunk: int) -> Path:
        return self.out / "shards" / f"chunk_{chunk:06d}.npz"

    # -- sampling --

    @torch.no_grad()
    def sample_chunk(self, chunk: int) -> None:
        cfg, so = self.cfg, self.solver
        start, stop = chunk * cfg.chunk_size, min((chunk + 1) * cfg.chunk_size, cfg.num_samples)
        images, labels = [], []
        for b in range(start, stop, self.batch_size):
            indices = range(b, min(b + self.batch_size, stop))
            noise, y = sample_inputs(indices, cfg.seed, self.run.sample_shape, self.sampler.num_classes)
            device = self.runtime.device
            x = self.sampler.sample(noise.to(device), y.to(device), **sample_kwargs(so)).x
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteSamplesError(
                    f"samples {b}..{indices[-1]} are NaN/inf with solver {so.method} "
                    f"x{so.num_steps}, guidance_scale={so.guidance_scale}; nothing was written "
                    f"for chunk {chunk}"
                )
            if self.decode is not None:
                x = self.decode(x)
            images.append(to_uint8_rgb(x))
            labels.append(y.numpy().astype(np.int64))
        with ckpt.atomic_write(self.chunk_path(chunk)) as tmp, open(tmp, "wb") as f:  # a shard exists only complete
            np.savez(f, images=np.concatenate(images), labels=np.concatenate(labels))
        ckpt.record_digest(self.chunk_path(chunk))  # verified on resume: a damaged chunk is redone

    # -- outputs --

    def write_samples_npz(self) -> Path:
        """Concatenate the shards into out/samples.npz (ADM layout), streamed: never all images in RAM."""
        first = np.load(self.chunk_path(0))
        height, width, channels = first["images"].shape[1:]
        n = self.cfg.num_samples
        path = self.out / "samples.npz"
        with (
            ckpt.atomic_write(path) as tmp,
            zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
        ):
            for name, dtype, shape, key in (
                ("arr_0.npy", np.uint8, (n, height, width, channels), "images"),
                ("arr_1.npy", np.int64, (n,), "labels"),
            ):
                with archive.open(zipfile.ZipInfo(name, date_time=ZIP_DATE), "w", force_zip64=True) as member:
                    np.lib.format.write_array_header_2_0(
                        member,
                        {
                            "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                            "fortran_order": False,
                            "shape": shape,
                        },
                    )
                    for chunk in range(self.num_chunks):
                        with np.load(self.chunk_path(chunk)) as shard:
                            member.write(np.ascontiguousarray(shard[key], dtype=dtype).tobytes())
        return path

    def iter_images(self, batch: int = 500, progress=None):
        """uint8 [n, 3, H, W] torch batches of every sample, in index order (for the metrics)."""
        for chunk in range(self.num_chunks):
            with np.load(self.chunk_path(chunk)) as shard:
                images = torch.from_numpy(shard["images"]).permute(0, 3, 1, 2).contiguous()
            for part in images.split(batch):
                yield part
                if progress is not None:
                    progress(len(part))

    def score(self, settings: dict, seconds: float) -> dict:
        import inception

        extractor, reference = self.evaluator.inception_reference
        # Features chunk by chunk: 50k images at 256 px (9.8 GB) never sit in memory at once. A bar on a
        # terminal, a line every runtime.PROGRESS_LINE_EVERY_S seconds in a log.
        with Progress(self.cfg.num_samples, "inception features", "img") as bar:
            values = self.evaluator.inception(batch for batch in self.iter_images(progress=bar.update))
        protocol = {
            **settings,
            "reference": str(self.cfg.reference),
            "reference_count": reference.count,
            "extractor": f"torch-fidelity {inception.INCEPTION_EXTRACTOR} (the TF-2015 Inception graph)",
            "extractor_sha256": extractor.weights_sha256,
            "world_size": self.runtime.world_size,
            "nfe_per_sample_rank0": self.forwards_per_sample(),
            "sampling_seconds": seconds,
        }
        result = {"metrics": values, "protocol": protocol}
        ckpt.atomic_write_text(self.out / "metrics.json", json.dumps(result, indent=2, default=str))
        return values

    def forwards_per_sample(self) -> float | None:
        """Model forwards per batch on this rank (a guided step is one forward of 2B rows)."""
        batches = sum(
            math.ceil(min(self.cfg.chunk_size, self.cfg.num_samples - c * self.cfg.chunk_size) / self.batch_size)
            for c in range(self.runtime.rank, self.num_chunks, self.runtime.world_size)
        )
        return self.forwards.calls / batches if batches and self.forwards.calls else None

    def run_all(self) -> int:

        with Run(self.out, self.runtime, key="out") as run:
            settings = self.settings()
            digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
            run.claim(
                self.out / "eval.json",
                settings,
                "samples",
                write=lambda path, s: ckpt.atomic_write_text(
                    path, json.dumps({"settings": s, "settings_sha256": digest}, indent=2)
                ),
                recorded=lambda saved: saved.get("settings", {}),
            )
            (self.out / "shards").mkdir(parents=True, exist_ok=True)
            size, n = self.cfg.chunk_size, self.cfg.num_samples
            # a chunk is done when it matches its recorded size and sha256; a damaged one is moved aside
            todo = [c for c in run.my_chunks(self.num_chunks) if not ckpt.shard_done(self.chunk_path(c), run.log.warn)]
            done = sum(min(size, n - c * size) for c in range(self.num_chunks) if self.chunk_path(c).is_file())
            started = time.perf_counter()
            # Rank 0's bar counts every rank's work by assuming the others keep its pace (images/s, ETA).
            bar = run.log.progress(n, done, None, f"sampling x{self.runtime.world_size}", unit="img")
            for chunk in todo:
                if run.stop.requested:  # each rank stops at its own chunk boundary: finished chunks are kept
                    run.log.print(f"SIGTERM: stopping before chunk {chunk}; exiting with code {EXIT_PREEMPTED}")
                    return EXIT_PREEMPTED
                self.sample_chunk(chunk)
                bar.update(min(size, n - chunk * size) * self.runtime.world_size)
            bar.close()
            run.require_chunks(self.num_chunks, self.complete, self.out / "shards")
            seconds = time.perf_counter() - started
            if not self.runtime.is_main:
                return EXIT_OK
            with run.final_phase():
                path = self.write_samples_npz()
                print(f"{n} samples -> {path} ({seconds:.1f} s sampling this run)")
                if self.cfg.metrics and self.cfg.reference:
                    values = self.score(settings, seconds)
                    print(" ".join(f"{k}={v:.4f}" for k, v in values.items()))
        return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    cfg = load_tool_config(argv, __doc__, "eval", EvalConfig)
    validate_eval(cfg)
    refuse_inside_run(cfg.out)
    with device_runtime(cfg.device) as runtime:
        return Evaluation(cfg, runtime).run_all()


if __name__ == "__main__":
    run_main(main)
