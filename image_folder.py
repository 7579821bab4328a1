"""Image folders at 256 (ADM centre crop): root/<class>/<image> (or a flat folder, one class) served as
batches of crops, each file's header read when the folder is opened."""

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from datasets import DatasetNotFoundError, random_hflip, uint8_to_model_space

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGE_FOLDER_CACHE_BYTES = 8 * 2**30  # decoded uint8 crops kept in host RAM up to this size (per process)


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM's centre crop (guided-diffusion image_datasets.py): PIL RGB image -> uint8 [size, size, 3].

    BOX-halve while the short side is >= 2 * size (cheap, alias-free), BICUBIC-resize so the short
    side is exactly `size`, then crop the centre. Kept verbatim so latents match published caches.
    """
    from PIL import Image

    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def load_image(path, image_size: int) -> np.ndarray:
    """An image file -> its ADM centre crop, uint8 [size, size, 3] RGB (grey/alpha/palette converted)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return center_crop_arr(image.convert("RGB"), image_size)
    except (OSError, ValueError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated files
        raise DatasetNotFoundError(f"image {str(path)!r} is unreadable ({type(e).__name__}: {e})") from e


def _image_files(folder: str) -> list[str]:
    # sorted(os.walk(followlinks=True)) as torchvision's make_dataset: ImageNet trees are often symlinks.
    found = []
    for directory, _, files in sorted(os.walk(folder, followlinks=True)):
        found += [os.path.join(directory, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def list_image_folder(root, allow_empty: bool = False) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """root/<class>/**/<image> -> (paths relative to root, labels [N] int64, class names).

    Classes are the sorted sub-folder names (label k = k-th name, as torchvision's ImageFolder), files
    sorted within a class, so every machine derives the same order. A folder with no sub-folders is
    one unlabelled class named after it (CelebA-HQ style). allow_empty: keep class folders without
    images as classes (as torchvision's allow_empty) instead of failing.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image folder {str(root)!r} does not exist (expected root/<class>/<image>, "
            f"e.g. ImageNet's train/ with one folder per synset, or a flat folder of images)"
        )
    class_names = tuple(sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith(".")))
    if not class_names:  # a flat folder: one class
        files = [f for f in sorted(os.listdir(root)) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files and not allow_empty:
            raise DatasetNotFoundError(
                f"image folder {str(root)!r} holds no images and no class sub-folders "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
            )
        return files, np.zeros(len(files), dtype=np.int64), (root.name,)
    paths, labels, empty = [], [], []
    for label, name in enumerate(class_names):
        files = [os.path.relpath(f, root) for f in _image_files(str(root / name))]
        if not files:
            empty.append(name)
        paths += files
        labels += [label] * len(files)
    if empty and not allow_empty:
        shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise DatasetNotFoundError(
            f"image folder {str(root)!r}: {len(empty)} of {len(class_names)} class folders hold "
            f"no images ({shown}); extensions {', '.join(IMAGE_EXTENSIONS)}. Set allow_empty=true "
            "to keep them as classes without samples"
        )
    return paths, np.asarray(labels, dtype=np.int64), class_names


def check_image_headers(root: Path, paths: list[str], workers: int) -> None:
    """Open every file's header (PIL reads only the header: ~0.1 ms a file) and refuse the folder, naming
    the unreadable files, before anything trains on it: a corrupt image otherwise surfaces only in the
    first batch that draws it, after the run directory was created."""

    from PIL import Image

    def problem(relative: str) -> str | None:
        try:
            with Image.open(root / relative) as image:
                image.size  # noqa: B018 (the header is parsed on open; size proves it)
            return None
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            return f"{relative} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        bad = [p for p in pool.map(problem, paths) if p is not None]
    if bad:
        shown = "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise DatasetNotFoundError(
            f"image folder {str(root)!r}: {len(bad)} of {len(paths)} files are not readable images: {shown}. "
            "Remove or replace them"
        )


class ImageFolderDataset:
    """A folder of images served as ADM centre crops: batch(indices) -> (x [B, 3, S, S] float32 in
    [-1, 1], y [B] long) on `device`.

    Memory: decoded crops are kept in a host uint8 tensor [N, 3, S, S] when it fits in `cache_bytes`
    (per process; CelebA-HQ 30k at 256 is 5.9 GB), filled lazily as samples are first drawn, so the
    first epoch decodes and later ones are gathers; untouched rows cost nothing (the allocation is
    lazy). Larger folders (ImageNet at 256 would be 252 GB) are decoded in every batch call by
    `workers` threads (PIL releases the GIL while decoding and resizing): pre-resize such folders
    to 256 so decoding is cheap, or use a latent cache. Flips come from `generator` as in
    `InMemoryDataset`.
    """

    def __init__(
        self,
        root,
        image_size: int = 256,
        hflip: bool = False,
        allow_empty: bool = False,
        device="cpu",
        cache_bytes: int = IMAGE_FOLDER_CACHE_BYTES,
        workers: int | None = None,
        name: str = "imagefolder",
    ):
        if image_size < 1:
            raise ValueError(f"imagefolder: image_size={image_size} must be >= 1")
        self.root, self.image_size, self.hflip, self.name = Path(root).expanduser(), image_size, hflip, name
        self.paths, labels, self.class_names = list_image_folder(self.root, allow_empty)
        self.workers = workers or min(8, os.cpu_count() or 1)
        check_image_headers(self.root, self.paths, self.workers)
        self.num_classes = len(self.class_names)
        self.device = torch.device(device)
        self.y = torch.from_numpy(labels).to(self.device)
        fits = len(self.paths) * 3 * image_size**2 <= cache_bytes
        self.cache = torch.empty((len(self.paths), 3, image_size, image_size), dtype=torch.uint8) if fits else None
        self.cached = torch.zeros(len(self.paths), dtype=torch.bool) if fits else None
        self._pool = None  # created on first use

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    def decode(self, rows: np.ndarray) -> torch.Tensor:
        """Sample indices [n] -> uint8 [n, 3, S, S] on the CPU, decoded by the thread pool."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="imagefolder")
        crops = list(self._pool.map(lambda i: load_image(self.root / self.paths[i], self.image_size), rows.tolist()))
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None):
        """indices [B] long (any device) -> (x [B, 3, S, S] float32 in [-1, 1], y [B] long) on `device`.

        Each distinct index is decoded (or gathered from the cache) once, in sorted order.
        """
        idx = indices.detach().to("cpu", torch.long).numpy()
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"imagefolder: indices must be in [0, {len(self)}), got min {idx.min()}, max {idx.max()}")
        rows, inverse = np.unique(idx, return_inverse=True)
        if self.cache is None:
            x = self.decode(rows)
        else:
            missing = rows[~self.cached[torch.from_numpy(rows)].numpy()]
            if len(missing):
                self.cache[torch.from_numpy(missing)] = self.decode(missing)
                self.cached[torch.from_numpy(missing)] = True
            x = self.cache[torch.from_numpy(rows)]
        x = x[torch.from_numpy(inverse.reshape(-1))].to(self.device)
        if self.hflip and generator is not None:
            x = random_hflip(x, generator)
        return uint8_to_model_space(x), self.y[indices.to(self.y.device)]


def load_imagefolder(
    device="cpu",
    root: str = "./data/images",
    image_size: int = 256,
    hflip: bool = False,
    allow_empty: bool = False,
    split: str | None = None,
    cache_bytes: int = IMAGE_FOLDER_CACHE_BYTES,
    workers: int | None = None,
) -> ImageFolderDataset:
    """Images under root (or root/split when split is given): root/<class>/**/<image> or a flat folder;
    ADM centre crop to image_size; see `ImageFolderDataset` for memory use."""
    folder = Path(root) / split if split else Path(root)
    return ImageFolderDataset(folder, image_size, hflip, allow_empty, device, cache_bytes, workers)


# Shapes and class counts known without reading any file (benchmarks with synthetic data).
