"""Writing the ImageNet latent cache (latent_cache.py holds its format and reader): encode an image folder
into shards (any number of ranks or machines, resumable), convert them into the memory-mapped arrays with a
manifest written last, and synthetic caches for storage benchmarks. `scripts/build_latent_cache.py` is the
command line.
"""

import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import record_digest, sha256_file, shard_done
from image_folder import list_image_folder, load_image
from latent_cache import (
    BUILD_KEYS,
    CROP,
    FORMAT_VERSION,
    LATENT_CACHE_KIND,
    LATENT_DTYPES,
    MANIFEST_KEYS,
    LatentCacheError,
)

# --- writing: image folder -> shards -> converted cache ------------------------------------------


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_path(out_dir, index: int) -> Path:
    return Path(out_dir) / "shards" / f"shard_{index:05d}.npz"


def build_shards(
    images_dir,
    out_dir,
    vae,
    image_size: int = 256,
    shard_size: int = 1024,
    flip: bool = False,
    dtype: str = "float16",
    rank: int = 0,
    world: int = 1,
    max_shards: int | None = None,
    workers: int = 0,
    split: str | None = None,
    log=print,
    progress: bool = False,
) -> dict:
    """Encode this rank's missing shards; returns {"written": [i...], "skipped": [i...], "num_shards": n}.
    progress: a tqdm bar of this rank's images (images/s, ETA).

    vae: a `vae.SDVAE` (or anything with encode, latent_shape, vae_id, scaling_factor, shift_factor);
    its `vae_id` is what the cache records. flip: also encode each image mirrored left-right (stored
    as latents_flip). max_shards: stop after writing this many (time-boxed jobs; rerun to continue).
    split: name recorded in the manifest (default: out_dir's name).
    """
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"build: dtype={dtype!r} is not one of {LATENT_DTYPES}")
    if not (world >= 1 and 0 <= rank < world):
        raise ValueError(f"build: need 0 <= rank < world, got rank={rank}, world={world}")
    if shard_size < 1:
        raise ValueError(f"build: shard_size={shard_size} must be >= 1")
    downsample = getattr(vae, "downsample", 8)
    if image_size % downsample:
        raise ValueError(f"build: image_size={image_size} must be a multiple of {downsample} (the VAE's downsampling)")
    out_dir = Path(out_dir)
    paths, labels, class_names = list_image_folder(images_dir)
    listing = "\n".join(f"{label}\t{p}" for p, label in zip(paths, labels.tolist()))
    settings = {
        "format_version": FORMAT_VERSION,
        "num_images": len(paths),
        "file_list_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "class_names": list(class_names),
        "image_size": image_size,
        "crop": CROP,
        "flip": "twin" if flip else "none",
        "dtype": dtype,
        "shard_size": shard_size,
        "vae_id": vae.vae_id,
        "vae_scaling_factor": vae.scaling_factor,
        "vae_shift_factor": vae.shift_factor,
        "latent_sampling": "mean",
        "latent_shape": list(vae.latent_shape(image_size)),
        "split": split or out_dir.resolve().name,
        "images_dir": str(Path(images_dir).resolve()),
    }
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    build_json = out_dir / "build.json"
    if build_json.is_file():
        previous = json.loads(build_json.read_text())
        differ = [
            f"{k}: cache has {previous.get(k)!r}, this run {settings[k]!r}"
            for k in BUILD_KEYS
            if previous.get(k) != settings[k] and k not in ("file_list_sha256", "class_names")
        ]
        if previous.get("file_list_sha256") != settings["file_list_sha256"]:
            differ.append("the image folder's file list differs from the one the cache was started with")
        if differ:
            raise LatentCacheError(
                f"build: {out_dir} was started with other settings; use a new out= or the "
                "same settings:\n  " + "\n  ".join(differ)
            )
    else:
        _atomic_write_json(build_json, settings)

    num_shards = math.ceil(len(paths) / shard_size)
    written, skipped = [], []
    pool = ThreadPoolExecutor(workers) if workers > 0 else None  # PIL decode/resize release the GIL
    mine = range(rank, num_shards, world)
    # a shard is done when it matches its recorded size and sha256; a damaged one is moved aside and redone
    complete = {i for i in mine if shard_done(shard_path(out_dir, i), log)}
    done = sum(min(shard_size, len(paths) - i * shard_size) for i in complete)
    bar = tqdm(
        total=sum(min(shard_size, len(paths) - i * shard_size) for i in mine),
        initial=done,
        unit="img",
        desc=f"encode rank {rank}/{world}",
        dynamic_ncols=True,
        disable=not progress,
    )
    try:
        for index in mine:
            final = shard_path(out_dir, index)
            if index in complete:
                skipped.append(index)
                continue
            if max_shards is not None and len(written) >= max_shards:
                break
            start, stop = index * shard_size, min((index + 1) * shard_size, len(paths))
            files = [Path(images_dir) / p for p in paths[start:stop]]
            load = lambda p: load_image(p, image_size)
            pixels = np.stack(list(pool.map(load, files) if pool else map(load, files)))  # [n, S, S, 3] uint8
            x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1  # [-1, 1] NCHW
            arrays = {
                "latents": vae.encode(x).cpu().numpy().astype(dtype),
                "labels": labels[start:stop],
                "start": np.int64(start),
            }
            if flip:
                arrays["latents_flip"] = vae.encode(x.flip(-1)).cpu().numpy().astype(dtype)
            tmp = final.with_name(f".{final.name}.tmp")  # one owner per shard, so a fixed name is safe
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)  # a shard exists only complete: an interrupted one is redone
            record_digest(final)
            written.append(index)
            bar.update(stop - start)
            log(f"shard {index + 1}/{num_shards}: images {start}..{stop - 1} -> {final}")
    finally:
        bar.close()
        if pool:
            pool.shutdown()
    return {"written": written, "skipped": skipped, "num_shards": num_shards}


