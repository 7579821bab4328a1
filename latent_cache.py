"""The ImageNet latent cache: its format (the constants and manifest keys its writer,
latent_cache_writer.py, uses) and the reader of a converted cache (`LatentCacheDataset`,
`load_latent_cache`, the dataset registry's `latent_cache`; `check_latent_cache`, which preflight runs
too). docs/imagenet256_storage.md describes the layout and the memory behaviour.
"""

import hashlib
import json
import math
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from datasets import DatasetNotFoundError

# --- the format ----------------------------------------------------------------------------------
#
# One split directory (e.g. cache/imagenet256/train) holds:
#   latents.npy       [N, C, h, w] float16|float32, scaled SD-VAE latents (vae.py convention)
#   latents_flip.npy  same shape: the horizontally mirrored image, encoded (flip policy "twin")
#   labels.npy        [N] int64 in [0, num_classes)
#   manifest.json     written last: count, shapes, dtypes, VAE binding, image size, flip policy, sha256 per file

LATENT_DTYPES = ("float16", "float32")
LATENT_CACHE_KIND = "nanoflow-latent-cache"
FORMAT_VERSION = 1
CROP = "adm_center_crop"  # guided-diffusion's center_crop_arr
# Keys of build.json that every run and rank building into one directory must agree on.
BUILD_KEYS = (
    "format_version",
    "num_images",
    "file_list_sha256",
    "class_names",
    "image_size",
    "crop",
    "flip",
    "dtype",
    "shard_size",
    "vae_id",
    "vae_scaling_factor",
    "vae_shift_factor",
    "latent_sampling",
    "latent_shape",
    "split",
)
# build.json keys copied into manifest.json (count and num_classes are added there).
MANIFEST_KEYS = (
    "format_version",
    "split",
    "class_names",
    "latent_shape",
    "dtype",
    "vae_id",
    "vae_scaling_factor",
    "vae_shift_factor",
    "latent_sampling",
    "image_size",
    "crop",
    "flip",
    "file_list_sha256",
    "images_dir",
)


# --- reading a converted cache ---------------------------------------------------------------------


class LatentCacheError(DatasetNotFoundError):
    """A latent cache that is missing, incomplete, corrupt or built with another VAE: unusable either way."""


def latent_cache_dir(path, split: str = "train") -> Path:
    """The split directory: path/split when it holds a cache, else path itself when it does
    (a split directory given directly), else path/split (whose absence the open reports)."""
    path = Path(path).expanduser()
    if (path / split / "manifest.json").is_file() or not (path / "manifest.json").is_file():
        return path / split
    return path


