"""Couplings: which noise sample each training sample is paired with, and the reflow pair files.

The flow-matching loss trains on pairs (x0 = eps, x1 = data) drawn from a coupling pi(x0, x1); any
coupling with the right marginals gives a valid path (Tong et al. 2023, arXiv 2302.00482, sec. 3;
Pooladian et al. 2023, arXiv 2304.14772). A coupling here maps one micro-batch's draws to the noise
each row is trained against; it never draws anything itself, so the trainer's (seed, step, micro-batch)
determinism (exact resume, torchrun = accumulation) carries over unchanged.

- `independent`: eps as drawn, pi = p0 x p1 (the standard conditional flow matching).
- `minibatch_ot`: the exact optimal assignment of the micro-batch's noise to its data under the
  squared Euclidean cost (OT-CFM; Tong et al. 2023 eq. 15, Pooladian et al. 2023 alg. 1), within each
  class for class-conditional models, so a row's label still describes its data.
- `pairs`: precomputed (noise, sample, label) triples of a teacher's ODE (reflow, Liu et al. 2022,
  arXiv 2209.03003, eq. 6: Z^{k+1} = RectFlow((Z0^k, Z1^k))); the pair file is the training set.

Pair directory (written by scripts/generate_pairs.py, read by `load_pairs`):
  DIR/settings.json             what the pairs are (teacher, solver, seed, sizes); fixed at the first run
  DIR/chunks/chunk_XXXXXX.safetensors  rows [c * chunk_size, (c + 1) * chunk_size): noise, sample, label
  DIR/manifest.json             settings + sha256 and row count of every chunk; written last (complete)
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from checkpoint import atomic_write, sha256_file
from datasets import DatasetNotFoundError, InMemoryDataset

PAIRS_FORMAT = "nanoflow-pairs-v1"


class PairFileError(DatasetNotFoundError):
    """A pair directory that is missing, incomplete or damaged; the message names the path."""


# --- the assignment -------------------------------------------------------------------------------


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Cost C[i, j] = ||a_i - b_j||^2 for a [B, ...], b [B, ...] -> float64 numpy [B, B], computed on the
    CPU in float64: the assignment is then the same on every device and rank."""
    a, b = a.detach().flatten(1).double().cpu(), b.detach().flatten(1).double().cpu()
    cost = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return cost.numpy()


