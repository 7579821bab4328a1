"""Build an SD-VAE latent cache from an image folder: `build` shards, then `convert` them.

    # every rank/machine builds shards i with i % world == rank; rerun to resume (finished shards are skipped)
    uv run python scripts/build_latent_cache.py build images=/data/imagenet/train \\
        out=cache/imagenet256/train vae=sd_vae_ft_ema flip=true vae_dtype=float16 \\
        [rank=R world=W shard_size=1024 chunk_size=64 workers=8 max_shards=K]
    # or one process per GPU on a node (RANK / WORLD_SIZE / LOCAL_RANK from torchrun; no process group)
    uv run torchrun --nproc_per_node=8 scripts/build_latent_cache.py build images=... out=... flip=true
    # once, after all shards exist: latents.npy (+ latents_flip.npy), labels.npy, manifest.json
    uv run python scripts/build_latent_cache.py convert out=cache/imagenet256/train [delete_shards=true]
    # tiny end-to-end data for the *_smoke presets: OUT/images (PNGs), OUT/vae (tiny AutoencoderKL), OUT/cache/train
    uv run python scripts/build_latent_cache.py smoke out=runs/smoke
    # a random cache of the real layout (benchmarks; no VAE, no images)
    uv run python scripts/build_latent_cache.py synthetic out=/tmp/fake/train count=100000

The first argument is the command; the rest are its key=value arguments (`--help` lists them).
Images get ADM's centre crop to image_size (default 256); latents are the posterior mean
(deterministic), scaled by the VAE config's scaling/shift factors (see vae.py), stored as dtype.
Offline: pass vae= a local directory (`hf download stabilityai/sd-vae-ft-ema --local-dir DIR`)
and vae_id=sd_vae_ft_ema so the cache records which VAE it is bound to.

Layout of one split directory (the writer is latent_cache.py, the reader latent_cache.LatentCacheDataset):
  build.json               build settings; the first build run writes it, later runs and ranks must agree
  shards/shard_XXXXX.npz   latents [n, C, h, w], optional latents_flip, labels [n] int64, start
  latents.npy, latents_flip.npy, labels.npy, manifest.json   written by `convert`, manifest last
Shard i holds images [i * shard_size, (i + 1) * shard_size) of the sorted file list.
"""

import os
import sys
from dataclasses import dataclass

from cli import exit_on_help, parse_keys, pick
from config import ConfigError, check, check_choice
from latent_cache import LATENT_DTYPES
from latent_cache_writer import build_shards, convert_shards, shard_path, write_synthetic_cache
from runtime import run_main
from smoke_data import make_smoke_cache


@dataclass
class BuildKeys:
    images: str | None = None  # required: image folder, one sub-folder per class
    out: str | None = None  # required: cache directory of this split, e.g. cache/imagenet256/train
    split: str | None = None  # split name recorded in the manifest (null: out's name)
    vae: str = "sd_vae_ft_ema"  # preset, hub id or local directory to load
    vae_id: str | None = None  # id recorded in the cache (null: vae resolved)
    vae_subfolder: str | None = None
    image_size: int = 256
    shard_size: int = 1024  # images per shard file
    chunk_size: int = 32  # images per VAE forward pass
    flip: bool = False  # also store the horizontally flipped image's latents
    dtype: str = "float16"  # stored latent dtype
    vae_dtype: str = "float32"  # float32 | float16 | bfloat16
    device: str = "auto"  # auto (cuda:LOCAL_RANK if CUDA, else cpu) | cpu | cuda:N | mps
    rank: int | None = None  # null: $RANK or 0
    world: int | None = None  # null: $WORLD_SIZE or 1
    max_shards: int | None = None  # stop after writing this many shards
    workers: int = 4  # image decoding threads (0: in the main thread)
    local_files_only: bool = False  # never contact the hub


@dataclass
class ConvertKeys:
    out: str | None = None  # required: the split directory holding shards/
    delete_shards: bool = False


@dataclass
class SmokeKeys:
    out: str | None = None  # required: writes OUT/images, OUT/vae, OUT/cache/train
    num_classes: int = 2
    images_per_class: int = 4
    image_size: int = 64
    flip: bool = True


@dataclass
class SyntheticKeys:
    out: str | None = None  # required: the split directory to write
    count: int | None = None  # required: latents in the cache
    num_classes: int = 1000
    dtype: str = "float16"
    flip: bool = False


