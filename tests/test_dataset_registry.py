"""dataset_registry: every config name maps to its loader, build_dataset hands it the device and the
dataset keys, and datasets.DATASET_INFO covers the same names."""

import inspect

import torch

import dataset_registry
import datasets


def test_dataset_info_matches_the_loaders():
    assert set(datasets.DATASET_INFO) == set(dataset_registry.DATASETS)
    digits = datasets.load_digits(split="test")
    assert datasets.DATASET_INFO["digits"] == {"shape": digits.sample_shape, "num_classes": digits.num_classes}
    moons = datasets.load_moons(num_samples=10)
    assert datasets.DATASET_INFO["moons"] == {"shape": moons.sample_shape, "num_classes": moons.num_classes}


def test_build_dataset_passes_the_device_and_keys_to_the_named_loader():
    assert all("device" in inspect.signature(load).parameters for load in dataset_registry.DATASETS.values())
    built = dataset_registry.build_dataset("moons", "cpu", num_samples=12, noise=0.2, data_seed=3)
    direct = datasets.load_moons(device="cpu", num_samples=12, noise=0.2, data_seed=3)
    assert torch.equal(built.x, direct.x) and torch.equal(built.y, direct.y)
    assert not torch.equal(built.x, datasets.load_moons(num_samples=12, noise=0.2, data_seed=4).x)  # keys reach it
    digits = dataset_registry.build_dataset("digits", "cpu", split="test", image_size=8)
    assert digits.sample_shape == (1, 8, 8) and digits.name == "digits"
    assert torch.equal(digits.x, datasets.load_digits(split="test", image_size=8).x)
