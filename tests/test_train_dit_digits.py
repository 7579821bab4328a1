"""The digits transformer presets (experiments/dit_digits.md) compose and train: dense DiT, JiT
(x-prediction), and the masked MoE pretrain -> unmasked fine-tune pair in miniature."""

import json

import pytest

import checkpoint as ckpt
from config import load_config
from conftest import run_train

TWO_STEPS = [
    "training.max_steps=2",
    "training.num_eval_samples=10",
    "training.checkpoint_every=2",
    "training.log_every=1",
    "solver.num_steps=2",
    "device=cpu",
]


@pytest.mark.slow  # builds and trains each transformer preset; keeps the fast suite under 10 minutes
@pytest.mark.parametrize(
    "preset, prediction, masked",
    [
        ("digits_dit", "velocity", False),
        ("digits_jit", "data", False),
        ("digits_dit_moe_masked80", "velocity", True),
    ],
)
def test_digits_transformer_preset_trains_two_steps(tmp_path, preset, prediction, masked):
    cfg = load_config([f"experiment={preset}"])
    assert cfg.dataset.name == "digits" and cfg.model.name == "class_cond_dit" and cfg.model.num_classes == 10
    assert cfg.flow.prediction == prediction and (cfg.model.get("mask_ratio", 0.0) > 0) == masked
    assert run_train(tmp_path, f"experiment={preset}", *TWO_STEPS) == 0
    assert ckpt.resolve_checkpoint(tmp_path).name == "step_0000002"
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(d["train/loss"] == d["train/loss"] for d in logged if "train/loss" in d)  # finite, not NaN
    if masked:  # expert-choice load is logged for the MoE blocks
        assert any("moe/tokens_picked_once" in d for d in logged)


@pytest.mark.slow  # two in-process runs; ~18 s on the shared 2-core machine
def test_digits_moe_unmasked_stage_starts_from_the_masked_stage(tmp_path, capsys):
    stage1 = tmp_path / "masked"
    assert run_train(stage1, "experiment=digits_dit_moe_masked80", *TWO_STEPS) == 0
    capsys.readouterr()
    cfg = load_config(["experiment=digits_dit_moe_unmasked20", f"training.init.checkpoint={stage1}"])
    assert cfg.model.mask_ratio == 0.0 and cfg.training.init.model == "ema" and not cfg.training.init.step
    stage2 = tmp_path / "unmasked"
    assert (
        run_train(stage2, "experiment=digits_dit_moe_unmasked20", f"training.init.checkpoint={stage1}", *TWO_STEPS) == 0
    )
    out = capsys.readouterr().out
    assert "initialised from" in out and "model <- ema, ema <- ema" in out, out
    assert ckpt.resolve_checkpoint(stage2).name == "step_0000002"
