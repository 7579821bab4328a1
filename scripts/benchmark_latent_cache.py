"""Read throughput and process memory of the latent cache reader as the cache grows.

    uv run python scripts/benchmark_latent_cache.py path=/tmp/lc_bench count=1048576 \\
        [batch=256 steps=300 flip=true cold=true keep_mapped=true advice=auto|normal|random delete=true]

Writes a synthetic cache (N(0, 1) float16 latents [count, 4, 32, 32] = 8 KiB each, uniform labels,
valid manifest; `latent_cache_writer.write_synthetic_cache`, the same writer as `convert`) unless
PATH/train already holds one of that count, opens it with latent_cache.load_latent_cache as train.py
does, and draws `steps` batches the way the trainer does (slices of the epoch permutation, a
seeded generator per batch for the flip coins). Prints one JSON line: batches/s, images/s and
the process's memory from /proc/self/status before opening, after opening and after reading
(VmRSS = RssAnon (private) + RssFile (mapped file pages) + RssShmem), plus the largest VmRSS seen.

cold=true drops the cache files from the OS page cache first (posix_fadvise DONTNEED), so reads come
from disk. keep_mapped=true turns off the reader's unmapping of read pages after each batch (plain
np.memmap behaviour). advice= overrides the reader's choice between the kernel's read-around
(normal) and 4 KiB page faults (MADV_RANDOM), which it makes from cache size vs MemAvailable.
"""

import json
import mmap
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import latent_cache
from cli import parse_keys
from config import check, check_choice
from latent_cache_writer import write_synthetic_cache
from runtime import derive_seed, epoch_permutation, run_main


def memory_mib() -> dict:
    """VmRSS and its parts (MiB) from /proc/self/status (Linux)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return fields


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@dataclass
class BenchCacheConfig:
    path: str | None = None  # required: cache root; the split is PATH/train
    count: int | None = None  # required: latents in the cache (8 KiB each)
    batch: int = 256
    steps: int = 300
    flip: bool = False  # write and serve the flip twin (2x the bytes)
    cold: bool = False  # drop the cache files from the page cache first
    keep_mapped: bool = False  # never unmap read pages (release_pages)
    advice: str = "auto"  # madvise on the maps: auto | normal | random
    delete: bool = False  # remove PATH afterwards


def main(argv: list[str] | None = None) -> dict:
    args = parse_keys(sys.argv[1:] if argv is None else argv, BenchCacheConfig, __doc__)
    check(bool(args.path), "path", args.path, "is required: the cache root, e.g. path=/tmp/lc_bench")
    check(args.count is not None and args.count >= 2, "count", args.count, "is required: latents in the cache, >= 2")
    check(1 <= args.batch <= args.count, "batch", args.batch, f"must be in [1, count = {args.count}]")
    check(args.steps >= 1, "steps", args.steps, "must be >= 1")
    check_choice("advice", args.advice, ("auto", "normal", "random"))
    torch.set_num_threads(1)

    split = Path(args.path) / "train"
    manifest_path = split / "manifest.json"
    if not (
        manifest_path.is_file()
        and json.loads(manifest_path.read_text())["count"] == args.count
        and (json.loads(manifest_path.read_text())["flip"] == "twin") == args.flip
    ):
        started = time.perf_counter()
        write_synthetic_cache(split, args.count, flip=args.flip)
        print(f"wrote {split} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    files = sorted(split.glob("*.npy"))
    if args.cold:
        for path in files:
            drop_from_page_cache(path)

    before_open = memory_mib()
    data = latent_cache.load_latent_cache(path=args.path, split="train", vae="synthetic", flip=args.flip)
    data.unmap_pages = not args.keep_mapped
    if args.advice != "auto":
        data.random_access = args.advice == "random"
        for array in (data.latents, data.latents_flip):
            data._advise(array, mmap.MADV_RANDOM if data.random_access else mmap.MADV_NORMAL)
    after_open = memory_mib()
    permutation = epoch_permutation(len(data), seed=0, epoch=0, device="cpu")
    generator = torch.Generator()
    peak = after_open["VmRSS"]
    started = time.perf_counter()
    for step in range(args.steps):
        position = step * args.batch % (len(data) - args.batch + 1)
        generator.manual_seed(derive_seed(0, step, 0))
        x, y = data.batch(permutation[position : position + args.batch], generator)
        peak = max(peak, memory_mib()["VmRSS"])
    seconds = time.perf_counter() - started
    after = memory_mib()
    result = {
        "cache_gib": round(sum(p.stat().st_size for p in files) / 2**30, 3),
        "count": args.count,
        "flip": args.flip,
        "cold": args.cold,
        "unmap_pages": not args.keep_mapped,
        "madvise": ("random" if data.random_access else "normal") + (" (auto)" if args.advice == "auto" else ""),
        "batch": args.batch,
        "steps": args.steps,
        "batches_per_s": round(args.steps / seconds, 1),
        "images_per_s": round(args.steps * args.batch / seconds),
        "read_mib": round(args.steps * args.batch * 8 / 1024, 1),
        "mib_before_open": {k: round(v, 1) for k, v in before_open.items()},
        "mib_after_open": {k: round(v, 1) for k, v in after_open.items()},
        "mib_after_reading": {k: round(v, 1) for k, v in after.items()},
        "peak_vmrss_mib": round(peak, 1),
        "vmrss_growth_mib": round(after["VmRSS"] - after_open["VmRSS"], 1),
    }
    print(json.dumps(result))
    if args.delete:
        del data
        shutil.rmtree(args.path)
    return result


if __name__ == "__main__":
    run_main(lambda argv: (main(argv), 0)[1])
