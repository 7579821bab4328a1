"""Compressed size of images in bits per pixel, for the compressibility reward and as a metric.

bpp = 8 * encoded bytes / (H * W): per *pixel*, not per channel, so a 3-channel image is not
divided by 3 (an RGB and a grayscale image of equal size and detail have comparable file sizes
per pixel, not per channel). The size includes the format's fixed overhead (headers, Huffman and
quantisation tables for JPEG; signature, IHDR, IEND and zlib framing for PNG), which is large at
these sizes: a constant grayscale 28x28 JPEG is already ~3.5 bpp. `constant_image_bits_per_pixel`
gives that floor, so callers can report payload bpp = total - constant.

Encoding is PIL, in memory, one image at a time (PIL has no batched encoder). Inputs are detached
and copied to the CPU first: these numbers are never differentiated, only used as rewards/metrics.
"""

import functools
import io

import numpy as np
import torch
from PIL import Image

FORMATS = ("jpeg", "png")


def to_uint8_nhwc(images) -> np.ndarray:
    """Images -> uint8 numpy [B, H, W, C] with C in {1, 3}.

    Accepts a numpy uint8 array [B, H, W, C] (the layout of samples.npz), or a torch tensor
    [B, C, H, W]: float in [-1, 1] (model space; rounded as `datasets.model_space_to_uint8`, the
    same mapping used to save samples) or uint8 0..255 (dataset storage).
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected an image tensor [B, C, H, W], got shape {tuple(images.shape)}")
        images = images.detach()
        if images.dtype != torch.uint8:
            from datasets import model_space_to_uint8

            images = model_space_to_uint8(images)
        array = images.cpu().permute(0, 2, 3, 1).contiguous().numpy()
    elif isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected a uint8 numpy array [B, H, W, C], got {images.dtype} {images.shape}")
        array = np.ascontiguousarray(images)
    else:
        raise TypeError(f"expected a torch tensor [B, C, H, W] or a uint8 numpy array [B, H, W, C], got {type(images)}")
    if array.shape[-1] not in (1, 3):
        raise ValueError(f"images need 1 (grayscale) or 3 (RGB) channels, got {array.shape[-1]} in shape {array.shape}")
    return array


def encode(image: np.ndarray, fmt: str, quality: int = 75) -> bytes:
    """One uint8 [H, W, C] image -> its JPEG / PNG file bytes ('L' for C = 1, 'RGB' for C = 3).

    JPEG: PIL's defaults at `quality` (4:2:0 chroma subsampling for RGB, standard tables).
    PNG: PIL's defaults (zlib level 6, no optimize pass); `quality` is ignored.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    # fromarray picks 'L' for a 2-D uint8 array and 'RGB' for [H, W, 3]
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buffer = io.BytesIO()
    if fmt == "jpeg":
        pil.save(buffer, format="JPEG", quality=quality)
    else:
        pil.save(buffer, format="PNG")
    return buffer.getvalue()


def bits_per_pixel(images, fmt: str, quality: int = 75) -> torch.Tensor:
    """Images (see `to_uint8_nhwc`) -> encoded size in bits per pixel [B] float32 on the CPU."""
    array = to_uint8_nhwc(images)
    pixels = array.shape[1] * array.shape[2]
    sizes = [len(encode(image, fmt, quality)) for image in array]
    # float32: the reward is combined with float32 advantages, and MPS has no float64
    return torch.tensor(sizes, dtype=torch.float64).mul_(8 / pixels).float()


def jpeg_bits_per_pixel(images, quality: int = 75) -> torch.Tensor:
    """JPEG size at `quality` in bits per pixel: [B] float32 (CPU)."""
    return bits_per_pixel(images, "jpeg", quality)


def png_bits_per_pixel(images) -> torch.Tensor:
    """PNG size in bits per pixel: [B] float32 (CPU)."""
    return bits_per_pixel(images, "png")


@functools.lru_cache(maxsize=64)
def constant_image_bits_per_pixel(shape: tuple[int, int, int], fmt: str, quality: int = 75) -> float:
    """bpp of a constant mid-gray image of sample shape (C, H, W): the encoder's fixed overhead.

    The JPEG size of a flat image does not depend on its level (one DC coefficient per block, all
    AC zero); PNG's barely does. payload bpp = bpp - this is what the image content costs.
    """
    channels, height, width = (int(s) for s in shape)
    flat = np.full((height, width, channels), 128, dtype=np.uint8)
    return 8 * len(encode(flat, fmt, quality)) / (height * width)