def read_latent_manifest(directory) -> dict:
    """manifest.json of a cache split directory, or LatentCacheError saying how to make one."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        hint = " (shards exist: run `convert`)" if (directory / "shards").is_dir() else ""
        raise LatentCacheError(
            f"latent cache {str(directory)!r} has no manifest.json{hint}; build one with "
            f"`python scripts/build_latent_cache.py build ...`, then `convert` "
            f"(docs/imagenet256_storage.md)"
        )
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("kind") != LATENT_CACHE_KIND:
            raise KeyError(f"kind is {manifest.get('kind')!r}, expected {LATENT_CACHE_KIND!r}")
        for key in ("count", "files", "latent_shape", "class_names", "vae_id", "vae_scaling_factor"):
            manifest[key]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise LatentCacheError(
            f"latent cache {str(directory)!r}: manifest.json is unreadable ({type(e).__name__}: {e})"
        ) from None
    return manifest


def check_vae_binding(
    manifest: dict, vae: str | None = None, scaling_factor: float | None = None, shift_factor: float | None = None
) -> list[str]:
    """Problems (one line each) if the cache was not encoded with the expected VAE / factors.
    Presets and hub ids compare equal ("sd_vae_ft_ema" == "stabilityai/sd-vae-ft-ema"), local
    directories by resolved path (`vae.same_vae`)."""
    from vae import resolve_vae_id, same_vae

    problems = []
    if vae is not None and not same_vae(str(manifest["vae_id"]), vae):
        problems.append(
            f"vae_id: cache was encoded with {manifest['vae_id']!r}, the run expects "
            f"{resolve_vae_id(vae)!r} (rebuild the cache with that VAE, or set the run's VAE to the cache's)"
        )
    for key, expected in (("vae_scaling_factor", scaling_factor), ("vae_shift_factor", shift_factor)):
        if expected is not None and not math.isclose(float(manifest.get(key) or 0.0), expected, rel_tol=1e-6):
            problems.append(f"{key}: cache has {manifest.get(key)!r}, the run's VAE has {expected!r}")
    return problems


def _open_latent_arrays(directory: Path, manifest: dict) -> tuple[dict, list[str]]:
    """np.load(mmap_mode='r') every listed file, checking size, shape and dtype against the manifest.
    Read-only: a truncated file fails here ("mmap length is greater than file size") instead of
    being zero-extended as mode 'r+'/'w+' would."""
    arrays, problems = {}, []
    required = ["latents.npy", "labels.npy"] + (["latents_flip.npy"] if manifest.get("flip") == "twin" else [])
    for name in required:
        if name not in manifest["files"]:
            problems.append(f"{name}: not listed in manifest.json (flip policy {manifest.get('flip')!r})")
    count, latent_shape = int(manifest["count"]), list(manifest["latent_shape"])
    for name, meta in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name}: missing (manifest.json lists it with {meta['bytes']} bytes)")
            continue
        size = path.stat().st_size
        if size != meta["bytes"]:
            problems.append(f"{name}: {size} bytes, manifest.json says {meta['bytes']} (truncated or rewritten)")
            continue
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            problems.append(f"{name}: not a readable .npy ({e})")
            continue
        expected_shape = [count] if name == "labels.npy" else [count, *latent_shape]
        if list(array.shape) != expected_shape or list(meta["shape"]) != expected_shape:
            problems.append(
                f"{name}: shape {list(array.shape)} (manifest.json: {meta['shape']}), "
                f"expected {expected_shape} from count and latent_shape"
            )
        allowed = ("int64",) if name == "labels.npy" else LATENT_DTYPES
        if str(array.dtype) != meta["dtype"] or str(array.dtype) not in allowed:
            problems.append(
                f"{name}: dtype {array.dtype} (manifest.json: {meta['dtype']}), allowed: {', '.join(allowed)}"
            )
        arrays[name] = array
    return arrays, problems


def _label_problems(labels: np.ndarray, num_classes: int) -> list[str]:
    if not len(labels):
        return []
    low, high = int(labels.min()), int(labels.max())
    if low >= 0 and high < num_classes:
        return []
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    return [
        f"labels.npy: {len(bad)} labels outside [0, {num_classes}) (num_classes from manifest.json), "
        f"first at index {bad[0]} = {int(labels[bad[0]])}; min {low}, max {high}"
    ]


# Exponent bits of each stored float dtype: all ones means inf or NaN (a bit test is 3x faster
# than np.isfinite on float16 here).
_EXPONENT_MASK = {"float16": (np.uint16, 0x7C00), "float32": (np.uint32, 0x7F800000)}


def _scan_file(path: Path, offset: int, row_bytes: int, dtype: str | None, block_rows: int = 4096):
    """One sequential read of a .npy file -> (sha256 hex, indices of rows holding NaN/inf).

    Plain reads, not the memory map: the scan goes through the page cache without ever counting
    in this process's RSS. dtype None (labels) skips the finiteness test."""

    digest, bad = hashlib.sha256(), []
    with open(path, "rb") as f:
        digest.update(f.read(offset))
        row = 0
        while block := f.read(block_rows * row_bytes):
            digest.update(block)
            if dtype is not None:
                uint, mask = _EXPONENT_MASK[dtype]
                bits = np.frombuffer(block, dtype=uint).reshape(-1, row_bytes // np.dtype(uint).itemsize)
                bad.append(np.flatnonzero(((bits & mask) == mask).any(1)) + row)
            row += len(block) // row_bytes
    return digest.hexdigest(), np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def check_latent_cache(
    directory, vae: str | None = None, scaling_factor: float | None = None, full: bool = True
) -> tuple[dict, list[str]]:
    """(manifest, problems) for a cache split directory; no problems means usable.

    Always (O(1) in the cache size, plus 8 bytes per label): files present with the manifest's size,
    shape and dtype, labels in [0, num_classes), VAE binding (when `vae` / `scaling_factor` given).
    full=True adds one sequential read of every file (one thread per file): sha256 against the
    manifest and finite latents (8 GiB in ~20 s on this 2-core machine).
    Raises LatentCacheError only when there is no readable manifest at all.
    """
    directory = Path(directory)
    manifest = read_latent_manifest(directory)
    problems = check_vae_binding(manifest, vae, scaling_factor)
    arrays, open_problems = _open_latent_arrays(directory, manifest)
    problems += open_problems
    num_classes = int(manifest.get("num_classes", len(manifest["class_names"])))
    if "labels.npy" in arrays and not any(p.startswith("labels.npy") for p in problems):
        problems += _label_problems(np.asarray(arrays["labels.npy"]), num_classes)
    if not full:
        return manifest, problems
    names = [n for n in manifest["files"] if n in arrays and not any(p.startswith(n) for p in problems)]

    def scan(name):
        array = arrays[name]
        row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:]))
        return _scan_file(directory / name, array.offset, row_bytes, None if name == "labels.npy" else str(array.dtype))

    with ThreadPoolExecutor(max(1, len(names))) as pool:  # hashlib and numpy release the GIL
        results = dict(zip(names, pool.map(scan, names)))
    for name in names:
        digest, bad = results[name]
        if digest != manifest["files"][name]["sha256"]:
            problems.append(
                f"{name}: sha256 differs from manifest.json (bytes changed since convert; "
                "rebuild, or restore the file from a good copy)"
            )
        elif len(bad):
            problems.append(
                f"{name}: {len(bad)} samples contain NaN or inf (first at index {bad[0]}); allowed: finite values only"
            )
    return manifest, problems


