"""JPEG/PNG bits per pixel (metrics.py): sizes are PIL's, per pixel, and inputs agree across layouts."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import model_space_to_uint8
from metrics import (
    bits_per_pixel,
    constant_image_bits_per_pixel,
    jpeg_bits_per_pixel,
    png_bits_per_pixel,
)


def noise_images(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(4, 28, 28, 1), (4, 32, 32, 3)])
def test_constant_image_compresses_far_below_noise(shape):
    flat = np.full(shape, 200, dtype=np.uint8)
    noise = noise_images(shape)
    for measure in (jpeg_bits_per_pixel, png_bits_per_pixel):
        assert (measure(flat) < 0.6 * measure(noise)).all(), measure.__name__


def test_bpp_is_8_bytes_per_pixel_of_a_direct_pil_encode():
    images = noise_images((3, 28, 28, 1))
    images[1] //= 16  # fewer levels: a different, smaller size
    for fmt, measure, options in (("JPEG", jpeg_bits_per_pixel, {"quality": 75}), ("PNG", png_bits_per_pixel, {})):
        expected = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0]).save(buffer, format=fmt, **options)
            expected.append(8 * len(buffer.getvalue()) / (28 * 28))
        got = measure(images)
        assert got.dtype == torch.float32 and got.shape == (3,)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32))


def test_rgb_counts_pixels_not_channels():
    images = noise_images((2, 32, 32, 3))
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="PNG")
    assert png_bits_per_pixel(images)[0].item() == pytest.approx(8 * len(buffer.getvalue()) / (32 * 32))


def test_constant_image_overhead_of_a_grayscale_28px_jpeg():
    """Measured with Pillow 13: a flat 28x28 'L' JPEG at quality 75 is 342 bytes = 3.49 bpp, all of it
    headers and tables (the 16 blocks cost a few bits each); PNG: 79 bytes = 0.81 bpp."""
    jpeg = constant_image_bits_per_pixel((1, 28, 28), "jpeg", 75)
    assert 3.2 < jpeg < 3.8
    assert 0.5 < constant_image_bits_per_pixel((1, 28, 28), "png") < 1.1
    # it is what any flat image costs, whatever its level
    for level in (0, 77, 255):
        flat = np.full((1, 28, 28, 1), level, dtype=np.uint8)
        assert jpeg_bits_per_pixel(flat)[0].item() == pytest.approx(jpeg, rel=0.02)
    assert constant_image_bits_per_pixel((3, 32, 32), "jpeg", 75) > 0


def test_float_model_space_and_uint8_inputs_agree():
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1).requires_grad_()  # never in autograd
    as_uint8 = model_space_to_uint8(x.detach())  # [B, C, H, W] uint8 tensor
    as_numpy = as_uint8.permute(0, 2, 3, 1).numpy()  # [B, H, W, C], the samples.npz layout
    for fmt in ("jpeg", "png"):
        reference = bits_per_pixel(as_numpy, fmt)
        assert torch.equal(bits_per_pixel(x, fmt), reference)
        assert torch.equal(bits_per_pixel(as_uint8, fmt), reference)


def test_higher_jpeg_quality_costs_more_bits():
    images = noise_images((2, 28, 28, 1))
    assert (jpeg_bits_per_pixel(images, quality=95) > jpeg_bits_per_pixel(images, quality=30)).all()


def test_bad_inputs_are_rejected_with_the_expected_layout_named():
    with pytest.raises(ValueError, match="1 \\(grayscale\\) or 3 \\(RGB\\) channels"):
        png_bits_per_pixel(noise_images((2, 8, 8, 2)))
    with pytest.raises(ValueError, match="uint8 numpy array"):
        png_bits_per_pixel(np.zeros((2, 8, 8, 1), dtype=np.float32))
    with pytest.raises(ValueError, match="unknown format"):
        bits_per_pixel(noise_images((1, 8, 8, 1)), "webp")
