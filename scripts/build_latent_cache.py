"""Build an SD-VAE latent cache from an image folder: `build` shards, then `convert` them.

    # every rank/machine builds shards i with i % world == rank; rerun to resume (finished shards are skipped)
    uv run python scripts/build_latent_cache.py build --images /data/imagenet/train \\
        --out cache/imagenet256/train --vae sd_vae_ft_ema --flip --vae-dtype float16 \\
        [--rank R --world W --shard-size 1024 --chunk-size 64 --workers 8 --max-shards K]
    # or one process per GPU on a node (RANK / WORLD_SIZE / LOCAL_RANK from torchrun; no process group)
    uv run torchrun --nproc_per_node=8 scripts/build_latent_cache.py build --images ... --out ... --flip
    # once, after all shards exist: latents.npy (+ latents_flip.npy), labels.npy, manifest.json
    uv run python scripts/build_latent_cache.py convert --out cache/imagenet256/train [--delete-shards]
    # tiny end-to-end data for the *_smoke presets: OUT/images (PNGs), OUT/vae (tiny AutoencoderKL), OUT/cache/train
    uv run python scripts/build_latent_cache.py smoke --out runs/smoke
    # a random cache of the real layout (benchmarks; no VAE, no images)
    uv run python scripts/build_latent_cache.py synthetic --out /tmp/fake/train --count 100000

Images get ADM's centre crop to --image-size (default 256); latents are the posterior mean
(deterministic), scaled by the VAE config's scaling/shift factors (see vae.py), stored as --dtype.
Offline: pass --vae a local directory (`hf download stabilityai/sd-vae-ft-ema --local-dir DIR`)
and --vae-id sd_vae_ft_ema so the cache records which VAE it is bound to.

Layout of one split directory (the writer is latent_cache.py, the reader datasets.LatentCacheDataset):
  build.json               build settings; the first build run writes it, later runs and ranks must agree
  shards/shard_XXXXX.npz   latents [n, C, h, w], optional latents_flip, labels [n] int64, start
  latents.npy, latents_flip.npy, labels.npy, manifest.json   written by `convert`, manifest last
Shard i holds images [i * shard_size, (i + 1) * shard_size) of the sorted file list.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latent_cache import (  # noqa: E402
    LATENT_DTYPES,
    build_shards,
    convert_shards,
    shard_path,
    write_synthetic_cache,
)
from smoke_data import make_smoke_cache  # noqa: E402


def parse(argv):
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="encode this rank's missing shards")
    build.add_argument("--images", required=True, help="image folder: one sub-folder per class")
    build.add_argument("--out", required=True, help="cache directory of this split, e.g. cache/imagenet256/train")
    build.add_argument("--split", default=None, help="split name recorded in the manifest (default: --out's name)")
    build.add_argument("--vae", default="sd_vae_ft_ema", help="preset, hub id or local directory to load")
    build.add_argument("--vae-id", default=None, help="id recorded in the cache (default: --vae resolved)")
    build.add_argument("--vae-subfolder", default=None)
    build.add_argument("--image-size", type=int, default=256)
    build.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    build.add_argument("--chunk-size", type=int, default=32, help="images per VAE forward pass")
    build.add_argument("--flip", action="store_true", help="also store the horizontally flipped image's latents")
    build.add_argument("--dtype", default="float16", choices=LATENT_DTYPES, help="stored latent dtype")
    build.add_argument("--vae-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    build.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if CUDA, else cpu)|cpu|cuda:N|mps")
    build.add_argument("--rank", type=int, default=int(env.get("RANK", 0)), help="default: $RANK or 0")
    build.add_argument("--world", type=int, default=int(env.get("WORLD_SIZE", 1)), help="default: $WORLD_SIZE or 1")
    build.add_argument("--max-shards", type=int, default=None, help="stop after writing this many shards")
    build.add_argument("--workers", type=int, default=4, help="image decoding threads (0: in the main thread)")
    build.add_argument("--local-files-only", action="store_true", help="never contact the hub")
    convert = sub.add_parser("convert", help="concatenate shards into memory-mapped arrays + manifest.json")
    convert.add_argument("--out", required=True)
    convert.add_argument("--delete-shards", action="store_true")
    smoke = sub.add_parser("smoke", help="random PNGs + tiny VAE + their cache (make_smoke_cache), for *_smoke presets")
    smoke.add_argument("--out", required=True, help="writes OUT/images, OUT/vae, OUT/cache/train")
    smoke.add_argument("--num-classes", type=int, default=2)
    smoke.add_argument("--images-per-class", type=int, default=4)
    smoke.add_argument("--image-size", type=int, default=64)
    smoke.add_argument("--no-flip", action="store_true")
    synthetic = sub.add_parser("synthetic", help="a random cache of the real layout (benchmarks)")
    synthetic.add_argument("--out", required=True)
    synthetic.add_argument("--count", type=int, required=True)
    synthetic.add_argument("--num-classes", type=int, default=1000)
    synthetic.add_argument("--dtype", default="float16", choices=LATENT_DTYPES)
    synthetic.add_argument("--flip", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        if args.command == "convert":
            manifest = convert_shards(args.out, delete_shards=args.delete_shards)
            print(f"converted {manifest['count']} latents {manifest['latent_shape']} {manifest['dtype']} -> {args.out}")
            return 0
        if args.command == "smoke":
            made = make_smoke_cache(args.out, args.num_classes, args.images_per_class, args.image_size,
                                    flip=not args.no_flip)
            print(f"smoke cache: dataset.path={made['path']} dataset.split={made['split']} dataset.vae={made['vae']} "
                  f"(images: {made['images']})")
            return 0
        if args.command == "synthetic":
            manifest = write_synthetic_cache(args.out, args.count, args.num_classes, dtype=args.dtype, flip=args.flip)
            size = sum(f["bytes"] for f in manifest["files"].values())
            print(f"wrote {manifest['count']} synthetic latents ({size / 2**30:.2f} GiB) -> {args.out}")
            return 0
        import torch

        from vae import SDVAE

        device = args.device
        if device == "auto":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        codec = SDVAE(args.vae, device=device, dtype=args.vae_dtype, chunk_size=args.chunk_size, vae_id=args.vae_id,
                      subfolder=args.vae_subfolder, local_files_only=args.local_files_only)
        result = build_shards(args.images, args.out, codec, image_size=args.image_size, shard_size=args.shard_size,
                              flip=args.flip, dtype=args.dtype, rank=args.rank, world=args.world,
                              max_shards=args.max_shards, workers=args.workers, split=args.split,
                              log=lambda *_: None, progress=True)
    except (FileNotFoundError, ValueError) as e:  # LatentCacheError / VAENotFoundError are FileNotFoundErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    mine = range(args.rank, result["num_shards"], args.world)
    left = [i for i in mine if not shard_path(args.out, i).is_file()]
    print(f"rank {args.rank}/{args.world}: wrote {len(result['written'])} shards, skipped {len(result['skipped'])} "
          f"finished, {len(left)} left of {len(mine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
