"""figures.py: the sample grids and the samples.png / samples.npz writer."""

import torch

import figures


def test_image_samples_are_saved_as_uint8_nhwc(tmp_path):
    import numpy as np

    samples = torch.linspace(-1.2, 1.2, 2 * 1 * 4 * 4).view(2, 1, 4, 4)
    labels = torch.tensor([0, 1])
    figure = figures.samples_figure(samples, labels, "digits")
    figures.save_samples(samples, labels, tmp_path, figure)
    saved = np.load(tmp_path / "samples.npz")
    assert saved["images"].shape == (2, 4, 4, 1) and saved["images"].dtype == np.uint8
    assert saved["images"].min() == 0 and saved["images"].max() == 255  # clamped to [-1, 1] first