def write_cache(out_dir, settings: dict, count: int, fill, chunk: int) -> dict:
    """The one writer of converted caches: creates latents.npy (+ latents_flip.npy when
    settings["flip"] == "twin") and labels.npy as temp memory maps, calls fill(arrays, start, stop)
    for each chunk of rows (arrays: {"latents": ..., "labels": ...} memmap views to assign), renames
    them into place, and writes manifest.json last with sha256 per file. Returns the manifest.
    Never holds a whole array in RAM; the directory is not a valid cache until the manifest lands.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    manifest_path.unlink(missing_ok=True)
    latent_shape = (count, *settings["latent_shape"])
    names = ["latents", "labels"] + (["latents_flip"] if settings["flip"] == "twin" else [])
    shapes = {n: (count,) if n == "labels" else latent_shape for n in names}
    dtypes = {n: "int64" if n == "labels" else settings["dtype"] for n in names}
    tmp = {n: out_dir / f".{n}.npy.tmp" for n in names}
    arrays = {n: np.lib.format.open_memmap(tmp[n], mode="w+", dtype=dtypes[n], shape=shapes[n]) for n in names}
    for start in range(0, count, chunk):
        fill(arrays, start, min(start + chunk, count))
    for n in names:
        arrays[n].flush()
        del arrays[n]  # closes the map before the rename
        os.replace(tmp[n], out_dir / f"{n}.npy")
    files = {
        f"{n}.npy": {
            "sha256": sha256_file(out_dir / f"{n}.npy"),
            "bytes": (out_dir / f"{n}.npy").stat().st_size,
            "shape": list(shapes[n]),
            "dtype": dtypes[n],
        }
        for n in names
    }
    manifest = {
        "kind": LATENT_CACHE_KIND,
        "count": count,
        "num_classes": len(settings["class_names"]),
        **{k: settings.get(k) for k in MANIFEST_KEYS},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    _atomic_write_json(manifest_path, manifest)
    return manifest


def convert_shards(out_dir, delete_shards: bool = False, log=print) -> dict:
    """All shards -> latents.npy (+ latents_flip.npy), labels.npy and manifest.json; returns the
    manifest. Refuses while any shard is missing; copies one shard at a time (never the split in RAM)."""
    out_dir = Path(out_dir)
    build_json = out_dir / "build.json"
    if not build_json.is_file():
        raise LatentCacheError(f"convert: {out_dir} has no build.json; run `build` first")
    settings = json.loads(build_json.read_text())
    count, shard_size = settings["num_images"], settings["shard_size"]
    num_shards = math.ceil(count / shard_size)
    # every shard checked against its recorded size and sha256; a damaged one is moved aside for `build`
    missing = [i for i in range(num_shards) if not shard_done(shard_path(out_dir, i), log)]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise LatentCacheError(
            f"convert: {len(missing)} of {num_shards} shards are missing or damaged in {out_dir / 'shards'} "
            f"(indices {shown}); run `build` again (every rank) to finish them"
        )

    def fill(arrays, start, stop):
        path = shard_path(out_dir, start // shard_size)
        with np.load(path, allow_pickle=False) as shard:
            if int(shard["start"]) != start or shard["labels"].shape != (stop - start,):
                raise LatentCacheError(
                    f"convert: {path} holds images from {int(shard['start'])} "
                    f"x {shard['labels'].shape[0]}, expected {start}..{stop - 1}; delete it and rebuild"
                )
            for name, array in arrays.items():
                array[start:stop] = shard[name]

    manifest = write_cache(out_dir, settings, count, fill, chunk=shard_size)
    if delete_shards:
        for index in range(num_shards):
            shard_path(out_dir, index).unlink()
            shard_path(out_dir, index).with_name(shard_path(out_dir, index).name + ".sha256").unlink(missing_ok=True)
    return manifest


def write_synthetic_cache(
    out_dir,
    count: int,
    num_classes: int = 1000,
    latent_shape=(4, 32, 32),
    dtype: str = "float16",
    flip: bool = False,
    vae_id: str = "synthetic",
    scaling_factor: float = 0.18215,
    seed: int = 0,
    chunk: int = 16384,
) -> dict:
    """A cache of N(0, 1) latents and uniform labels with a valid manifest, written by `write_cache`
    (the same code as `convert`): for storage/throughput benchmarks without a VAE or images."""
    settings = {
        "format_version": FORMAT_VERSION,
        "split": Path(out_dir).resolve().name,
        "class_names": [f"class_{k}" for k in range(num_classes)],
        "latent_shape": list(latent_shape),
        "dtype": dtype,
        "vae_id": vae_id,
        "vae_scaling_factor": scaling_factor,
        "vae_shift_factor": 0.0,
        "latent_sampling": "synthetic",
        "image_size": 8 * latent_shape[-1],
        "crop": "none",
        "flip": "twin" if flip else "none",
        "file_list_sha256": None,
        "images_dir": None,
    }
    rng = np.random.default_rng(seed)

    def fill(arrays, start, stop):
        for name, array in arrays.items():
            if name == "labels":
                array[start:stop] = rng.integers(0, num_classes, stop - start)
            else:
                array[start:stop] = rng.standard_normal(array[start:stop].shape, dtype=np.float32)

    return write_cache(out_dir, settings, count, fill, chunk)
