"""Check a latent cache before spending GPU hours on it; exit 1 with one line per problem.

    uv run python scripts/preflight_latent_cache.py cache/imagenet256/train \\
        [--vae sd_vae_ft_ema] [--scaling-factor 0.18215] [--quick]

Checks file sizes, shapes and dtypes against manifest.json, labels in [0, num_classes), the VAE
binding (if --vae / --scaling-factor given), and unless --quick the O(size) scans: sha256 of every
file and finite latents. Prints a summary: count, shapes, size, VAE, classes, latent mean/std.
The training-time open (datasets.LatentCacheDataset) runs the same checks (the O(size) ones with
dataset.verify=true) and reports problems in the same words.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from latent_cache import LatentCacheError, check_latent_cache  # noqa: E402


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
    return "\n".join([
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
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", help="a converted cache split directory (holds manifest.json)")
    parser.add_argument("--vae", default=None, help="preset, hub id or local directory the cache must be bound to")
    parser.add_argument("--scaling-factor", type=float, default=None, help="the VAE scaling factor the run uses")
    parser.add_argument("--quick", action="store_true", help="skip the sha256 and finiteness scans")
    args = parser.parse_args(argv)
    root = Path(args.cache)
    started = time.perf_counter()
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
    sys.exit(main())
