"""scripts/estimate_dit_complexity.py and scripts/estimate_training_cost.py against the NanoFlow write-up's
ImageNet-256 figures (dit_compute itself, against torch's FlopCounterMode and the DiT paper: test_dit_compute.py).

What the write-up's numbers allow (reproduced here and in test_dit_compute.py):
- H1024 D20 E16 c2 moew0.5: 14.45 G / 47.48 G forward MACs per image masked / unmasked and 86.72 G /
  284.86 G train FLOPs per image (= 6 x MACs). 14.45 G is 64 backbone tokens of 256, i.e. 75 % masking
  (the write-up's "mask out 75% of tokens"); at 80 % masking it would be 12.3 G. "masked80" / "unmasked20"
  in the reference's preset names count epochs (80 and 20), not mask ratios.
- Stage lengths: 240 masked epochs + 40 unmasked epochs of 1,281,167 images -> 41.3 EFLOPs; measured
  13.6100 + 28.2297 (masked) and 21.9317 (unmasked) H100-hours -> 63.7714 H100-hours, $210.45 at
  $3.30, i.e. ~180 TFLOP/s, ~18 % of the 989 TFLOP/s bf16 dense peak.
- Latent U-Net: 16.4 G train FLOPs/image x 1,281,167 x 400 epochs -> 8.4 EFLOPs, 16.5 H100-hours, $54.45.
"""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dit_compute
import models
import models_dit as md
from build import build_meta_dit
from config import ConfigError
from conftest import ROOT, load_script

complexity_script = load_script("estimate_dit_complexity")
cost_script = load_script("estimate_training_cost")

H1024 = "nanoflow_h1024_d20_e16_c2_moew05"
IMAGENET = 1_281_167


def test_cost_reproduces_the_write_up_h1024_run():
    with torch.device("meta"):
        model = md.DIT_MODELS[H1024]()
    stages = [
        cost_script.check_stage("masked", {"mask_ratio": 0.75, "epochs": 240, "gpu_hours": 41.8397}),
        cost_script.check_stage("unmasked", {"mask_ratio": 0, "epochs": 40, "gpu_hours": 21.9317}),
    ]
    rows = [cost_script.stage_cost(s, dit_compute.complexity(model, s["mask_ratio"])["train_flops"]) for s in stages]
    total = cost_script.total_row(rows, cost_script.H100_BF16_DENSE_TFLOPS)
    assert total["eflops"] == pytest.approx(41.3, rel=0.005)  # "≈ 41.3 EFLOPs"
    assert total["gpu_hours"] == pytest.approx(63.7714, abs=1e-3)
    assert total["usd"] == pytest.approx(210.45, abs=0.01)
    assert [round(r["usd"], 2) for r in rows] == [round(44.91 + 93.16, 2), 72.37]
    assert total["tflops_per_gpu"] == pytest.approx(180, rel=0.01)  # "about 180 TFLOP/s"
    assert total["mfu"] == pytest.approx(0.18, abs=0.005)  # "about 18 % of bf16 dense peak"
    # From an assumed MFU instead of measured hours: 40 % MFU -> 41.3 EFLOPs / (0.4 x 989 TFLOP/s).
    planned = cost_script.stage_cost(cost_script.check_stage("all", {"epochs": 1, "train_gflops": 100}), 100e9, mfu=0.4)
    assert planned["gpu_hours"] == pytest.approx(IMAGENET * 100e9 / (0.4 * 989e12) / 3600)


def test_cost_reproduces_the_write_up_latent_unet_run():
    row = cost_script.stage_cost(
        cost_script.check_stage("unet", {"train_gflops": 16.4, "epochs": 400, "gpu_hours": 16.5}), 16.4e9
    )
    assert row["eflops"] == pytest.approx(8.4, rel=0.005) and row["usd"] == pytest.approx(54.45)
    # Our latent U-Net preset, counted by FlopCounterMode on the meta device: 16.1 G train FLOPs per
    # 4x32x32 latent, 1.8 % under the write-up's 16.4 G (nearest-neighbour upsampling, no transposed convs).
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / "classcond_unet_latent.yaml"))
    with torch.device("meta"):
        unet = models.MODELS[kwargs.pop("name")](**kwargs)
        with FlopCounterMode(display=False) as counter:
            unet(torch.randn(1, 4, 32, 32), torch.rand(1), torch.zeros(1, dtype=torch.long))
    assert 3 * counter.get_total_flops() == pytest.approx(16.4e9, rel=0.03)


def test_clis_print_tables_and_json(capsys):
    assert complexity_script.main(["model=configs/model/dit_smoke.yaml", "breakdown=true"]) == 0
    out = capsys.readouterr().out
    assert "| 0.5 | 8 / 16 |" in out and "| 0 | 16 / 16 |" in out and "mixer_moe_experts" in out
    assert complexity_script.main([f"model={H1024}", "model.moe_weight=1.0", "mask_ratio=0.75", "json=true"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["mask_ratio"] == 0.75 and row["total_params"] > 695_120_720  # the override took effect
    assert (
        cost_script.main(
            [
                "model=nanoflow_h1024_d20",
                "stages.masked.mask_ratio=0.75",
                "stages.masked.epochs=240",
                "stages.masked.gpu_hours=41.8397",
                "stages.unmasked.mask_ratio=0",
                "stages.unmasked.epochs=40",
                "stages.unmasked.gpu_hours=21.9317",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| total |" in out and "| 41.27 |" in out and "| 63.77 |" in out and "210.45" in out
    with pytest.raises(ConfigError, match="stages.x = .*: give exactly one of epochs or images"):
        cost_script.main(["model=nanoflow_h1024_d20", "stages.x.mask_ratio=0"])
    with pytest.raises(ConfigError, match="unknown config key 'stages.x.lr'"):
        cost_script.main(["stages.x.epochs=1", "stages.x.lr=3"])
    with pytest.raises(ConfigError, match="stages.x needs train_gflops when no model is given"):
        cost_script.main(["stages.x.epochs=1"])
    with pytest.raises(ConfigError, match="mask_ratio = 2: must be a ratio in"):
        complexity_script.main(["model=dit_smoke", "mask_ratio=2"])
    with pytest.raises(ConfigError, match="'--json' is not key=value"):
        complexity_script.main(["model=dit_s2", "--json"])
    with pytest.raises(ValueError, match="cannot be trained masked"):
        dit_compute.complexity(build_meta_dit("dit_s2"), 0.5)
