import pytest
import torch
import torch.nn.functional as F

import flow
import models
import models_dit as md
from moe import ExpertChoiceMoE, Mlp

TINY = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=3, num_heads=4)

CONFIGS = {
    "sincos": {},
    "rope_jit": dict(pos_embed="rope", swiglu=True, norm="rmsnorm", qk_norm=True),
    "overlap": dict(input_size=10, patch_size=4, patch_stride=2),
    "overlap_rope": dict(input_size=10, patch_size=4, patch_stride=3, pos_embed="rope"),
    "moe_layerwise_masked": dict(
        depth=4,
        mixer_depth=1,
        mask_ratio=0.5,
        num_experts=4,
        moe_weight=0.5,
        mlp_ratio=(2.0, 4.0),
        attn_scale=(0.5, 1.0),
    ),
    "moe_swiglu_rope_masked": dict(
        depth=4, mixer_depth=1, mask_ratio=0.75, num_experts=4, swiglu=True, pos_embed="rope"
    ),
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
    # The mixer (block 0) is a plain full-width block; the ramps run over the 5 backbone blocks.
    assert heads[0] == 4 and heads[1] == 2 and heads[-1] == 4 and heads[1:] == sorted(heads[1:])
    assert all(b.attn.head_dim == 8 for b in model.blocks)  # head_dim fixed, the head count ramps
    widths = [b.mlp.fc2.in_features if isinstance(b.mlp, Mlp) else b.mlp.w2.shape[1] for b in model.blocks]
    assert widths == [128, 64, 80, 96, 112, 128]  # mixer at ratio 4, then 2 -> 4 over the backbone
    # every 2nd block counted from the first, never the last by default: blocks 1, 3 (5 is last)
    assert model.moe_blocks == [1, 3]
    assert [isinstance(b.mlp, ExpertChoiceMoE) for b in model.blocks] == [False, True, False, True, False, False]
    assert tiny(depth=6, mixer_depth=1, num_experts=4, moe_last=True).moe_blocks == [1, 3, 5]
    # Heads and widths round up: 4 * 0.6 = 2.4 -> 3 heads; 32 * 2.5 = 80 -> 96 at width_multiple 32.
    ramped = tiny(depth=3, attn_scale=(0.6, 1.0), mlp_ratio=(2.5, 4.0), width_multiple=32)
    assert [b.attn.num_heads for b in ramped.blocks] == [3, 4, 4]
    assert [b.mlp.fc2.in_features for b in ramped.blocks] == [96, 128, 128]


def test_narrow_mixer_projects_tokens_and_conditioning():
    model = perturb(tiny(depth=4, mixer_depth=2, mixer_hidden_size=16, mask_ratio=0.5, num_experts=4, pos_embed="rope"))
    assert [b.norm1.normalized_shape[0] for b in model.blocks] == [16, 16, 32, 32]
    assert [b.attn.num_heads for b in model.blocks] == [2, 2, 4, 4]  # head_dim 8 throughout
    assert model.x_embedder.out_channels == model.y_embedder.embedding_dim == 16
    assert model.token_proj.weight.shape == model.cond_proj.weight.shape == (32, 16)
    assert isinstance(model.blocks[1].mlp, ExpertChoiceMoE)  # MoE inside the mixer
    x, t, y = inputs(model)
    out, keep = model.train()(x, t, y, generator=torch.Generator().manual_seed(0), return_mask=True)
    assert out.shape == x.shape and keep.sum(1).tolist() == [8, 8, 8]
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="head_dim"):
        tiny(mixer_depth=1, mixer_hidden_size=12)


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


H1024 = "nanoflow_h1024_d20_e16_c2_moew05"