COMMANDS = {
    "build": (BuildKeys, "encode this rank's missing shards"),
    "convert": (ConvertKeys, "concatenate shards into memory-mapped arrays + manifest.json"),
    "smoke": (SmokeKeys, "random PNGs + tiny VAE + their cache (make_smoke_cache), for *_smoke presets"),
    "synthetic": (SyntheticKeys, "a random cache of the real layout (benchmarks)"),
}


def parse(argv: list[str]) -> tuple[str, object]:
    """`COMMAND key=value ...` -> (command, its keys, typed and checked)."""
    if not argv or argv[0] not in COMMANDS:
        exit_on_help(argv, __doc__, *((f"{name} keys ({text})", schema) for name, (schema, text) in COMMANDS.items()))
        given = argv[0] if argv else None
        raise ConfigError(f"command = {given!r} is not allowed; the first argument is one of: {', '.join(COMMANDS)}")
    command, (schema, text) = argv[0], COMMANDS[argv[0]]
    args = parse_keys(argv[1:], schema, f"{command}: {text}")
    check(bool(args.out), "out", args.out, "is required: the cache directory, e.g. out=cache/imagenet256/train")
    if command == "build":
        check(bool(args.images), "images", args.images, "is required: the image folder, one sub-folder per class")
        check_choice("dtype", args.dtype, LATENT_DTYPES)
        check_choice("vae_dtype", args.vae_dtype, ("float32", "float16", "bfloat16"))
        args.rank = int(os.environ.get("RANK", 0)) if args.rank is None else args.rank
        args.world = int(os.environ.get("WORLD_SIZE", 1)) if args.world is None else args.world
        check(args.world >= 1, "world", args.world, "must be >= 1")
        check(0 <= args.rank < args.world, "rank", args.rank, f"must be in [0, world = {args.world})")
        for key in ("image_size", "shard_size", "chunk_size"):
            check(getattr(args, key) >= 1, key, getattr(args, key), "must be >= 1")
    if command == "synthetic":
        check(
            args.count is not None and args.count >= 1, "count", args.count, "is required: latents in the cache, >= 1"
        )
        check_choice("dtype", args.dtype, LATENT_DTYPES)
    return command, args


def main(argv: list[str] | None = None) -> int:
    command, args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if command == "convert":
            manifest = convert_shards(args.out, delete_shards=args.delete_shards)
            print(f"converted {manifest['count']} latents {manifest['latent_shape']} {manifest['dtype']} -> {args.out}")
            return 0
        if command == "smoke":
            made = make_smoke_cache(args.out, args.num_classes, args.images_per_class, args.image_size, flip=args.flip)
            print(
                f"smoke cache: dataset.path={made['path']} dataset.split={made['split']} dataset.vae={made['vae']} "
                f"(images: {made['images']})"
            )
            return 0
        if command == "synthetic":
            manifest = write_synthetic_cache(args.out, args.count, args.num_classes, dtype=args.dtype, flip=args.flip)
            size = sum(f["bytes"] for f in manifest["files"].values())
            print(f"wrote {manifest['count']} synthetic latents ({size / 2**30:.2f} GiB) -> {args.out}")
            return 0
        import torch

        from vae import SDVAE

        device = args.device
        if device == "auto":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        codec = SDVAE(
            args.vae,
            device=device,
            dtype=args.vae_dtype,
            chunk_size=args.chunk_size,
            vae_id=args.vae_id,
            subfolder=args.vae_subfolder,
            local_files_only=args.local_files_only,
        )
        shard_keys = ("image_size", "shard_size", "flip", "dtype", "rank", "world", "max_shards", "workers", "split")
        result = build_shards(
            args.images, args.out, codec, **pick(args, *shard_keys), log=lambda *_: None, progress=True
        )
    except (FileNotFoundError, ValueError) as e:  # LatentCacheError / VAENotFoundError are FileNotFoundErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    mine = range(args.rank, result["num_shards"], args.world)
    left = [i for i in mine if not shard_path(args.out, i).is_file()]
    print(
        f"rank {args.rank}/{args.world}: wrote {len(result['written'])} shards, skipped {len(result['skipped'])} "
        f"finished, {len(left)} left of {len(mine)}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
