"""figures.py: the sample grids (one row per class, named), the 2-D scatter, the GRPO comparison grid and
the atomic samples.png / samples.npz writer."""

import numpy as np
import pytest
import torch

import figures


@pytest.fixture(autouse=True)
def close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def images(n, channels=1, size=4, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def row_names(figure):
    return [axis.get_ylabel() for axis in figure.axes]


def strips(figure):
    return [axis.images[0].get_array() for axis in figure.axes]


def test_image_samples_are_saved_as_uint8_nhwc(tmp_path):
    import numpy as np

    samples = torch.linspace(-1.2, 1.2, 2 * 1 * 4 * 4).view(2, 1, 4, 4)
    labels = torch.tensor([0, 1])
    figure = figures.samples_figure(samples, labels, "digits")
    figures.save_samples(samples, labels, tmp_path, figure)
    saved = np.load(tmp_path / "samples.npz")
    assert saved["images"].shape == (2, 4, 4, 1) and saved["images"].dtype == np.uint8
    assert saved["images"].min() == 0 and saved["images"].max() == 255  # clamped to [-1, 1] first


def test_to_uint8_images_is_nhwc_rounded_and_clipped():
    samples = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0, 0.5]).view(1, 3, 1, 2)  # C=3, H=1, W=2
    out = figures.to_uint8_images(samples)
    assert out.shape == (1, 1, 2, 3) and out.dtype == np.uint8
    # channel c of pixel (0, w) is samples[0, c, 0, w]: ((x + 1) * 127.5) rounded, clipped to [0, 255]
    assert out[0, 0].tolist() == [[0, 128, 255], [0, 255, 191]]


def test_samples_figure_has_one_row_per_class_named_by_the_class_names():
    labels = torch.tensor([2, 0, 2, 0, 2, 5])
    samples = images(6)
    figure = figures.samples_figure(samples, labels, "digits", class_names=["zero", "one", "two"])
    assert row_names(figure) == ["zero", "two", "5"]  # sorted classes; a name missing -> the index
    widths = [strip.shape[1] for strip in strips(figure)]
    assert widths == [3 * 4] * 3  # every row padded to the longest (3 images of width 4)
    # row "two" holds the class-2 images in order, then nothing
    expected = np.concatenate([figures.to_uint8_images(samples[labels == 2])[k, :, :, 0] for k in range(3)], axis=1)
    np.testing.assert_array_equal(np.asarray(strips(figure)[1]), expected)
    unnamed = figures.samples_figure(samples, labels, "digits")
    assert row_names(unnamed) == ["0", "2", "5"]


def test_samples_figure_caps_each_row_and_grids_unconditional_samples():
    figure = figures.samples_figure(images(30), torch.zeros(30, dtype=torch.long), "digits", max_per_row=7)
    assert len(figure.axes) == 1 and strips(figure)[0].shape[1] == 7 * 4
    grid = figures.samples_figure(images(10, channels=3), None, "cifar10")
    assert len(grid.axes) == 3 and [s.shape for s in strips(grid)] == [(4, 12, 3)] * 3  # 3 x 3 of 10 shown
    assert row_names(grid) == ["", "", ""]


def test_a_2d_figure_is_a_scatter_in_data_space_per_class():
    points = torch.tensor([[0.0, 0.0], [1.0, 1.0], [-1.0, 0.5]])
    figure = figures.samples_figure(points, torch.tensor([0, 1, 1]), "moons")
    axis = figure.axes[0]
    assert axis.get_title() == "moons: 3 samples"
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["class 0", "class 1"]
    from datasets import moons_to_data_space

    plotted = np.concatenate([collection.get_offsets() for collection in axis.collections])
    np.testing.assert_allclose(plotted, moons_to_data_space(points[[0, 1, 2]]).numpy(), rtol=1e-6)


def test_comparison_figure_puts_seed_then_current_in_each_class_row():
    seed, current = images(4, seed=1), images(4, seed=2)
    labels = torch.tensor([0, 1, 0, 1])
    figure = figures.comparison_figure(seed, current, labels, "digits")
    assert row_names(figure) == ["0", "1"]
    row0 = np.asarray(strips(figure)[0])
    expected = np.concatenate(
        [figures.to_uint8_images(x)[0, :, :, 0] for x in (seed[0:1], seed[2:3], current[0:1], current[2:3])], axis=1
    )
    np.testing.assert_array_equal(row0, expected)
    single = figures.comparison_figure(seed, current, None, "digits")
    assert row_names(single) == ["seed | current"] and strips(single)[0].shape[1] == 8 * 4


def test_save_samples_of_points_and_latents(tmp_path):
    points = torch.randn(5, 2)
    figure = figures.samples_figure(points, None, "moons")
    figures.save_samples(points, None, tmp_path / "pts", figure)
    saved = np.load(tmp_path / "pts" / "samples.npz")
    assert sorted(saved.files) == ["labels", "points"]
    np.testing.assert_array_equal(saved["points"], points.numpy())
    assert saved["labels"].tolist() == [-1] * 5 and saved["labels"].dtype == np.int64
    latents = torch.randn(2, 4, 2, 2, dtype=torch.bfloat16)
    figures.save_samples(images(2, 3), torch.tensor([1, 0]), tmp_path / "img", figure, latents=latents)
    saved = np.load(tmp_path / "img" / "samples.npz")
    assert saved["images"].shape == (2, 4, 4, 3) and saved["latents"].dtype == np.float32
    np.testing.assert_array_equal(saved["latents"], latents.float().numpy())
    assert (tmp_path / "img" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["samples.npz", "samples.png"]  # no temp files


def test_a_failed_write_leaves_the_earlier_file_and_no_temp_file(tmp_path):
    figure = figures.samples_figure(torch.randn(3, 2), None, "moons")
    figures.save_samples(torch.randn(3, 2), None, tmp_path, figure)
    before = (tmp_path / "samples.png").read_bytes()

    class Broken:
        def savefig(self, f, format):
            f.write(b"partial")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        figures.save_samples(torch.randn(3, 2), None, tmp_path, Broken())
    assert (tmp_path / "samples.png").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz", "samples.png"]


def test_long_class_names_fit_and_grids_name_their_rows_and_sampler():
    """CIFAR's 'automobile' was clipped to 'utomobile'; the GRPO grid labelled rows 0-9 where the seed's
    used class names; the moons title did not say how the samples were drawn."""
    from omegaconf import OmegaConf

    from evaluation import describe_solver
    from figures import close_figure, comparison_figure, samples_figure

    names = ("airplane", "automobile")
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    labels = torch.tensor([0, 0, 1, 1])
    figure = samples_figure(images, labels, "cifar10", names)
    figure.canvas.draw()
    for axis, name in zip(figure.axes, names):
        label = axis.yaxis.label
        assert label.get_text() == name and label.get_window_extent().x0 >= 0, name  # inside the canvas
    close_figure(figure)
    figure = comparison_figure(images, images, labels, "cifar10", names)
    assert [axis.yaxis.label.get_text() for axis in figure.axes] == list(names)
    close_figure(figure)
    solver = OmegaConf.create({"method": "heun", "num_steps": 32, "guidance_scale": 3.0, "guidance_interval": [0, 0.6]})
    assert describe_solver(solver) == "heun x32, guidance 3 on [0, 0.6]"
    figure = samples_figure(torch.randn(20, 2), torch.tensor([0, 1] * 10), "moons", title=describe_solver(solver))
    assert figure.axes[0].get_title() == "moons: 20 samples\nheun x32, guidance 3 on [0, 0.6]"
    close_figure(figure)