def test_h1024_architecture():
    with torch.device("meta"):
        model = md.DIT_MODELS[H1024]()
    backbone = model.blocks[2:]
    assert len(model.blocks) == 22 and len(backbone) == 20 and model.embed_size == 768
    assert model.moe_blocks == list(range(1, 22, 2))  # mixer block 1 and every odd backbone block, last too
    attn = [b.attn.num_heads * b.attn.head_dim for b in backbone]
    assert attn[0] == 512 and attn[-1] == 1024 and attn == sorted(attn)
    dense = [b.mlp.fc2.in_features for b in backbone if isinstance(b.mlp, Mlp)]
    experts = [b.mlp.w2.shape[1] for b in backbone if isinstance(b.mlp, ExpertChoiceMoE)]
    assert dense == [512, 896, 1280, 1664, 2048, 2432, 2816, 3200, 3584, 3968]
    assert experts == [352, 544, 736, 928, 1120, 1312, 1504, 1696, 1888, 2048]  # moew0.5 of the ramp
    assert all(b.mlp.num_experts == 16 and b.mlp.capacity_factor == 2.0 for b in backbone[1::2])


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


# --- model configs ----------------------------------------------------------------------------------

# configs/model/NAME.yaml -> the named preset it spells out (jit_b16.yaml is the unconditional variant).
CONFIG_PRESETS = {
    "dit_s2": "dit_s2",
    "dit_b2": "dit_b2",
    "dit_l2": "dit_l2",
    "dit_xl2": "dit_xl2",
    "dit_b2_masked": "nanoflow_b2_masked",
    "dit_m2": "nanoflow_m2",
    "dit_m2_moe_layerwise": "nanoflow_m2_moe_layerwise",
    "dit_h1024_d20_e16_c2_moew05": H1024,
    "jit_b16": "jit_b16",
}


def model_config(name):
    from omegaconf import OmegaConf

    from config import CONFIG_DIR, check_spec, spec_kwargs

    spec = OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml")
    check_spec("model", spec, {**models.MODELS, **md.DIT_MODELS})  # the trainer's key check
    return spec_kwargs(spec)


@pytest.mark.parametrize("name", CONFIG_PRESETS)
def test_model_configs_spell_out_the_named_presets(name):
    ctor, kwargs = model_config(name)
    with torch.device("meta"):
        from_config = md.DIT_MODELS[ctor](**kwargs)
        preset = md.DIT_MODELS[CONFIG_PRESETS[name]]()
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items() if not k.startswith("y_embedder")}
    assert shapes(from_config) == shapes(preset)
    assert from_config.mask_ratio == preset.mask_ratio and from_config.moe_blocks == preset.moe_blocks


def test_smoke_config_trains_masked_moe_on_cpu():
    ctor, kwargs = model_config("dit_smoke")
    torch.manual_seed(0)
    model = md.DIT_MODELS[ctor](**kwargs).train()
    assert model.moe_blocks == [1, 3, 5] and model.embed_size == 32 and model.hidden_size == 64
    x1, y = torch.randn(16, 4, 8, 8), torch.randint(0, 1000, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = flow.make_path("condot")
    for step in range(3):
        t, eps = torch.rand(16), torch.randn_like(x1)
        x_t, _ = path.sample(x1, eps, t)
        out, keep = model(x_t, t, y, generator=torch.Generator().manual_seed(step), return_mask=True)
        loss, _ = flow.flow_matching_loss(path, out, x1, eps, x_t, t, mask=model.loss_mask(keep, (8, 8)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss) and keep.sum(1).eq(8).all()
    assert all(torch.isclose(v.sum(), torch.tensor(1.0)) for v in model.moe_load().values())


def smoke_moe_dit():
    ctor, kwargs = model_config("dit_smoke")
    torch.manual_seed(0)
    return perturb(md.DIT_MODELS[ctor](**kwargs))


# Perturbed (zero-init layers non-zero) models for the batch-independence tests.
BATCH_INDEPENDENCE = {
    "moe_smoke": smoke_moe_dit,
    "moe_layerwise_masked": lambda: perturb(tiny(**CONFIGS["moe_layerwise_masked"])),
    "dense": lambda: perturb(tiny()),
    "dense_rope_jit": lambda: perturb(tiny(**CONFIGS["rope_jit"])),
}


@pytest.mark.parametrize("name", BATCH_INDEPENDENCE)
def test_output_is_batch_independent_and_cfg_halves_do_not_interact(name):
    model = BATCH_INDEPENDENCE[name]().eval()
    x, t, y = inputs(model, batch=8)
    with torch.no_grad():
        batched, alone = model(x, t, y), model(x[:1], t[:1], y[:1])
        assert batched.abs().mean() > 1e-2  # perturbed: every path carries signal
        torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-5)
        # CFG: [x; x] with labels [y; null]; each half is what it is alone.
        null = torch.full_like(y[:1], model.num_classes)
        cfg = model(x[:1].repeat(2, 1, 1, 1), t[:1].repeat(2), torch.cat([y[:1], null]))
        torch.testing.assert_close(cfg[:1], alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cfg[1:], model(x[:1], t[:1], null), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cfg[:1], cfg[1:])


@pytest.mark.parametrize("name", ["moe_smoke", "moe_layerwise_masked"])
def test_masked_moe_dit_is_batch_independent_given_keep_ids(name):
    model = BATCH_INDEPENDENCE[name]().train()  # no dropout anywhere; keep_ids fix the mask
    x, t, y = inputs(model, batch=8)
    ids = model.sample_keep(8, model.grid**2, model.mask_ratio, torch.Generator().manual_seed(0), x.device)
    with torch.no_grad():
        batched, alone = model(x, t, y, keep_ids=ids), model(x[:1], t[:1], y[:1], keep_ids=ids[:1])
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-5)


