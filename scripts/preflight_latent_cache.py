"""Check a latent cache before spending GPU hours on it; exit 1 with one line per problem.

    uv run python scripts/preflight_latent_cache.py cache=cache/imagenet256/train \\
        [vae=sd_vae_ft_ema] [scaling_factor=0.18215] [quick=true]

Checks file sizes, shapes and dtypes against manifest.json, labels in [0, num_classes), the VAE
binding (if vae / scaling_factor given), and unless quick=true the O(size) scans: sha256 of every
file and finite latents. Prints a summary: count, shapes, size, VAE, classes, latent mean/std.
The training-time open (latent_cache.LatentCacheDataset) runs the same checks (the O(size) ones with
dataset.verify=true) and reports problems in the same words.
"""

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from checkpoint import shard_problem
from cli import parse_keys
from config import check
from latent_cache import LatentCacheError, check_latent_cache
from runtime import run_main


def sample_rows(path: Path, count: int) -> np.ndarray:
    """`count` evenly spaced rows of a .npy file, in its dtype, by plain reads: indexing the memory map
    instead maps a whole page-cache folio (up to 2 MiB) per row, gigabytes of RSS for a summary."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:]))
    rows = np.linspace(0, len(array) - 1, min(count, len(array))).astype(np.int64)
    with open(path, "rb") as f:
        data = b"".join(os.pread(f.fileno(), row_bytes, array.offset + int(i) * row_bytes) for i in rows)
    return np.frombuffer(data, dtype=array.dtype).reshape(len(rows), *array.shape[1:])


def summary(root: Path, manifest: dict, seconds: float, sample: int = 4096) -> str:
    labels = np.load(root / "labels.npy", allow_pickle=False)
    picked = sample_rows(root / "latents.npy", sample)  # scaled SD-VAE latents should have std near 1
    per_class = np.bincount(labels, minlength=manifest["num_classes"])
    size = sum(meta["bytes"] for meta in manifest["files"].values())
    return "\n".join(
        [
            f"latent cache {root}: OK (checked in {seconds:.1f} s)",
            f"  split {manifest.get('split')!r}, count {manifest['count']}, latents {manifest['latent_shape']} "
            f"{manifest['dtype']}, {size / 2**30:.3f} GiB in {', '.join(sorted(manifest['files']))}",
            f"  vae {manifest['vae_id']!r}, scaling_factor {manifest['vae_scaling_factor']}, shift_factor "
            f"{manifest.get('vae_shift_factor')}, sampling {manifest.get('latent_sampling')}",
            f"  images {manifest.get('image_size')}px ({manifest.get('crop')}), flip {manifest.get('flip')}",
            f"  {manifest['num_classes']} classes ({', '.join(manifest['class_names'][:3])}"
            f"{', ...' if manifest['num_classes'] > 3 else ''}), per class min {per_class.min()} max {per_class.max()}",
            f"  latent mean {picked.mean(dtype=np.float64):.4f}, std {picked.std(dtype=np.float64):.4f} "
            f"(over {len(picked)} evenly spaced samples)",
        ]
    )


@dataclass
class PreflightConfig:
    cache: str | None = None  # required: a converted cache split directory (holds manifest.json)
    vae: str | None = None  # preset, hub id or local directory the cache must be bound to
    scaling_factor: float | None = None  # the VAE scaling factor the run uses
    quick: bool = False  # skip the sha256 and finiteness scans


def main(argv: list[str] | None = None) -> int:
    args = parse_keys(sys.argv[1:] if argv is None else argv, PreflightConfig, __doc__)
    check(
        bool(args.cache),
        "cache",
        args.cache,
        "is required: the cache split directory, e.g. cache=cache/imagenet256/train",
    )
    root = Path(args.cache)
    started = time.perf_counter()
    # shards not yet converted (or kept): each against its recorded size and sha256, read-only
    shards = sorted((root / "shards").glob("shard_*.npz")) if (root / "shards").is_dir() else []
    damaged = [(path, problem) for path in shards if (problem := shard_problem(path))]
    for path, problem in damaged:
        print(f"problem: {path}: {problem}; `build` moves it aside and redoes it", file=sys.stderr)
    if damaged:
        print(f"latent cache {root}: {len(damaged)} damaged shard(s)", file=sys.stderr)
        return 1
    try:
        manifest, problems = check_latent_cache(root, args.vae, args.scaling_factor, full=not args.quick)
    except LatentCacheError as e:
        print(f"problem: {e}", file=sys.stderr)
        return 1
    if problems:
        for problem in problems:
            print(f"problem: {root}: {problem}", file=sys.stderr)
        print(f"latent cache {root}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(summary(root, manifest, time.perf_counter() - started))
    return 0


if __name__ == "__main__":
    run_main(main)