def _available_memory_bytes() -> int:
    """MemAvailable (what the page cache can grow to) from /proc/meminfo; physical RAM elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class LatentCacheDataset:
    """A converted latent cache served by index: batch(indices) -> (latents [B, C, h, w] float32,
    labels [B] long) on `device`.

    Arrays are np.load(mmap_mode='r') memory maps: the OS page cache holds the hot part (shared by
    every rank on a node), the process's own memory is the 8 B/sample label tensor plus one batch,
    whatever the cache size. vae / scaling_factor: refuse a cache encoded with another VAE.
    flip: serve each training sample from the flip twin (the encoded mirrored image; flipping a
    latent is not the same thing) with probability 1/2; needs a cache built with flip=true.
    verify: also run the O(size) checks at open (sha256 of every file, finite latents).
    The VAE binding is exposed as `vae_id`, `latent_scaling_factor`, `latent_shift_factor` and
    `image_size`, so samples can be decoded with `vae.SDVAE(dataset.vae_id)` (see `check_vae`).
    Memory: read pages are unmapped after every batch (`release_pages`), and a cache larger than
    MemAvailable is read with MADV_RANDOM (`random_access`); see docs/imagenet256_storage.md.
    """

    def __init__(
        self,
        directory,
        vae: str | None = None,
        scaling_factor: float | None = None,
        flip: bool = False,
        device="cpu",
        verify: bool = False,
        split: str | None = None,
    ):
        self.root = Path(directory)
        manifest, problems = check_latent_cache(self.root, vae, scaling_factor, full=verify)
        has_twin = manifest.get("flip") == "twin"
        if flip and not has_twin:
            problems.append(
                f"flip=true needs latents_flip.npy, but this cache has flip policy {manifest.get('flip')!r} "
                "(rebuild with flip=true, or set the dataset's flip to false)"
            )
        if split is not None and split not in (self.root.name, manifest.get("split")):
            problems.append(f"split: this directory holds split {manifest.get('split')!r}, the run asked for {split!r}")
        if problems:
            raise LatentCacheError(f"latent cache {str(self.root)!r} is unusable:\n  " + "\n  ".join(problems))
        self.manifest, self.flip = manifest, bool(flip)
        self.unmap_pages = True  # see release_pages
        self.latents = self._open("latents.npy")
        self.latents_flip = self._open("latents_flip.npy") if has_twin else None
        # Read-around (the kernel default, up to the device's read_ahead_kb per fault) fills the page
        # cache fast when the cache fits in it; when it does not, each miss reads megabytes and evicts
        # rows still needed. Measured here (32 GiB cache, 24 GiB RAM): 746 images/s with read-around,
        # 14,541 with MADV_RANDOM; 8 GiB cold: 9,290 with read-around, 4,505 with MADV_RANDOM.
        cache_bytes = sum(a.nbytes for a in (self.latents, self.latents_flip) if a is not None)
        self.random_access = cache_bytes > _available_memory_bytes()
        if self.random_access:
            for array in (self.latents, self.latents_flip):
                self._advise(array, getattr(mmap, "MADV_RANDOM", None))
        self.device = torch.device(device)
        self.y = torch.from_numpy(np.load(self.root / "labels.npy", allow_pickle=False)).to(self.device)
        self.class_names = tuple(manifest["class_names"])
        self.num_classes = int(manifest.get("num_classes", len(self.class_names)))
        self.name = "latent_cache"
        self.vae_id = str(manifest["vae_id"])
        self.latent_scaling_factor = float(manifest["vae_scaling_factor"])
        self.latent_shift_factor = float(manifest.get("vae_shift_factor") or 0.0)
        self.image_size = manifest.get("image_size")

    def _open(self, name: str) -> np.ndarray:
        return np.load(self.root / name, mmap_mode="r", allow_pickle=False)

    @staticmethod
    def _advise(array, advice) -> None:
        if advice is not None and getattr(array, "_mmap", None) is not None:
            array._mmap.madvise(advice)

    def release_pages(self) -> None:
        """Unmap the cache pages read so far from this process; they stay in the OS page cache, so
        reading them again is a minor fault, not I/O. Without it the mapped part of the cache counts
        in the process's RSS (as RssFile) and grows with what the epoch has touched, up to the cache
        size (8.2 GiB after 3,000 batches of an 8 GiB cache, measured). `batch` calls it after every
        read when `unmap_pages` is on (the default), which keeps RSS flat for ~3 ms per batch on an
        8 GiB map (docs/imagenet256_storage.md)."""
        for array in (self.latents, self.latents_flip):
            self._advise(array, getattr(mmap, "MADV_DONTNEED", None))

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    def check_vae(self, codec) -> None:
        """Refuse a loaded `vae.SDVAE` that is not the one this cache was encoded with."""
        problems = check_vae_binding(self.manifest, codec.vae_id, codec.scaling_factor, codec.shift_factor)
        if problems:
            raise LatentCacheError(
                f"latent cache {str(self.root)!r} does not match the VAE:\n  " + "\n  ".join(problems)
            )

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None):
        """indices [B] long (any device) -> (x [B, C, h, w] float32, y [B] long) on the dataset's device.

        With flip on and a generator, each sample comes from the flip twin with probability 1/2 (one
        coin per sample from `generator`, so a resumed run repeats it); without a generator nothing
        is random (evaluation). Each array is read once per batch by one fancy index over the sorted
        unique rows (near-sequential I/O on the memory map), never by a per-sample Python loop.
        """
        idx = indices.detach().to("cpu", torch.long).numpy()
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"latent cache: indices must be in [0, {len(self)}), got min {idx.min()}, max {idx.max()}")
        flip = np.zeros(len(idx), dtype=bool)
        if self.flip and generator is not None:
            flip = (torch.rand(len(idx), generator=generator, device=generator.device) < 0.5).cpu().numpy()
        out = np.empty((len(idx), *self.sample_shape), dtype=self.latents.dtype)
        for source, take in ((self.latents, ~flip), (self.latents_flip, flip)):
            if take.any():
                rows, inverse = np.unique(idx[take], return_inverse=True)
                out[take] = source[rows][inverse.reshape(-1)]
        if self.unmap_pages:
            self.release_pages()
        # Moved in the stored dtype (half the bytes for float16), widened on the device.
        x = torch.from_numpy(out).to(self.device).float()
        return x, self.y[indices.to(self.y.device)]


def load_latent_cache(
    device="cpu",
    path: str = "./cache/imagenet256",
    split: str = "train",
    vae: str | None = "sd_vae_ft_ema",
    flip: bool = True,
    verify: bool = False,
    root: str | None = None,
) -> LatentCacheDataset:
    """A latent cache split: `path/split` (or `path` itself when it is the split directory).

    vae: preset, hub id or local directory the run decodes with; the cache must have been encoded
    with it (None skips the check). flip: serve random flips from the flip twin. verify: sha256 and
    finiteness scans at open (O(size); preflight does the same). root: alias of path, so the
    `dataset.root` override every preset understands works here too.
    """
    if root is not None:
        path = root
    return LatentCacheDataset(
        latent_cache_dir(path, split), vae=vae, flip=flip, device=device, verify=verify, split=split
    )