def test_moe_dit_routes_per_sample_on_all_or_kept_tokens():
    model = smoke_moe_dit().train()
    routed = {}
    for i in model.moe_blocks:
        moe = model.blocks[i].mlp

        def record(x, moe=moe, i=i):
            gates, index = ExpertChoiceMoE.route(moe, x)
            routed[i] = (x.shape, index)
            return gates, index

        moe.route = record
    B = 4
    x, t, y = inputs(model, batch=B)
    ids = model.sample_keep(B, 16, model.mask_ratio, torch.Generator().manual_seed(0), x.device)
    model(x, t, y, keep_ids=ids)
    # Block 1 is in the mixer (all 16 tokens: k = 2 * 16 / 4 = 8); 3 and 5 see the 8 kept (k = 4).
    for i, n, k in [(1, 16, 8), (3, 8, 4), (5, 8, 4)]:
        shape, index = routed[i]
        assert shape[:2] == (B, n) and index.shape == (B, 4, k)
        picks = torch.stack([torch.bincount(row.flatten(), minlength=n) for row in index])  # [B, n]
        assert all(len(set(r.tolist())) == k for r in index.flatten(0, 1))  # k distinct tokens per expert
        assert (picks.sum(1) == 4 * k).all()  # ... from every image
        load = model.blocks[i].mlp.load
        assert torch.isclose(load.sum(), torch.tensor(1.0))
        torch.testing.assert_close(load[0], (picks == 0).float().mean())


def test_keep_ids_drawn_outside_the_model_equal_the_generator_path():
    model = perturb(tiny(**MASKED)).train()
    x, t, y = inputs(model)
    out, keep = model(x, t, y, generator=torch.Generator().manual_seed(5), return_mask=True)
    ids = model.sample_keep(3, 16, model.mask_ratio, torch.Generator().manual_seed(5), x.device)
    out_ids, keep_ids = model(x, t, y, keep_ids=ids, return_mask=True)
    assert torch.equal(out, out_ids) and torch.equal(keep, keep_ids)
    # A compiled forward given keep_ids has no graph break (a Generator argument would be one).
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, t, y, keep_ids=ids), out)


def test_named_sizes_take_overrides_from_the_command_line():
    """Sizes are registered once (functools.partial); any constructor argument stays a config key."""
    from config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"'model.depth' is an argument of model 'dit_b2' .*: \+model.depth=2"):
        load_config(["experiment=imagenet256_latent_dit_b2", "model.depth=2"])
    cfg = load_config(["experiment=imagenet256_latent_dit_b2", "model.num_classes=10", "+model.depth=2"])
    assert cfg.model.name == "dit_b2"
    with torch.device("meta"):
        model = md.DIT_MODELS[cfg.model.name](**{k: v for k, v in cfg.model.items() if k != "name"})
    assert model.num_classes == 10 and len(model.blocks) == 2 and model.hidden_size == 768
    with pytest.raises(ConfigError, match="model.depthh is not an argument of model 'dit_b2'"):
        load_config(["experiment=imagenet256_latent_dit_b2", "+model.depthh=2"])
