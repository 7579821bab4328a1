"""Sample figures and sample files: the training grids, the GRPO seed-vs-current grids and the CLI's
`samples.png` / `samples.npz` all come from here."""

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

COMPARISON_PER_CLASS = 5  # seed | current samples per class row in the GRPO comparison grid


def to_uint8_images(samples: Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, H, W, C] uint8."""
    from datasets import model_space_to_uint8

    return model_space_to_uint8(samples.cpu()).permute(0, 2, 3, 1).numpy()


def samples_figure(
    samples: Tensor, labels: Tensor | None, dataset_name: str, class_names=None, max_per_row: int = 10, title=None
):
    """A matplotlib figure: a scatter plot for 2-D data, else a grid with one row per class (at most
    max_per_row images each) named by class_names. title: how they were sampled (solver, guidance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if samples.dim() == 2:
        points = samples
        if dataset_name == "moons":
            from datasets import moons_to_data_space

            points = moons_to_data_space(points)
        points = points.numpy()
        figure, axis = plt.subplots(figsize=(5, 4), dpi=100)
        if labels is None:
            axis.scatter(points[:, 0], points[:, 1], s=2, alpha=0.6)
        else:
            for k in labels.unique().tolist():
                chosen = (labels == k).numpy()
                name = class_names[k] if class_names and k < len(class_names) else f"class {k}"
                axis.scatter(points[chosen, 0], points[chosen, 1], s=2, alpha=0.6, label=name)
            axis.legend(markerscale=5, loc="upper right")
        axis.set_title(f"{dataset_name}: {len(points)} samples" + (f"\n{title}" if title else ""), fontsize=9)
        axis.set_aspect("equal")
        figure.tight_layout()
        return figure
    images = to_uint8_images(samples)
    if labels is None:  # a square-ish grid
        per_row = min(max(int(math.sqrt(len(images))), 1), max_per_row)
        groups = [images[i : i + per_row] for i in range(0, min(len(images), per_row * per_row), per_row)]
        names = [None] * len(groups)
    else:  # one row per class
        classes = labels.unique().tolist()
        groups = [images[(labels == k).numpy()][:max_per_row] for k in classes]
        names = [class_names[k] if class_names and k < len(class_names) else str(k) for k in classes]
    per_row = max(len(group) for group in groups)
    # room for the longest row name left of the images ("automobile" was clipped to "utomobile")
    label_inches = 0.09 * max((len(name) for name in names if name), default=0) + 0.2
    figure, axes = plt.subplots(
        len(groups),
        1,
        figsize=(per_row * 0.6 + label_inches, len(groups) * 0.6 + 0.3 + (0.3 if title else 0)),
        dpi=100,
        squeeze=False,
    )
    for axis, group, name in zip(axes[:, 0], groups, names):
        blank = np.zeros((per_row - len(group), *group.shape[1:]), dtype=np.uint8)
        strip = np.concatenate([*group, *blank], axis=1)
        # aspect auto: the image fills the box tight_layout sized, so the row name beside it stays on the canvas
        axis.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255, aspect="auto")
        axis.set_xticks([]), axis.set_yticks([])
        if name is not None:
            axis.set_ylabel(name, rotation=0, ha="right", va="center")
    top = 1.0
    if title:
        figure.suptitle(title, fontsize=8)
        top = 1 - 0.3 / figure.get_figheight()  # the title's strip, kept out of the rows
    figure.tight_layout(pad=0.2, rect=(0, 0, 1, top))
    return figure


def comparison_figure(seed: Tensor, current: Tensor, labels: Tensor | None, dataset_name: str, class_names=None):
    """One row per class (named by class_names, as the seed's own grids): COMPARISON_PER_CLASS seed samples,
    then the current policy's samples from the same noise. seed, current [N, C, H, W]; labels [N] or None."""
    n = COMPARISON_PER_CLASS
    if labels is None:
        both = torch.cat([seed[:n], current[:n]])  # fewer than n samples: as many labels as images
        return samples_figure(
            both, torch.zeros(len(both), dtype=torch.long), dataset_name, ["seed | current"], max_per_row=2 * n
        )
    rows, row_labels = [], []
    for k in labels.unique().tolist():
        chosen = labels == k
        rows += [seed[chosen][:n], current[chosen][:n]]
        row_labels.append(torch.full((len(seed[chosen][:n]) + len(current[chosen][:n]),), k))
    return samples_figure(torch.cat(rows), torch.cat(row_labels), dataset_name, class_names, max_per_row=2 * n)


def close_figure(figure) -> None:
    """pyplot keeps every figure alive until closed."""
    import matplotlib.pyplot as plt

    plt.close(figure)


def save_samples(samples: Tensor, labels: Tensor | None, out_dir, figure, latents: Tensor | None = None) -> None:
    """Write out_dir/samples.png and out_dir/samples.npz.

    samples.npz: `images` (uint8, N x H x W x C) for image data or `points` (float32, N x D,
    model space) for low-dimensional data, and `labels` (int64, N; -1 for unconditional); for a
    latent model also `latents` (float32, N x C x h x w, what the flow generated before decoding).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label_array = labels.numpy().astype(np.int64) if labels is not None else np.full(len(samples), -1, np.int64)
    if samples.dim() == 2:
        arrays = {"points": samples.numpy().astype(np.float32), "labels": label_array}
    else:
        extra = {} if latents is None else {"latents": latents.float().cpu().numpy()}
        arrays = {"images": to_uint8_images(samples), "labels": label_array, **extra}
    # Each file appears whole or not at all (written under a temporary name, then renamed).
    _write_atomic(out_dir / "samples.png", lambda f: figure.savefig(f, format="png"))
    _write_atomic(out_dir / "samples.npz", lambda f: np.savez(f, **arrays))


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
