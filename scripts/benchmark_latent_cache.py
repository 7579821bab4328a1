"""Read throughput and process memory of the latent cache reader as the cache grows.

    uv run python scripts/benchmark_latent_cache.py --path /tmp/lc_bench --count 1048576 \\
        [--batch 256 --steps 300 --flip --cold --keep-mapped --advice auto|normal|random --delete]

Writes a synthetic cache (N(0, 1) float16 latents [count, 4, 32, 32] = 8 KiB each, uniform labels,
valid manifest; `build_latent_cache.write_synthetic_cache`, the same writer as `convert`) unless
PATH/train already holds one of that count, opens it with datasets.load_latent_cache as train.py
does, and draws `steps` batches the way the trainer does (slices of the epoch permutation, a
seeded generator per batch for the flip coins). Prints one JSON line: batches/s, images/s and
the process's memory from /proc/self/status before opening, after opening and after reading
(VmRSS = RssAnon (private) + RssFile (mapped file pages) + RssShmem), plus the largest VmRSS seen.

--cold drops the cache files from the OS page cache first (posix_fadvise DONTNEED), so reads come
from disk. --keep-mapped turns off the reader's unmapping of read pages after each batch (plain
np.memmap behaviour). --advice overrides the reader's choice between the kernel's read-around
(normal) and 4 KiB page faults (MADV_RANDOM), which it makes from cache size vs MemAvailable.
"""

import argparse
import json
import mmap
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from latent_cache import load_latent_cache, write_synthetic_cache  # noqa: E402
from runtime import derive_seed, epoch_permutation  # noqa: E402


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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", required=True, help="cache root; the split is PATH/train")
    parser.add_argument("--count", type=int, required=True, help="latents in the cache (8 KiB each)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--flip", action="store_true", help="write and serve the flip twin (2x the bytes)")
    parser.add_argument("--cold", action="store_true", help="drop the cache files from the page cache first")
    parser.add_argument("--keep-mapped", action="store_true", help="never unmap read pages (release_pages)")
    parser.add_argument("--advice", default="auto", choices=("auto", "normal", "random"), help="madvise on the maps")
    parser.add_argument("--delete", action="store_true", help="remove PATH afterwards")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    split = Path(args.path) / "train"
    manifest_path = split / "manifest.json"
    if not (manifest_path.is_file() and json.loads(manifest_path.read_text())["count"] == args.count
            and (json.loads(manifest_path.read_text())["flip"] == "twin") == args.flip):
        started = time.perf_counter()
        write_synthetic_cache(split, args.count, flip=args.flip)
        print(f"wrote {split} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    files = sorted(split.glob("*.npy"))
    if args.cold:
        for path in files:
            drop_from_page_cache(path)

    before_open = memory_mib()
    data = load_latent_cache(path=args.path, split="train", vae="synthetic", flip=args.flip)
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
        x, y = data.batch(permutation[position: position + args.batch], generator)
        peak = max(peak, memory_mib()["VmRSS"])
    seconds = time.perf_counter() - started
    after = memory_mib()
    result = {
        "cache_gib": round(sum(p.stat().st_size for p in files) / 2**30, 3), "count": args.count, "flip": args.flip,
        "cold": args.cold, "unmap_pages": not args.keep_mapped,
        "madvise": ("random" if data.random_access else "normal") + (" (auto)" if args.advice == "auto" else ""),
        "batch": args.batch, "steps": args.steps, "batches_per_s": round(args.steps / seconds, 1),
        "images_per_s": round(args.steps * args.batch / seconds), "read_mib": round(args.steps * args.batch * 8 / 1024, 1),
        "mib_before_open": {k: round(v, 1) for k, v in before_open.items()},
        "mib_after_open": {k: round(v, 1) for k, v in after_open.items()},
        "mib_after_reading": {k: round(v, 1) for k, v in after.items()},
        "peak_vmrss_mib": round(peak, 1), "vmrss_growth_mib": round(after["VmRSS"] - after_open["VmRSS"], 1),
    }
    print(json.dumps(result))
    if args.delete:
        del data
        shutil.rmtree(args.path)
    return result


if __name__ == "__main__":
    main()
