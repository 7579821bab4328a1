"""experiments/jpeg_compression_grpo/digit_transforms.py: the JPEG / classifier-FD frontiers of real images."""

import importlib.util
import itertools

import pytest
import torch

from classifier import train_classifier
from config import ConfigError
from conftest import ROOT, load_script

spec = importlib.util.spec_from_file_location(
    "digit_transforms", ROOT / "experiments" / "jpeg_compression_grpo" / "digit_transforms.py"
)
digit_transforms = importlib.util.module_from_spec(spec)
spec.loader.exec_module(digit_transforms)


def test_cheapest_per_class_keeps_the_lowest_bpp_of_each_label():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=generator)
    bpp = torch.rand(200, generator=generator)
    keep = digit_transforms.cheapest_per_class(bpp, labels, 0.3)
    for label in range(4):
        rows = (labels == label).nonzero().squeeze(1)
        kept = [i for i in keep.tolist() if labels[i] == label]
        assert len(kept) == -(-3 * len(rows) // 10)  # ceil(0.3 n)
        assert max(bpp[kept]) < min(bpp[[i for i in rows.tolist() if i not in kept]])
    assert digit_transforms.cheapest_per_class(bpp, labels, 1.0).sort().values.tolist() == list(range(200))


def test_pareto_front_is_exactly_the_undominated_points():
    generator = torch.Generator().manual_seed(1)
    cost, distance = torch.rand(60, generator=generator).tolist(), torch.rand(60, generator=generator).tolist()
    front = digit_transforms.pareto_front(cost, distance)
    dominated = {i for i, j in itertools.permutations(range(60), 2) if cost[j] <= cost[i] and distance[j] < distance[i]}
    assert set(front) == set(range(60)) - dominated
    assert [cost[i] for i in front] == sorted(cost[i] for i in front)


def test_balanced_draw_takes_the_same_count_of_each_label_without_repeats():
    labels = torch.arange(10).repeat_interleave(7)
    pick = digit_transforms.balanced_draw(labels, 50, torch.Generator().manual_seed(0))
    assert len(set(pick.tolist())) == 50
    assert torch.bincount(labels[pick]).tolist() == [5] * 10


def test_the_three_tables_on_a_small_stand_in(tmp_path, capsys):
    root = tmp_path / "digits28"
    load_script("make_standin_idx").main(["kind=digits28", f"root={root}", "n_train=60", "n_test=40", "seed=0"])
    judge = tmp_path / "judge.safetensors"
    train_classifier(
        "fashion_mnist", judge, epochs=1, width=4, device="cpu", root=str(root), download=False, log=lambda _: None
    )
    keys = [f"root={root}", f"anchor={judge}", f"judge={judge}", "n=40", "fd_samples=20"]
    assert digit_transforms.cli(keys) == 0
    out = capsys.readouterr().out
    assert "| (the data) |" in out and "| 0.99 |" in out
    assert "| one transform for all" in out and "\n| 1, 1, 1, 0, 0 |" in out  # the identity: the least FD
    identity_rows = [line for line in out.splitlines() if line.startswith("| 1, 1, 1, 0, 0; ")]
    assert len(identity_rows) == len(digit_transforms.FRACTIONS)
    assert identity_rows[0].split(" | ")[2] == "+0.0 %"  # q = 1 of the untransformed data is the baseline
    changes = [float(row.split(" | ")[2].rstrip(" %")) for row in identity_rows]
    assert changes == sorted(changes, reverse=True) and changes[-1] < 0  # cheaper as q shrinks


def test_bad_keys_are_one_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="root = None: is required"):
        digit_transforms.cli(["anchor=a", "judge=b"])
    with pytest.raises(ConfigError, match="fd_samples = 10: must be >= 20"):
        digit_transforms.cli([f"root={tmp_path}", "anchor=a", "judge=b", "fd_samples=10"])
