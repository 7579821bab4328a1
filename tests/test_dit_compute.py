"""dit_compute: parameter counts (total and token-average active) and analytic forward / training FLOPs,
against the real models under torch's FlopCounterMode, the DiT paper and the NanoFlow write-up's H1024
figures (695.1M / 314.0M parameters; 14.45 G / 47.48 G forward MACs per image masked 75 % / unmasked).
The scripts built on it are tested in test_estimators.py."""

import pytest
import torch
from test_models_dit import H1024, TINY, tiny
from torch.utils.flop_counter import FlopCounterMode

import dit_compute
import models_dit as md
from build import build_meta_dit

# DiT paper (Peebles & Xie 2023), Table 4 / repo: learn-sigma outputs and a trainable-shaped pos_embed
# count there; here the output has C channels and the sin-cos table is a buffer, hence < 0.5 % lower.
PAPER = {"dit_s2": 33.0e6, "dit_b2": 130.5e6, "dit_l2": 458.1e6, "dit_xl2": 675.1e6}


@pytest.mark.parametrize("name", PAPER)
def test_dit_parameter_counts_match_the_paper(name):
    counts = dit_compute.dit_parameter_counts(name)
    assert counts["active"] == counts["total"]
    assert abs(counts["total"] / PAPER[name] - 1) < 0.01, counts


def test_h1024_counts_match_the_write_up():
    # Write-up: 695.1M total / 314.0M token-average active. Built on the meta device (no allocation).
    counts = dit_compute.dit_parameter_counts(H1024)
    assert counts["total"] == 695_120_720 and counts["active"] == 314_011_152
    assert abs(counts["total"] / 695.1e6 - 1) < 0.001 and abs(counts["active"] / 314.0e6 - 1) < 0.001
    assert dit_compute.dit_parameter_counts("nanoflow_h1024_d20") == counts


@pytest.mark.parametrize(
    "change",
    [
        dict(moe_last=False),  # dense last block: -8.5 % total
        dict(mixer_hidden_size=None),  # 1024-wide mixer: +6.0 % / +5.1 %
        dict(mlp_ratio=(2.0, 4.0)),  # MLP ratio 2 -> 4: +19.6 % / +10.0 %
        dict(mlp_ratio=4.0, attn_scale=1.0),  # no layerwise scaling
        dict(moe_weight=1.0),  # full-width experts: +62.6 % / +17.3 %
    ],
)
def test_other_readings_of_the_name_miss_the_write_up(change):
    counts = dit_compute.dit_parameter_counts(H1024, **change)
    assert max(abs(counts["total"] / 695.1e6 - 1), abs(counts["active"] / 314.0e6 - 1)) > 0.01, change


def test_active_count_is_total_minus_unused_experts():
    model = tiny(depth=4, mixer_depth=1, num_experts=4, capacity_factor=2.0)
    moe = model.blocks[1].mlp
    total = sum(p.numel() for p in model.parameters())
    assert dit_compute.active_parameters(model) == total - 2 * moe.expert_parameters()
    meta = dit_compute.dit_parameter_counts(
        "class_cond_dit", num_classes=5, **{**TINY, "depth": 4, "mixer_depth": 1, "num_experts": 4}
    )
    assert meta == {"total": total, "active": total - 2 * moe.expert_parameters()}


# Small models covering every counted part. Their MoE layers' per-sample capacity c N / E is an integer
# (N = tokens per image, all or the kept ones), where the analytic token average is exact.
SMALL = {
    "dense_sincos": dict(depth=3, hidden_size=64, num_heads=4, input_size=8),
    "masked_moe_layerwise_narrow_mixer": dict(
        depth=6,
        hidden_size=64,
        num_heads=4,
        input_size=8,
        mixer_depth=2,
        mixer_hidden_size=32,
        mask_ratio=0.5,
        num_experts=4,
        moe_last=True,
        moe_weight=0.5,
        mlp_ratio=[1.0, 4.0],
        attn_scale=[0.5, 1.0],
        width_multiple=16,
        pos_embed="rope",
    ),
    "jit_overlap_swiglu_moe_masked": dict(
        depth=2,
        hidden_size=64,
        num_heads=4,
        input_size=16,
        in_channels=3,
        patch_size=4,
        patch_stride=2,
        pos_embed="rope",
        swiglu=True,
        qk_norm=True,
        norm="rmsnorm",
        num_experts=2,
        moe_every=1,
        mixer_depth=1,
        mask_ratio=0.25,
    ),
}


def counted_flops(model, batch, mask_ratio, backward=False, device="cpu"):
    """FlopCounterMode total of one forward (and backward) of the real model."""
    g = torch.Generator(device=device).manual_seed(0) if device != "meta" else None
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=device, generator=g)
    t, y = torch.rand(batch, device=device, generator=g), torch.zeros(batch, dtype=torch.long, device=device)
    model.train(mask_ratio > 0 or backward)
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, y, mask_ratio=mask_ratio)
        if backward:
            out.float().square().mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", SMALL)
def test_analytic_flops_match_flop_counter_on_cpu(name):
    torch.manual_seed(0)
    model = md.ClassCondDiT(num_classes=10, **SMALL[name])
    for ratio in sorted({0.0, model.mask_ratio}):
        stage = dit_compute.complexity(model, ratio)
        batch = 4
        assert counted_flops(model, batch, ratio) == pytest.approx(batch * stage["forward_flops"], rel=0.05)
        # training = 3 x forward: forward + activation and weight gradients (measured within 1 % here)
        train = counted_flops(model, batch, ratio, backward=True)
        assert train == pytest.approx(batch * stage["train_flops"], rel=0.05)


def test_h1024_full_size_on_the_meta_device_and_the_write_up_figures():
    with torch.device("meta"):
        model = md.DIT_MODELS[H1024]()
    masked, unmasked = (dit_compute.complexity(model, r) for r in (0.75, 0.0))
    # FlopCounterMode on the meta device runs the real 695M forward without memory or compute.
    for stage in (masked, unmasked):
        counted = counted_flops(model, 2, stage["mask_ratio"], device="meta")
        assert counted == pytest.approx(2 * stage["forward_flops"], rel=0.01)
    assert masked["backbone_tokens"] == 64 and unmasked["backbone_tokens"] == 256
    # Write-up: 14.45 G / 47.48 G MACs, 86.72 G / 284.86 G train FLOPs per image (we run the final layer
    # on all 256 tokens, the reference on the kept ones: +0.02 % masked).
    assert masked["forward_macs"] == pytest.approx(14.45e9, rel=1e-3)
    assert unmasked["forward_macs"] == pytest.approx(47.48e9, rel=1e-3)
    assert masked["train_flops"] == pytest.approx(86.72e9, rel=1e-3)
    assert unmasked["train_flops"] == pytest.approx(284.86e9, rel=1e-3)
    assert masked["total_params"] == 695_120_720 and masked["active_params"] == 314_011_152
    # 80 % masking (51 kept tokens) does not give the write-up's masked figure.
    assert dit_compute.complexity(model, 0.8)["forward_macs"] < 12.5e9


# DiT paper (Peebles & Xie 2023), Table 1 "Gflops" (fvcore counts, i.e. MACs) per 256x256 image.
PAPER_GMACS = {"dit_s2": 6.06, "dit_b2": 23.01, "dit_l2": 80.71, "dit_xl2": 118.64}


@pytest.mark.parametrize("name", PAPER_GMACS)
def test_dit_compute_matches_the_paper(name):
    stage = dit_compute.complexity(build_meta_dit(name))
    assert stage["forward_macs"] / 1e9 == pytest.approx(PAPER_GMACS[name], rel=0.01)
