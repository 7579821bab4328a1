"""Stand-in data in the real formats, made offline in about a second: a tiny random-init SD-VAE
(`tiny_autoencoder`, `save_tiny_vae`), a folder of random PNGs (`write_random_image_folder`) and a
complete latent cache built from them by the real writer (`make_smoke_cache`).

Scaffolding, not a feature: nothing here is a useful codec or dataset. It exists so that the `*_smoke` presets,
the cloud smoke chain (`scripts/build_latent_cache.py smoke`, `scripts/make_tiny_vae.py`) and the tests
exercise the real loading, encoding and cache code without downloads. Synthetic caches for storage
benchmarks (`latent_cache_writer.write_synthetic_cache`) stay with the cache writer.
"""

from pathlib import Path

import numpy as np
import torch

from latent_cache_writer import build_shards, convert_shards
from vae import SDVAE


def tiny_autoencoder(
    scaling_factor: float = 0.18215, shift_factor: float | None = None, latent_channels: int = 4, seed: int = 0
):
    """A random-init diffusers AutoencoderKL with SD-VAE's structure (4 levels: 8x downsampling,
    `latent_channels` latent channels) but 8-16 channels per level: 67k parameters, milliseconds
    per image at 32-64 px. Not a useful codec; it exercises the real loading and encode/decode code."""
    from diffusers import AutoencoderKL

    kwargs = {} if shift_factor is None else {"shift_factor": shift_factor}
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        return AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=scaling_factor,
            **kwargs,
        )


def save_tiny_vae(
    out_dir, scaling_factor: float = 0.18215, shift_factor: float | None = None, latent_channels: int = 4, seed: int = 0
) -> Path:
    """`tiny_autoencoder(...)` written with save_pretrained to out_dir (config.json + safetensors);
    load it like any VAE: SDVAE(str(out_dir)). Returns out_dir."""
    out_dir = Path(out_dir)
    tiny_autoencoder(scaling_factor, shift_factor, latent_channels, seed).save_pretrained(out_dir)
    return out_dir


def write_random_image_folder(
    root, num_classes: int = 2, images_per_class: int = 4, image_size: int = 64, seed: int = 0
) -> Path:
    """root/class_<k>/<i>.png: random RGB PNGs of assorted sizes around image_size (some smaller,
    some non-square, so the ADM crop both up- and down-scales). Returns root."""
    from PIL import Image

    root, rng = Path(root), np.random.default_rng(seed)
    for k in range(num_classes):
        (root / f"class_{k}").mkdir(parents=True, exist_ok=True)
        for i in range(images_per_class):
            w, h = (int(image_size * s) for s in rng.uniform(0.7, 2.3, size=2))
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"class_{k}" / f"{i}.png")
    return root


def make_smoke_cache(
    out_dir,
    num_classes: int = 2,
    images_per_class: int = 4,
    image_size: int = 64,
    flip: bool = True,
    vae_dir=None,
    seed: int = 0,
) -> dict:
    """A complete tiny cache in one call, for tests and `*_smoke` presets (about a second on CPU):

        out_dir/images/class_<k>/<i>.png   random PNGs (`write_random_image_folder`)
        out_dir/vae/                       `save_tiny_vae` (unless vae_dir is given)
        out_dir/cache/train/               built, converted; latents [4, image_size/8, image_size/8] float16

    Returns {"path": out_dir/cache, "split": "train", "vae": the VAE directory (str), "images":
    out_dir/images}: dataset kwargs path=, split=, vae= as in configs/dataset/imagenet256_latent.yaml.
    Rerunning replaces what an earlier call wrote there.
    """
    import shutil

    out_dir = Path(out_dir)
    for old in (out_dir / "images", out_dir / "cache" / "train"):
        shutil.rmtree(old, ignore_errors=True)
    images = write_random_image_folder(out_dir / "images", num_classes, images_per_class, image_size, seed)
    vae_dir = Path(vae_dir) if vae_dir is not None else save_tiny_vae(out_dir / "vae")
    codec = SDVAE(str(vae_dir), chunk_size=64)
    split_dir = out_dir / "cache" / "train"
    build_shards(
        images,
        split_dir,
        codec,
        image_size=image_size,
        shard_size=max(1, images_per_class),
        flip=flip,
        log=lambda *_: None,
    )
    convert_shards(split_dir, delete_shards=True)
    return {"path": out_dir / "cache", "split": "train", "vae": str(vae_dir), "images": images}
