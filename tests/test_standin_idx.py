"""scripts/make_standin_idx.py: the 28x28 stand-in data sets load through the real Fashion-MNIST loader."""

from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
from conftest import load_script

make_standin_idx = load_script("make_standin_idx")


def test_standin_sets_load_through_the_fashion_loader(tmp_path):
    for kind in ("digits28", "shapes28"):
        root = tmp_path / kind
        make_standin_idx.main([f"kind={kind}", f"root={root}", "n_train=30", "n_test=20", "seed=3"])
        train = datasets.load_fashion_mnist(root=str(root), split="train", download=False)
        test = datasets.load_fashion_mnist(root=str(root), split="test", download=False)
        assert train.x.shape == (30, 1, 28, 28) and test.x.shape == (20, 1, 28, 28)
        assert train.x.dtype == torch.uint8 and not train.hflip
        # balanced classes, and real images (not blank, not saturated)
        assert np.bincount(train.y.numpy(), minlength=10).tolist() == [3] * 10
        assert 5 < train.x.float().mean() < 120 and int(train.x.max()) >= 200
    # deterministic given the seed
    again = tmp_path / "again"
    make_standin_idx.main(["kind=digits28", f"root={again}", "n_train=30", "n_test=20", "seed=3"])
    raw = Path("FashionMNIST") / "raw" / "train-images-idx3-ubyte"
    assert (again / raw).read_bytes() == (tmp_path / "digits28" / raw).read_bytes()


def test_bad_keys_are_one_error_naming_the_key(tmp_path):
    from config import ConfigError

    with pytest.raises(ConfigError, match="kind = 'circles' is not allowed; choose one of: digits28, shapes28"):
        make_standin_idx.main(["kind=circles", f"root={tmp_path}"])
    with pytest.raises(ConfigError, match="unknown config key 'n'"):
        make_standin_idx.main(["kind=digits28", f"root={tmp_path}", "n=3"])
    assert list(tmp_path.iterdir()) == []