def ot_permutation(x1: torch.Tensor, eps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The exact minibatch OT assignment: perm [B] (on x1's device) minimising sum_i ||x1_i - eps_perm[i]||^2,
    over permutations that keep each row's noise within its class when y [B] is given.

    scipy's linear_sum_assignment (Jonker-Volgenant, O(B^3)) is exact; ties have probability zero for
    Gaussian noise, so the result is a deterministic function of the inputs."""
    from scipy.optimize import linear_sum_assignment

    perm = np.arange(x1.shape[0])
    groups = [perm] if y is None else [np.flatnonzero(y.cpu().numpy() == c) for c in np.unique(y.cpu().numpy())]
    for rows in groups:
        cost = squared_distances(x1[rows], eps[rows])
        _, cols = linear_sum_assignment(cost)
        perm[rows] = rows[cols]
    return torch.from_numpy(perm).to(x1.device)


# --- couplings ------------------------------------------------------------------------------------


class Coupling:
    """independent: the noise as drawn. Subclasses re-pair it. Called once per micro-batch with
    (x1 [B, ...], eps [B, ...], y [B] class labels before label dropout or None, indices [B] rows of
    the training data) -> eps [B, ...], the noise row i is trained against."""

    def training_data(self, dataset):
        """The rows the trainer's epoch permutation runs over (the dataset itself, or the pair file)."""
        return dataset

    def __call__(self, x1, eps, y, indices):
        return eps


class MinibatchOT(Coupling):
    """eps permuted by the exact OT assignment of the micro-batch (`ot_permutation`). The assignment is
    per micro-batch, so its size is batch_size / (world_size * grad_accum): a run with the same product
    trains the same model, another product changes the coupling (smaller batches pair less straightly)."""

    def __init__(self, within_class: bool = True):
        self.within_class = within_class

    def __call__(self, x1, eps, y, indices):
        return eps[ot_permutation(x1, eps, y if self.within_class else None)]


class PairCoupling(Coupling):
    """Reflow: row i of the pair file is (noise_i, sample_i, label_i); the trainer's epoch permutation
    runs over the rows, x1 = sample, y = label, and the stored noise replaces the drawn one."""

    def __init__(self, directory, device):
        self.noise, samples, labels, self.manifest = load_pairs(directory, device)
        self.data = InMemoryDataset(
            x=samples,
            y=labels,
            num_classes=max(int(self.manifest["num_classes"] or 0), 1),
            name=self.manifest["dataset"],
        )

    def training_data(self, dataset):
        return self.data

    def __call__(self, x1, eps, y, indices):
        return self.noise[indices].to(eps.dtype)


COUPLINGS = {"independent": Coupling, "minibatch_ot": MinibatchOT, "pairs": PairCoupling}


# --- the pair directory ---------------------------------------------------------------------------


def chunk_path(directory, chunk: int) -> Path:
    return Path(directory) / "chunks" / f"chunk_{chunk:06d}.safetensors"


def settings_sha256(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _atomic(path: Path, write) -> None:
    """write(tmp) then rename: a reader (or a resumed run) sees the whole file or none."""
    with atomic_write(path) as tmp:
        write(tmp)


def write_chunk(directory, chunk: int, noise: torch.Tensor, samples: torch.Tensor, labels: torch.Tensor) -> Path:
    """One chunk: noise and samples [n, ...] float32, labels [n] int64 (-1: unconditional), atomically."""
    path = chunk_path(directory, chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "noise": noise.float().contiguous().cpu(),
        "sample": samples.float().contiguous().cpu(),
        "label": labels.long().contiguous().cpu(),
    }
    _atomic(path, lambda tmp: save_file(tensors, str(tmp)))
    return path


def write_json(path: Path, value: dict) -> None:
    _atomic(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2, sort_keys=True) + "\n"))


def write_manifest(directory, settings: dict, num_chunks: int) -> dict:
    """The completion record: settings and every chunk's rows and sha256, written last."""
    directory = Path(directory)
    chunks = []
    for c in range(num_chunks):
        path = chunk_path(directory, c)
        chunks.append(
            {
                "file": str(path.relative_to(directory)),
                "rows": int(load_file(str(path))["label"].shape[0]),
                "sha256": sha256_file(path),
            }
        )
    manifest = {"format": PAIRS_FORMAT, **settings, "chunks": chunks}
    write_json(directory / "manifest.json", manifest)
    return manifest


def load_pairs(directory, device="cpu", verify: bool = True):
    """A complete pair directory -> (noise [N, ...], samples [N, ...], labels [N] long, manifest), on device.
    Every chunk's sha256 is checked against the manifest (verify=True), so a damaged file fails here."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        partial = (
            " (its chunks exist: generation did not finish; re-run the same scripts/generate_pairs.py "
            "command to complete it)"
            if (directory / "chunks").is_dir()
            else ""
        )
        raise PairFileError(
            f"pair directory {str(directory)!r} has no manifest.json{partial}; make one with "
            f"python scripts/generate_pairs.py checkpoint=TEACHER_RUN out={directory} num_pairs=N"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != PAIRS_FORMAT:
        raise PairFileError(f"{manifest_path}: format {manifest.get('format')!r}, expected {PAIRS_FORMAT!r}")
    parts = {"noise": [], "sample": [], "label": []}
    for entry in manifest["chunks"]:
        path = directory / entry["file"]
        if not path.is_file() or (verify and sha256_file(path) != entry["sha256"]):
            raise PairFileError(
                f"pair chunk {path} is missing or fails its sha256 check against {manifest_path}; "
                f"delete it and re-run the generation command to rewrite it"
            )
        tensors = load_file(str(path))
        for key in parts:
            parts[key].append(tensors[key])
    noise, samples, labels = (torch.cat(parts[k]).to(device) for k in ("noise", "sample", "label"))
    if list(samples.shape) != [manifest["num_pairs"], *manifest["sample_shape"]]:
        raise PairFileError(
            f"{directory}: the chunks hold samples of shape {list(samples.shape)}, the manifest says "
            f"{[manifest['num_pairs'], *manifest['sample_shape']]}"
        )
    return noise, samples, labels, manifest
