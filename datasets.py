"""Data sources -> batches of (x, y): moons, digits, MNIST, Fashion-MNIST, CIFAR-10, image folders.

Small datasets live on the training device as one tensor; the trainer draws batches by index
(`InMemoryDataset.batch`) from an epoch permutation, so there is no per-sample Python and no
worker process in the training loop. Images are stored as uint8 [N, C, H, W] (4x smaller than
float32, so CIFAR-10 is 150 MB on the GPU) and converted to [-1, 1] one batch at a time.

Large datasets keep the same interface (`len`, `sample_shape`, `num_classes`, `name`,
`class_names`, `batch(indices, generator)`): an image folder decodes on demand
(`ImageFolderDataset`), the ImageNet latent cache reads a read-only memory map
(`latent_cache.LatentCacheDataset`). Every rank opens the whole dataset and draws its own slice
of each global batch of the shared `runtime.epoch_permutation`, so sampling needs no sampler state.
dataset_registry.py maps config names to the loaders.
"""

import contextlib
import gzip
import math
import os
import pickle
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class InMemoryDataset:
    """A whole dataset as tensors on one device.

    x: [N, D] float32 already in model space (moons), or [N, C, H, W] uint8 images (0..255);
    y: [N] long in [0, num_classes).
    """

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str
    hflip: bool = False  # mirror each training sample left-right with probability 1/2
    class_names: tuple[str, ...] | None = None  # class_names[k] names label k, for figures and logs

    def __post_init__(self):
        if self.hflip and self.x.dim() != 4:
            raise ValueError(f"{self.name}: hflip needs images [N, C, H, W], got x of shape {tuple(self.x.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def batch(self, indices: torch.Tensor, generator: torch.Generator | None = None):
        """indices [B] long on the dataset's device -> (x [B, ...] float32, y [B] long).

        uint8 images come back as contiguous NCHW float32 in [-1, 1]. Augmentation draws only from
        `generator` (on the dataset's device), so a resumed run repeats it exactly; without a
        generator nothing is random and the stored samples come back as they are (evaluation).
        """
        x, y = self.x[indices], self.y[indices]
        if self.hflip and generator is not None:
            x = random_hflip(x, generator)
        if x.dtype == torch.uint8:
            x = uint8_to_model_space(x)
        return x, y


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image [B, C, H, W] left-right with probability 1/2, one coin per sample drawn
    from `generator` (on x's device); the whole batch is mirrored once and the mask picks."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def uint8_to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1] (0 -> -1, 255 -> 1)."""
    return images.float() / 127.5 - 1


def model_space_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 0..255, rounded and clipped; inverts `uint8_to_model_space` exactly."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


# --- two moons ---------------------------------------------------------------------------------

# make_moons spans x in [-1, 2], y in [-0.5, 1]; this fixed affine map centres it and gives each
# coordinate roughly unit variance, matching the N(0, I) source so neither end of the path dominates.
MOONS_CENTER = (0.5, 0.25)
MOONS_SCALE = (1 / 0.87, 1 / 0.50)


def moons_to_model_space(points: torch.Tensor) -> torch.Tensor:
    return (points - torch.tensor(MOONS_CENTER)) * torch.tensor(MOONS_SCALE)


def moons_to_data_space(points: torch.Tensor) -> torch.Tensor:
    return points / torch.tensor(MOONS_SCALE, device=points.device) + torch.tensor(MOONS_CENTER, device=points.device)


def make_moons(num_samples: int, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's two interleaving half circles, drawn in torch (no sklearn import at start-up).

    Crescent 0: (cos a, sin a), crescent 1: (1 - cos a, 1/2 - sin a), a evenly spaced on [0, pi];
    plus N(0, noise^2) jitter. Returns points [N, 2] float32 (data space) and labels [N] long.
    """
    upper = num_samples // 2
    lower = num_samples - upper
    a_upper = torch.linspace(0, math.pi, upper, dtype=torch.float64)
    a_lower = torch.linspace(0, math.pi, lower, dtype=torch.float64)
    points = torch.cat(
        [
            torch.stack([torch.cos(a_upper), torch.sin(a_upper)], dim=1),
            torch.stack([1 - torch.cos(a_lower), 0.5 - torch.sin(a_lower)], dim=1),
        ]
    )
    points += noise * torch.randn(points.shape, generator=generator, dtype=torch.float64)
    labels = torch.cat([torch.zeros(upper, dtype=torch.long), torch.ones(lower, dtype=torch.long)])
    return points.float(), labels


def load_moons(
    device="cpu",
    num_samples: int = 8000,  # points in the training set
    noise: float = 0.05,  # std of the Gaussian jitter (in data units)
    data_seed: int = 0,  # fixed, so every run and every rank sees the same 8k points
    root: str | None = None,  # accepted so `dataset.root` works with every preset; unused
) -> InMemoryDataset:
    """Two moons; the label is the crescent (0 = upper, 1 = lower)."""
    points, labels = make_moons(num_samples, noise, torch.Generator().manual_seed(data_seed))
    x = moons_to_model_space(points)
    return InMemoryDataset(x=x.to(device), y=labels.to(device), num_classes=2, name="moons")


# --- torchvision datasets: MNIST, Fashion-MNIST, CIFAR-10 ----------------------------------------


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing or unreadable (and could not be downloaded)."""


SPLITS = ("train", "test")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR10_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
DIGIT_NAMES = tuple(str(k) for k in range(10))
FASHION_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DOWNLOAD_TIMEOUT_S = 60  # per socket operation; torchvision's urlopen has none, so a silent firewall would hang


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """Bound each blocking socket call while torchvision downloads; restores the previous default."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds if previous is None else previous)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _gunzip_missing(folder: str, files: tuple[str, ...]) -> None:
    """Unpack FILE.gz to FILE where only the archive is there (torchvision reads the unpacked IDX files,
    and only unpacks what it downloads itself, so hand-copied .gz files would otherwise be ignored)."""
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path) and os.path.isfile(path + ".gz"):
            with gzip.open(path + ".gz", "rb") as src, open(path + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(path + ".part", path)  # never leave a half-written file under the real name


def _unreadable_files(cls, folder: str, files: tuple[str, ...]) -> list[str]:
    """Which present files are damaged, each with the reason: a truncated or malformed CIFAR pickle
    (its opcodes are scanned, nothing is unpickled) or IDX file (its header's size against the file's),
    else an md5 that differs from the release's (torchvision's lists)."""
    import pickletools
    import struct

    bad = []
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            raw = f.read()
        if "idx" in name and len(raw) >= 4:
            ndim = raw[3]
            dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim]) if len(raw) >= 4 + 4 * ndim else ()
            expected = 4 + 4 * ndim + math.prod(dims) if dims else None
            if expected != len(raw):
                bad.append(f"{name} ({len(raw)} bytes, its header says {expected}: truncated?)")
        elif "idx" not in name:
            try:
                for _ in pickletools.genops(raw):
                    pass
            except Exception as e:  # noqa: BLE001 - any malformed opcode stream
                bad.append(f"{name} (not a complete pickle: {e}; truncated?)")
    if bad:
        return bad
    import importlib

    module = importlib.import_module(cls.__module__)
    check_integrity = getattr(module, "check_integrity", None)
    for name, md5 in getattr(cls, "train_list", []) + getattr(cls, "test_list", []):
        if (
            check_integrity
            and os.path.isfile(os.path.join(folder, name))
            and not check_integrity(os.path.join(folder, name), md5)
        ):
            bad.append(f"{name} (md5 differs from the release's: corrupted or partial)")
    return bad


def _not_found(
    name: str,
    split: str,
    folder: str,
    files: tuple[str, ...],
    expected: str,
    get_it: str,
    cause: BaseException | None = None,
    unreadable: list[str] | None = None,
) -> DatasetNotFoundError:
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    lines = [
        f"dataset '{name}' (split '{split}') not found or unreadable in {folder}",
        f"  expected files: {expected}",
        f"  missing: {', '.join(missing)}"
        if missing
        else "  all files are present but could not be read (corrupted or partial download? torchvision checks them)",
        *([f"  unreadable: {', '.join(unreadable)}"] if unreadable else []),
        f"  to get it: {get_it}",
        "  download=True needs network access; offline it ends in this same error once torchvision's "
        "download attempts fail.",
    ]
    if cause is not None:
        lines.append(f"  cause: {type(cause).__name__}: {str(cause).strip()}")
    return DatasetNotFoundError("\n".join(lines))


def _torchvision_dataset(
    name: str,
    class_name: str,
    subfolder: str,
    files: tuple[str, ...],
    expected: str,
    root: str,
    split: str,
    download: bool,
):
    """torchvision.datasets.<class_name>(root, train=split == 'train'), with every way of the data being
    absent (missing files with download=False, failed download, failed checksum) as one DatasetNotFoundError."""
    import torchvision  # imported here: ~1 s, and the moons stage never needs it

    if split not in SPLITS:
        raise ValueError(f"dataset '{name}': split must be one of {SPLITS}, got {split!r}")
    cls = getattr(torchvision.datasets, class_name)
    root = os.path.abspath(os.path.expanduser(str(root)))
    folder = os.path.join(root, subfolder)
    url = getattr(cls, "url", None) or cls.mirrors[0]
    get_it = (
        f'on a machine with network run `python -c "import torchvision; torchvision.datasets.{class_name}'
        f"('data', download=True)\"` (fetches from {url}), then copy data/{subfolder}/ to {folder}/; "
        f"or set dataset.root to a folder that holds {subfolder}/"
    )
    _gunzip_missing(folder, files)
    if not download and not all(os.path.isfile(os.path.join(folder, f)) for f in files):
        raise _not_found(name, split, folder, files, expected, get_it)
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S) if download else contextlib.nullcontext():
            return cls(root, train=split == "train", download=download)
    # torchvision: RuntimeError; urllib: URLError (an OSError); a truncated pickle: EOFError / UnpicklingError
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise _not_found(
            name, split, folder, files, expected, get_it, cause=error, unreadable=_unreadable_files(cls, folder, files)
        ) from error


def _image_dataset(images, labels, name: str, class_names: tuple[str, ...], device, hflip: bool) -> InMemoryDataset:
    """uint8 images [N, C, H, W] + labels [N] -> an InMemoryDataset on `device` (one copy, in one go)."""
    x = torch.as_tensor(images).contiguous()
    y = torch.as_tensor(labels, dtype=torch.long)
    assert x.dtype == torch.uint8 and x.dim() == 4 and y.shape == (x.shape[0],), (x.dtype, x.shape, y.shape)
    if len(y) and not (0 <= int(y.min()) and int(y.max()) < len(class_names)):
        raise ValueError(f"dataset '{name}': labels outside [0, {len(class_names)})")
    return InMemoryDataset(
        x=x.to(device),
        y=y.to(device),
        num_classes=len(class_names),
        name=name,
        hflip=hflip,
        class_names=tuple(class_names),
    )


def _mnist_family(name: str, class_name: str, class_names, device, root, split, download, hflip):
    expected = f"{class_name}/raw/{', '.join(IDX_FILES)} (all four, whatever the split; each may be .gz instead)"
    ds = _torchvision_dataset(
        name, class_name, os.path.join(class_name, "raw"), IDX_FILES, expected, root, split, download
    )
    # ds.data is already the decoded uint8 tensor [N, 28, 28]; ds.targets a long tensor [N].
    return _image_dataset(ds.data.unsqueeze(1), ds.targets, name, class_names, device, hflip)


def load_mnist(
    device="cpu", root: str = "./data", split: str = "train", download: bool = True, hflip: bool = False
) -> InMemoryDataset:
    """MNIST digits, 1x28x28, 10 classes; split 'train' (60k) or 'test' (10k). Files: ROOT/MNIST/raw/."""
    return _mnist_family("mnist", "MNIST", DIGIT_NAMES, device, root, split, download, hflip)


def load_fashion_mnist(
    device="cpu", root: str = "./data", split: str = "train", download: bool = True, hflip: bool = False
) -> InMemoryDataset:
    """Fashion-MNIST, 1x28x28, 10 classes; 'train' (60k) or 'test' (10k). Files: ROOT/FashionMNIST/raw/."""
    return _mnist_family("fashion_mnist", "FashionMNIST", FASHION_NAMES, device, root, split, download, hflip)


def load_cifar10(
    device="cpu",
    root: str = "./data",
    split: str = "train",
    download: bool = True,
    hflip: bool | None = None,
    verify: bool = True,
) -> InMemoryDataset:
    """CIFAR-10, 3x32x32 RGB, 10 classes; 'train' (50k) or 'test' (10k). Files: ROOT/cifar-10-batches-py/.

    hflip=None means on for 'train' (the standard CIFAR augmentation), off for 'test'. verify=False reads a
    local copy whose md5s differ from the release's (re-pickled, a subset) instead of refusing it; the
    batches are then unpickled with arrays and plain values only, so such a copy can never run code.
    """
    expected = "cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta (cifar-10-python.tar.gz, unpacked)"
    if not verify:
        images, labels, names = _read_cifar10_unverified(Path(root).expanduser() / "cifar-10-batches-py", split)
    else:
        ds = _torchvision_dataset(
            "cifar10", "CIFAR10", "cifar-10-batches-py", CIFAR10_FILES, expected, root, split, download
        )
        # ds.data is numpy uint8 [N, 32, 32, 3] (torchvision already reshaped the row-major RGB planes to HWC).
        images, labels = torch.from_numpy(ds.data).permute(0, 3, 1, 2), ds.targets
        names = tuple(getattr(ds, "classes", None) or CIFAR10_NAMES)  # batches.meta's label_names
    return _image_dataset(images, labels, "cifar10", names, device, split == "train" if hflip is None else hflip)


class _CifarBatchUnpickler(pickle.Unpickler):
    """A CIFAR python batch is a dict of bytes, lists and one numpy array: any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar10_unverified(folder: Path, split: str):
    """The release's python batches without their md5s -> (images uint8 [N, 3, 32, 32], labels, names)."""
    if split not in SPLITS:
        raise ValueError(f"dataset 'cifar10': split must be one of {SPLITS}, got {split!r}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in [*names, "batches.meta"]:
        path = folder / name
        try:
            with open(path, "rb") as f:
                entry = _CifarBatchUnpickler(f, encoding="latin1").load()
        except (OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
            raise DatasetNotFoundError(
                f"cifar10 ({split}, dataset.verify=false): {path} is unreadable ({type(error).__name__}: {error})"
            ) from None
        if name == "batches.meta":
            classes = tuple(entry["label_names"])
        else:
            images.append(torch.from_numpy(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)))
            labels += [int(v) for v in entry["labels"]]
    return torch.cat(images), labels, classes


# --- scikit-learn digits -----------------------------------------------------------------------


def load_digits(
    device="cpu",
    root: str = "./data",
    split: str = "train",
    download: bool = True,
    hflip: bool = False,
    image_size: int = 16,
) -> InMemoryDataset:
    """scikit-learn's bundled 1,797 real 8x8 digits (no download), as 1 x image_size^2 uint8, 10 classes.

    8x8 values 0..16 are scaled to 0..255 and resized bilinearly (no antialias; this only upsamples).
    Split, fixed: in each class, in dataset order, every 5th sample (the 5th, 10th, ...) is 'test'
    (355 images, 34-36 per class) and the rest 'train' (1,442). root and download are accepted so
    the dataset keys of every preset work here; they are unused.
    """
    from sklearn.datasets import load_digits as sklearn_load_digits  # lazy: sklearn import is slow

    if split not in SPLITS:
        raise ValueError(f"dataset 'digits': split must be one of {SPLITS}, got {split!r}")
    bunch = sklearn_load_digits()
    images = torch.from_numpy(bunch.images).unsqueeze(1) * (255 / 16)  # float64 [1797, 1, 8, 8] in 0..255
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(bunch.target).long()
    rank = torch.empty_like(labels)  # position of each sample among those of its class
    for k in range(10):
        members = labels == k
        rank[members] = torch.arange(int(members.sum()))
    keep = (rank % 5 == 4) == (split == "test")
    x = images[keep].round().clamp(0, 255).to(torch.uint8)
    return _image_dataset(x, labels[keep], "digits", DIGIT_NAMES, device, hflip)


DATASET_INFO = {
    "moons": {"shape": (2,), "num_classes": 2},
    "digits": {"shape": (1, 16, 16), "num_classes": 10},
    "mnist": {"shape": (1, 28, 28), "num_classes": 10},
    "fashion_mnist": {"shape": (1, 28, 28), "num_classes": 10},
    "cifar10": {"shape": (3, 32, 32), "num_classes": 10},
    # the defaults: a 256px ImageNet folder, ImageNet-256 SD-VAE latents
    "imagefolder": {"shape": (3, 256, 256), "num_classes": 1000},
    "latent_cache": {"shape": (4, 32, 32), "num_classes": 1000},
}
