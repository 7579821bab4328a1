import pytest
import torch
import torch.nn.functional as F

import flow
import models_dit as md

TINY = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=4)

CONFIGS = {
    "sincos": {},
    "rope_jit": dict(pos_embed="rope", swiglu=True, norm="rmsnorm", qk_norm=True),
    "overlap": dict(input_size=10, patch_size=4, patch_stride=2),
    "overlap_rope": dict(input_size=10, patch_size=4, patch_stride=3, pos_embed="rope"),
    "moe_layerwise_masked": dict(depth=4, mixer_depth=1, mask_ratio=0.5, num_experts=4, moe_weight=0.5,
                                 mlp_ratio=(2.0, 4.0), attn_scale=(0.5, 1.0)),
    "moe_swiglu_rope_masked": dict(depth=4, mixer_depth=1, mask_ratio=0.75, num_experts=4, swiglu=True,
                                   pos_embed="rope"),
}


def tiny(num_classes=5, seed=0, **overrides):
    torch.manual_seed(seed)
    return md.ClassCondDiT(num_classes=num_classes, **{**TINY, **overrides})


def perturb(model, std=0.1, seed=1):
    """Move every parameter off its init (zero-init layers included) so all paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


def inputs(model, batch=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    s = model.input_size
    x = torch.randn(batch, model.in_channels, s, s, generator=g)
    return x, torch.rand(batch, generator=g), torch.randint(0, model.num_classes, (batch,), generator=g)


# --- shapes, init, conditioning ---------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_output_shape_dtype_and_zero_init(name):
    model = tiny(**CONFIGS[name])
    x, t, y = inputs(model)
    for train in (True, False):
        model.train(train)
        out = model(x, t, y, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero + zero final layer


@pytest.mark.parametrize("name", ["sincos", "rope_jit", "overlap"])
def test_conditioning_and_null_label(name):
    model = perturb(tiny(**CONFIGS[name])).eval()
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert torch.isfinite(out).all()
    null = torch.full_like(y, model.num_classes)
    assert torch.equal(model(x, t, None), model(x, t, null))  # None is the learned null label
    assert not torch.allclose(out, model(x, t, null))
    assert not torch.allclose(out, model(x, t, (y + 1) % model.num_classes))
    assert not torch.allclose(out, model(x, 1 - t, y))
    # Unconditional DiT ignores y.
    plain = perturb(md.DiT(**TINY)).eval()
    assert torch.equal(plain(x, t, y), plain(x, t))


def test_layerwise_scaling_and_moe_placement():
    model = tiny(depth=6, mixer_depth=1, num_experts=4, moe_every=2, mlp_ratio=(2.0, 4.0), attn_scale=(0.5, 1.0))
    heads = [b.attn.num_heads for b in model.blocks]
    assert heads[0] == 2 and heads[-1] == 4 and heads == sorted(heads)
    assert all(b.attn.head_dim == 8 for b in model.blocks)  # head_dim fixed, the head count ramps
    dense = [b.mlp.fc2.in_features for b in model.blocks if isinstance(b.mlp, md.Mlp)]
    assert dense[0] == 64 and dense[-1] == 128 and dense == sorted(dense)
    # every 2nd block after the mixer, never the last: blocks 1, 3 (5 is last)
    assert model.moe_blocks == [1, 3]
    assert [isinstance(b.mlp, md.ExpertChoiceMoE) for b in model.blocks] == [False, True, False, True, False, False]
    assert model.blocks[3].mlp.w2.shape[1] == round(32 * 3.2)  # moe_weight 1: expert = dense width there


def test_registry_builds_every_name_on_meta():
    for name, ctor in md.DIT_MODELS.items():
        with torch.device("meta"):
            model = ctor()
        assert all(p.device.type == "meta" for p in model.parameters()), name


# --- patches ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,patch,stride", [(8, 2, 2), (10, 4, 2), (10, 4, 3), (16, 6, 5)])
def test_patchify_unpatchify_is_identity(size, patch, stride):
    x = torch.randn(2, 3, size, size)
    patches = md.patchify(x, patch, stride)
    n = md.grid_size(size, patch, stride)
    assert patches.shape == (2, n * n, 3 * patch * patch)
    torch.testing.assert_close(md.unpatchify(patches, (size, size), patch, stride), x)


def test_unpatchify_without_normalisation_would_be_wrong_and_bad_sizes_raise():
    x = torch.ones(1, 1, 10, 10)
    summed = F.fold(md.patchify(x, 4, 2).transpose(1, 2), (10, 10), 4, stride=2)
    assert summed.max() == 4  # interior pixels are covered by 4 patches
    with pytest.raises(ValueError):
        md.grid_size(10, 4, 4)


# --- expert-choice MoE ------------------------------------------------------------------------------


def loop_reference(moe, x):
    """Slow per-expert MoE: routing and FFN one expert at a time, accumulation by indexing."""
    x = x.reshape(-1, x.shape[-1])
    scores = moe.router(x).float().softmax(dim=-1)
    k = moe.capacity(x.shape[0])
    out = torch.zeros_like(x)
    for e in range(moe.num_experts):
        gate, idx = scores[:, e].topk(k)
        h = x[idx] @ moe.w1[e] + moe.b1[e]
        if moe.swiglu:
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h, approximate="tanh")
        y = h @ moe.w2[e] + moe.b2[e]
        out = out.index_add(0, idx, gate[:, None] * y)
    return out


@pytest.mark.parametrize("swiglu", [False, True])
def test_moe_dispatch_matches_loop_reference_forward_and_backward(swiglu):
    torch.manual_seed(0)
    moe = md.ExpertChoiceMoE(dim=16, hidden=24, num_experts=4, capacity_factor=2.0, swiglu=swiglu).double()
    with torch.no_grad():
        moe.b1.normal_()
        moe.b2.normal_()
    x = torch.randn(3, 10, 16, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 10, 16, dtype=torch.float64)

    fast = moe(x)
    fast_grads = torch.autograd.grad(fast, [x, *moe.parameters()], grad_out)
    slow = loop_reference(moe, x).view_as(x)
    slow_grads = torch.autograd.grad(slow, [x, *moe.parameters()], grad_out)

    torch.testing.assert_close(fast, slow)
    for (name, _), a, b in zip([("x", None), *moe.named_parameters()], fast_grads, slow_grads):
        torch.testing.assert_close(a, b, msg=name)
    assert fast_grads[1].abs().sum() > 0  # the router learns through the gates


def test_every_expert_takes_exactly_its_capacity_and_load_stats():
    torch.manual_seed(0)
    moe = md.ExpertChoiceMoE(dim=8, hidden=16, num_experts=4, capacity_factor=2.0)
    x = torch.randn(2, 12, 8)
    gates, index = moe.route(x.reshape(-1, 8))
    assert index.shape == (4, moe.capacity(24)) == (4, 12)  # c * T / E = 2 * 24 / 4
    assert all(len(set(row.tolist())) == 12 for row in index)  # distinct tokens per expert
    assert torch.isfinite(gates).all() and (gates > 0).all()
    moe(x)
    assert moe.load.shape == (3,) and torch.isclose(moe.load.sum(), torch.tensor(1.0))
    picks = torch.bincount(index.flatten(), minlength=24)
    assert moe.load[0] == (picks == 0).float().mean()
    assert (picks * 1.0).mean() == 2.0  # a token meets c experts on average


# --- deferred masking -------------------------------------------------------------------------------


MASKED = dict(depth=4, mixer_depth=1, mask_ratio=0.5, num_experts=4)


@pytest.mark.parametrize("overrides", [{}, dict(pos_embed="rope")])
def test_mask_ratio_zero_is_the_dense_model(overrides):
    model = perturb(tiny(**{**MASKED, **overrides}))
    x, t, y = inputs(model)
    model.train()
    out, keep = model(x, t, y, mask_ratio=0.0, generator=torch.Generator().manual_seed(0), return_mask=True)
    assert keep is None
    assert torch.equal(out, model.eval()(x, t, y))  # eval never masks either


def test_same_generator_seed_gives_same_mask():
    model = perturb(tiny(**MASKED)).train()
    x, t, y = inputs(model)

    def run(seed):
        return model(x, t, y, generator=torch.Generator().manual_seed(seed), return_mask=True)

    (out_a, keep_a), (out_b, keep_b), (_, keep_c) = run(7), run(7), run(8)
    assert torch.equal(keep_a, keep_b) and torch.equal(out_a, out_b)
    assert not torch.equal(keep_a, keep_c)
    assert keep_a.shape == (3, 16) and (keep_a.sum(1) == 8).all()  # 16 tokens, half kept per sample
    assert not torch.equal(keep_a[0], keep_a[1])  # a fresh subset per sample


@pytest.mark.parametrize("overrides", [{}, dict(pos_embed="rope", swiglu=True, qk_norm=True)])
def test_masked_tokens_get_no_gradient_from_the_masked_loss(overrides):
    model = perturb(tiny(**{**MASKED, **overrides})).train()
    x1, t, y = inputs(model)
    eps = torch.randn_like(x1)
    path = flow.make_path("condot")
    x_t, _ = path.sample(x1, eps, t)
    mixed = {}

    def keep_mixer_output(module, args, output):
        output.retain_grad()
        mixed["h"] = output

    model.blocks[0].register_forward_hook(keep_mixer_output)
    out, keep = model(x_t, t, y, generator=torch.Generator().manual_seed(3), return_mask=True)
    mask = model.loss_mask(keep, x1.shape[-2:])
    assert mask.shape == (3, 1, 8, 8)
    # Non-overlapping 2x2 patches: the pixel mask is the token mask, upsampled.
    assert torch.equal(mask[:, 0], keep.view(3, 4, 4).float().repeat_interleave(2, 1).repeat_interleave(2, 2))
    loss, _ = flow.flow_matching_loss(path, out, x1, eps, x_t, t, mask=mask)
    loss.backward()
    grad = mixed["h"].grad  # d loss / d tokens after the patch mixer: [B, N, D]
    assert torch.equal(grad[~keep], torch.zeros_like(grad[~keep]))
    assert (grad[keep].abs().sum(-1) > 0).all()
    assert torch.equal(model.mask_token.grad, torch.zeros_like(model.mask_token))


def test_no_mixer_masked_pixels_get_no_input_gradient():
    model = perturb(tiny(depth=3, mixer_depth=0, mask_ratio=0.5)).train()
    x, t, y = inputs(model)
    x.requires_grad_(True)
    out, keep = model(x, t, y, generator=torch.Generator().manual_seed(0), return_mask=True)
    mask = model.loss_mask(keep, (8, 8))
    (mask * out).square().sum().backward()
    assert torch.equal(x.grad * (1 - mask), torch.zeros_like(x.grad))
    assert (x.grad * mask).abs().sum() > 0


def test_overlapping_loss_mask_excludes_pixels_next_to_dropped_tokens():
    model = tiny(**CONFIGS["overlap"], mixer_depth=1, mask_ratio=0.5)
    keep = torch.ones(1, 16, dtype=torch.bool)
    keep[0, 5] = False  # token (1, 1) covers pixels 2..5 in both directions
    mask = model.loss_mask(keep, (10, 10))[0, 0]
    assert mask[2:6, 2:6].sum() == 0 and mask.sum() == 100 - 16


# --- parameter counts -------------------------------------------------------------------------------

# DiT paper (Peebles & Xie 2023), Table 4 / repo: learn-sigma outputs and a trainable-shaped pos_embed
# count there; here the output has C channels and the sin-cos table is a buffer, hence < 0.5 % lower.
PAPER = {"dit_s2": 33.0e6, "dit_b2": 130.5e6, "dit_l2": 458.1e6, "dit_xl2": 675.1e6}


@pytest.mark.parametrize("name", PAPER)
def test_dit_parameter_counts_match_the_paper(name):
    counts = md.dit_parameter_counts(name)
    assert counts["active"] == counts["total"]
    assert abs(counts["total"] / PAPER[name] - 1) < 0.01, counts


def test_h1024_counts_against_the_write_up():
    # The write-up gives 695.1M total / 314.0M token-average active but not the layerwise endpoints, the
    # MoE placement nor the meaning of "moew"; with our reading (see NANOFLOW_SIZES) we get
    # 678.3M / 319.5M, i.e. -2.4 % / +1.7 %. Pinned here so a change to the preset is noticed.
    counts = md.dit_parameter_counts("dit_h1024_d20")
    assert counts["total"] == 678_261_729
    assert round(counts["active"]) == 319_457_297
    assert abs(counts["total"] / 695.1e6 - 1) < 0.03 and abs(counts["active"] / 314.0e6 - 1) < 0.03


def test_active_count_is_total_minus_unused_experts():
    model = tiny(depth=4, mixer_depth=1, num_experts=4, capacity_factor=2.0)
    moe = model.blocks[1].mlp
    total = sum(p.numel() for p in model.parameters())
    assert md.active_parameters(model) == total - 2 * moe.expert_parameters()
    meta = md.dit_parameter_counts("class_cond_dit", num_classes=5, **{**TINY, "depth": 4, "mixer_depth": 1,
                                                                        "num_experts": 4})
    assert meta == {"total": total, "active": total - 2 * moe.expert_parameters()}


def test_bf16_autocast_masked_moe_forward_backward_and_load_stats():
    model = perturb(tiny(**CONFIGS["moe_swiglu_rope_masked"])).train()
    x, t, y = inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, keep = model(x, t, y, generator=torch.Generator().manual_seed(0), return_mask=True)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    load = model.moe_load()
    assert list(load) == model.moe_blocks == [1] and torch.isclose(load[1].sum(), torch.tensor(1.0))


def test_dense_dit_has_no_mask_token_and_refuses_to_mask():
    model = tiny().train()
    assert model.mask_token is None  # DiT-S/2 etc. carry no unused parameter
    x, t, y = inputs(model)
    with pytest.raises(ValueError, match="without masking"):
        model(x, t, y, mask_ratio=0.5)
