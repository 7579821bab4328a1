"""image_folder: the ADM centre crop, listing a folder of class sub-folders (or a flat folder), and
ImageFolderDataset's batches, from PNGs written here."""

import os

import numpy as np
import pytest
import torch

import dataset_registry
import datasets
import image_folder
from conftest import write_pngs


def test_center_crop_matches_adm_and_folder_listing(tmp_path):
    from PIL import Image

    for w, h in (45, 37), (80, 70), (300, 31), (64, 64), (700, 520):
        image = Image.new("RGB", (w, h), (10, 200, 30))
        arr = image_folder.center_crop_arr(image, 32)
        assert (
            arr.shape == (32, 32, 3) and arr.dtype == np.uint8 and (np.abs(arr.astype(int) - [10, 200, 30]) <= 1).all()
        )
    # ADM keeps the centre: a left/right split image cropped from a wide canvas stays split in the middle.
    wide = np.zeros((40, 120, 3), dtype=np.uint8)
    wide[:, 60:] = 255
    arr = image_folder.center_crop_arr(Image.fromarray(wide), 32)
    assert (arr[:, :14] == 0).all() and (arr[:, 18:] == 255).all()

    write_pngs(tmp_path / "f", {"b": [(20, 20)], "a": [(30, 20), (20, 30)], "a/nested": [(16, 16)]})
    (tmp_path / "f" / "a" / "readme.txt").write_text("not an image")
    paths, labels, names = image_folder.list_image_folder(tmp_path / "f")
    assert names == ("a", "b") and labels.tolist() == [0, 0, 0, 1]
    assert paths == ["a/0.png", "a/1.png", os.path.join("a", "nested", "0.png"), "b/0.png"]
    (tmp_path / "f" / "c_empty").mkdir()
    with pytest.raises(
        datasets.DatasetNotFoundError, match=r"1 of 3 class folders hold no images \(c_empty\).*allow_empty=true"
    ):
        image_folder.list_image_folder(tmp_path / "f")
    _, labels, names = image_folder.list_image_folder(tmp_path / "f", allow_empty=True)
    assert names == ("a", "b", "c_empty") and labels.tolist() == [0, 0, 0, 1]  # labels unchanged, class kept
    # A flat folder (CelebA-HQ style) is one class named after it.
    write_pngs(tmp_path, {"flat": [(20, 20), (24, 24)]})
    paths, labels, names = image_folder.list_image_folder(tmp_path / "flat")
    assert paths == ["0.png", "1.png"] and labels.tolist() == [0, 0] and names == ("flat",)
    (tmp_path / "none").mkdir()
    with pytest.raises(datasets.DatasetNotFoundError, match="holds no images and no class sub-folders"):
        image_folder.list_image_folder(tmp_path / "none")
    assert len(image_folder.list_image_folder(tmp_path / "none", allow_empty=True)[0]) == 0
    with pytest.raises(datasets.DatasetNotFoundError, match="does not exist"):
        image_folder.list_image_folder(tmp_path / "missing")


@pytest.mark.parametrize("cache_bytes", [2**30, 0], ids=["in_memory_cache", "decode_every_batch"])
def test_image_folder_dataset_batches(tmp_path, cache_bytes):
    write_pngs(tmp_path / "train", {"cat": [(45, 37), (80, 70), (33, 50)], "dog": [(64, 64), (40, 90)]})
    data = dataset_registry.build_dataset(
        "imagefolder",
        "cpu",
        root=str(tmp_path),
        split="train",
        image_size=16,
        hflip=True,
        cache_bytes=cache_bytes,
        workers=2,
    )
    assert len(data) == 5 and data.sample_shape == (3, 16, 16) and data.num_classes == 2
    assert (
        data.class_names == ("cat", "dog") and data.name == "imagefolder" and (data.cache is None) == (cache_bytes == 0)
    )
    crops = torch.stack(
        [torch.from_numpy(image_folder.load_image(tmp_path / "train" / p, 16)).permute(2, 0, 1) for p in data.paths]
    )
    index = torch.tensor([4, 0, 0, 2, 4, 1, 3])  # repeats: each distinct image decoded once
    x, y = data.batch(index)
    assert x.dtype == torch.float32 and x.shape == (7, 3, 16, 16) and y.tolist() == [1, 0, 0, 0, 1, 0, 1]
    assert torch.equal(x, datasets.uint8_to_model_space(crops[index]))  # no generator: no flips
    if data.cache is not None:
        assert data.cached.all() and torch.equal(data.cache, crops)
    index = torch.arange(5).repeat(20)
    a, _ = data.batch(index, torch.Generator().manual_seed(1))
    assert torch.equal(a, data.batch(index, torch.Generator().manual_seed(1))[0])
    plain = datasets.uint8_to_model_space(crops[index])
    flipped = (a == plain.flip(-1)).flatten(1).all(1)
    assert (flipped | (a == plain).flatten(1).all(1)).all() and 20 < int(flipped.sum()) < 80


def test_image_folder_unreadable_image_names_the_file(tmp_path):
    # A file that is no image is found when the folder is opened (before any run directory exists), not
    # in the first batch that draws it.
    write_pngs(tmp_path, {"a": [(20, 20)]})
    (tmp_path / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(datasets.DatasetNotFoundError, match=r"1 of 2 files are not readable images: a/1.png"):
        image_folder.load_imagefolder(root=str(tmp_path), image_size=16)
    # A PNG whose header reads but whose pixels are cut off is named when a batch decodes it.
    good = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "a" / "1.png").write_bytes(good[: len(good) // 2])
    data = image_folder.load_imagefolder(root=str(tmp_path), image_size=16)
    with pytest.raises(datasets.DatasetNotFoundError, match=r"image '.*a/1.png' is unreadable"):
        data.batch(torch.tensor([0, 1]))
