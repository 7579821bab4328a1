import pytest
import torch

import models

UNET_PRESETS = ["unet_fashion", "classcond_unet_fashion", "unet_cifar", "classcond_unet_cifar"]


def unet_preset(name: str) -> dict:
    """The model kwargs of configs/model/NAME.yaml (the presets live in the configs only)."""
    from omegaconf import OmegaConf

    from config import CONFIG_DIR, spec_kwargs

    return spec_kwargs(OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml"))[1]


def test_timestep_embedding_shape_and_range():
    emb = models.timestep_embedding(torch.tensor([0.0, 0.5, 1.0]), 65)
    assert emb.shape == (3, 65) and emb.abs().max() <= 1.0
    assert not torch.allclose(emb[0], emb[1])


@pytest.mark.parametrize("cls", [models.MLP, models.ClassCondMLP])
def test_output_shape_and_zero_init(cls):
    model = cls()
    x, t = torch.randn(5, 2), torch.rand(5)
    y = torch.randint(0, 2, (5,)) if cls is models.ClassCondMLP else None
    out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer


def test_reference_sized_presets():
    # configs/model/class_cond_mlp.yaml: hidden 144, 1 block (the write-up's model has ~70.8k)
    assert models.count_parameters(models.ClassCondMLP(num_classes=2, hidden_dim=144, num_blocks=1)) == 73_154
    assert models.count_parameters(models.MLP(hidden_dim=144, num_blocks=1)) == 73_154 - 3 * 144


def test_conditioning_and_null_label_change_the_output():
    torch.manual_seed(0)
    model = models.ClassCondMLP(num_classes=2)
    torch.nn.init.normal_(model.out[-1].weight)  # undo the zero init so outputs differ
    x, t = torch.randn(4, 2), torch.rand(4)
    out0 = model(x, t, torch.zeros(4, dtype=torch.long))
    out1 = model(x, t, torch.ones(4, dtype=torch.long))
    null = model(x, t, torch.full((4,), 2))
    assert not torch.allclose(out0, out1) and not torch.allclose(out0, null)
    torch.testing.assert_close(model(x, t, None), null)  # y=None means the null label
    assert not torch.allclose(model(x, torch.zeros(4), None), model(x, torch.ones(4), None))  # time matters


# --- U-Net -------------------------------------------------------------------------------------------

PRESET_PARAMS = {  # reference write-up: 347,361 (Fashion CFG), 22,308,483 / 22,311,299 (CIFAR)
    "unet_fashion": 340_513,
    "classcond_unet_fashion": 341_217,
    "unet_cifar": 21_424_259,
    "classcond_unet_cifar": 21_427_075,
}
SMALL = {
    "base_ch": 16,
    "depth": 2,
    "num_res_blocks": 2,
    "attention_resolutions": [2],
    "bottleneck_attention": True,
    "num_heads": 2,
    "dropout": 0.1,
}


def build(preset_or_kwargs, conditional=None):
    kwargs = unet_preset(preset_or_kwargs) if isinstance(preset_or_kwargs, str) else preset_or_kwargs
    conditional = "num_classes" in kwargs if conditional is None else conditional
    return (models.ClassCondUNet if conditional else models.UNet)(**kwargs)


def perturb_zero_init(model):
    """Randomise every zero-initialised layer, so conditioning can reach the output."""
    torch.manual_seed(1)
    for p in model.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return model


def inputs(batch, ch, size, num_classes=10):
    torch.manual_seed(0)
    return torch.randn(batch, ch, size, size), torch.rand(batch), torch.randint(0, num_classes, (batch,))


@pytest.mark.parametrize("name", UNET_PRESETS)
def test_unet_presets_shape_dtype_zero_output_and_exact_size(name):
    model = build(name).eval()
    assert models.count_parameters(model) == PRESET_PARAMS[name]
    assert type(model) is models.MODELS["class_cond_unet" if name.startswith("classcond") else "unet"]
    cifar = "cifar" in name
    x, t, y = inputs(1 if cifar else 3, 3 if cifar else 1, 32 if cifar else 28)
    with torch.no_grad():
        out = model(x, t, y if name.startswith("classcond") else None)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv


def test_latent_unet_preset_matches_the_write_up_size_on_meta():
    # Write-up: ImageNet-256 latent ClassCondUNet "~89.8M parameters"; built on the meta device.
    kwargs = unet_preset("classcond_unet_latent")
    with torch.device("meta"):
        model = build(kwargs)
    assert models.count_parameters(model) == 89_194_628
    assert abs(models.count_parameters(model) / 89.8e6 - 1) < 0.01
    assert (kwargs["in_ch"], kwargs["num_classes"]) == (4, 1000)


def test_unet_class_embedding_is_the_only_difference():
    # an (10 + 1) x emb_dim class table, as in the reference (22,311,299 - 22,308,483 = 11 x 256)
    for size in ("fashion", "cifar"):
        kwargs = unet_preset(f"classcond_unet_{size}")
        difference = PRESET_PARAMS[f"classcond_unet_{size}"] - PRESET_PARAMS[f"unet_{size}"]
        assert difference == 11 * kwargs["emb_dim"]


@pytest.mark.parametrize("in_ch,size", [(1, 16), (1, 28), (3, 32), (4, 32)])
def test_small_unet_runs_at_every_stage_resolution(in_ch, size):
    model = perturb_zero_init(build({**SMALL, "in_ch": in_ch, "num_classes": 10}))
    assert sum(isinstance(m, models.Attention) for m in model.modules()) == 1 + 2 * 2  # middle + level 1 x 2
    x, t, y = inputs(2, in_ch, size)
    out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unet_conditioning_null_label_and_time_change_the_output():
    model = perturb_zero_init(build({**SMALL, "num_classes": 10})).eval()
    x, t, _ = inputs(4, 1, 16)
    zeros, ones = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)
    out0, out1, null = model(x, t, zeros), model(x, t, ones), model(x, t, torch.full((4,), 10))
    assert not torch.allclose(out0, out1) and not torch.allclose(out0, null)
    torch.testing.assert_close(model(x, t, None), null)  # y=None means the null label
    assert not torch.allclose(model(x, torch.zeros(4), zeros), model(x, torch.ones(4), zeros))  # time matters
    uncond = perturb_zero_init(build(SMALL)).eval()
    assert not torch.allclose(uncond(x, torch.zeros(4)), uncond(x, torch.ones(4)))


def test_unet_channels_last_matches_contiguous():
    model = perturb_zero_init(build({**SMALL, "num_classes": 10})).eval()
    x, t, y = inputs(2, 1, 28)
    with torch.no_grad():
        ref = model(x, t, y)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last), t, y)
    assert out.is_contiguous(memory_format=torch.channels_last)  # the layout survives the whole network
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_unet_bf16_autocast_forward_is_finite():
    model = perturb_zero_init(build({**SMALL, "num_classes": 10})).eval()  # no dropout: compare to fp32
    x, t, y = inputs(2, 1, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    assert (out.float() - model(x, t, y)).abs().max() < 0.05 * model(x, t, y).abs().max()


def assert_batch_independent(model, x, t, y, null=None):
    """Row 0 of the batch equals the same input alone; a CFG batch [x; x] with labels [y; null] gives
    each half what it gives alone (eval mode: no dropout)."""
    with torch.no_grad():
        batched, alone = model(x, t, y), model(x[:1], t[:1], None if y is None else y[:1])
        assert batched.abs().mean() > 1e-3  # perturbed: the output carries signal
        torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-5)
        if null is not None:
            nulls = torch.full_like(y[:1], null)
            cfg = model(torch.cat([x[:1], x[:1]]), t[:1].repeat(2), torch.cat([y[:1], nulls]))
            torch.testing.assert_close(cfg[:1], alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cfg[1:], model(x[:1], t[:1], nulls), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conditional", [False, True])
def test_unet_is_batch_independent(conditional):
    model = perturb_zero_init(build({**SMALL, "num_classes": 10} if conditional else SMALL)).eval()
    x, t, y = inputs(8, 1, 16)  # GroupNorm normalises per sample; eval turns dropout off
    assert_batch_independent(model, x, t, y if conditional else None, 10 if conditional else None)


@pytest.mark.parametrize("cls", [models.MLP, models.ClassCondMLP])
def test_mlp_is_batch_independent(cls):
    torch.manual_seed(0)
    model = cls(num_classes=2) if cls is models.ClassCondMLP else cls()
    torch.nn.init.normal_(model.out[-1].weight)  # undo the zero init
    x, t = torch.randn(8, 2), torch.rand(8)
    y = torch.randint(0, 2, (8,)) if cls is models.ClassCondMLP else None
    assert_batch_independent(model.eval(), x, t, y, 2 if y is not None else None)


def test_unet_rejects_bad_resolutions_and_settings():
    model = build({**SMALL, "depth": 3})
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.randn(1, 1, 28, 28), torch.rand(1))  # 28 -> 14 -> 7 -> 3.5
    with pytest.raises(ValueError, match="attention_resolutions"):
        build({**SMALL, "attention_resolutions": [16]})
    with pytest.raises(ValueError, match="num_heads"):
        build({**SMALL, "num_heads": 3})


def test_group_count_divides_and_keeps_groups_wide():
    for channels in (1, 3, 16, 32, 48, 64, 96, 128, 192, 384, 1024):
        groups = models.group_count(channels)
        assert channels % groups == 0 and 1 <= groups <= 32
    assert models.group_count(32) == 8 and models.group_count(256) == 32


# --- interval conditioning (flow maps) ----------------------------------------------------------------


def _family(name: str, interval: bool, guidance: bool = False):
    """(model, x, y) of each family with a time embedding, small; same seed for every flag value."""
    import models_dit

    torch.manual_seed(0)
    flag = dict(interval_conditioning=interval, guidance_conditioning=guidance)
    tiny_dit = dict(input_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=4, num_classes=5)
    if name == "mlp":
        return models.MLP(hidden_dim=16, **flag), torch.randn(4, 2), None
    if name == "class_cond_unet":
        kwargs = dict(base_ch=8, depth=2, emb_dim=16, bottleneck_attention=True, num_heads=2, num_classes=5)
        return models.ClassCondUNet(**kwargs, **flag), torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 5])
    if name == "dit":
        return models_dit.ClassCondDiT(**tiny_dit, **flag), torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 5])
    jit = dict(pos_embed="rope", norm="rmsnorm", qk_norm=True, swiglu=True, patch_size=4, patch_stride=2)
    model = models_dit.ClassCondDiT(**{**tiny_dit, **jit}, **flag)
    return model, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 5])


FAMILIES = ["mlp", "class_cond_unet", "dit", "jit"]


@pytest.mark.parametrize("name", FAMILIES)
def test_interval_conditioning_is_off_by_default_and_adds_only_its_own_keys(name):
    old, _, _ = _family(name, False)
    new, _, _ = _family(name, True)
    assert old.interval_embed is None and not old.interval_conditioning
    added = set(new.state_dict()) - set(old.state_dict())
    assert added and all(k.startswith("interval_embed.") for k in added)
    assert set(old.state_dict()) <= set(new.state_dict())
    # built on a forked RNG: every other weight is the one the same seed gives without it
    for key, value in old.state_dict().items():
        torch.testing.assert_close(new.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_an_old_checkpoint_loads_into_an_interval_model_and_computes_the_same(name):
    import checkpoint

    old, x, y = _family(name, False)
    for p in old.parameters():  # a "trained" model: every output layer off zero
        p.data.add_(0.05 * torch.randn_like(p))
    weights = {k: v.clone() for k, v in old.state_dict().items()}
    new, _, _ = _family(name, True)
    with pytest.raises(checkpoint.CheckpointError, match="missing"):
        checkpoint.load_weights(new, weights, "old")  # strict unless the new keys are named
    kept = checkpoint.load_weights(new, weights, "old", (checkpoint.INTERVAL_PREFIX,))
    assert kept and all(k.startswith("interval_embed.") for k in kept)
    old.eval(), new.eval()
    t = torch.tensor([0.1, 0.4, 0.7, 0.9])
    with torch.no_grad():
        before = old(x, t, y)
        assert torch.equal(new(x, t, y), before)
        assert torch.equal(new(x, t, y, r=torch.ones(4)), before)  # zero init: r changes nothing yet
    # the gradient reaches the new embedding (its zero last layer first), so training can use r
    new.train()
    new(x, t, y, r=torch.tensor([0.5, 0.9, 1.0, 0.95])).square().sum().backward()
    assert new.interval_embed.mlp[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="interval_conditioning"):
        old(x, t, y, r=torch.ones(4))


@pytest.mark.parametrize("name", FAMILIES)
def test_guidance_conditioning_is_zero_initialised_and_adds_only_its_own_keys(name):
    """models.GuidanceEmbedding: built on a forked RNG (every other weight is the one the same seed gives
    without it), its last layer zero, so at init the output is bitwise the same for any w."""
    old, x, y = _family(name, True)
    new, _, _ = _family(name, True, guidance=True)
    assert old.guidance_embed is None and not old.guidance_conditioning and new.guidance_conditioning
    added = set(new.state_dict()) - set(old.state_dict())
    assert added and all(k.startswith("guidance_embed.") for k in added)
    for key, value in old.state_dict().items():
        torch.testing.assert_close(new.state_dict()[key], value, rtol=0, atol=0)
    for p in old.parameters():  # outputs off zero (the zero output layers would hide a difference)
        p.data.add_(0.05 * torch.randn_like(p))
    new.load_state_dict({**new.state_dict(), **old.state_dict()})  # the guidance embedding as initialised
    old.eval(), new.eval()
    t, r = torch.tensor([0.1, 0.4, 0.7, 0.9]), torch.tensor([0.5, 0.4, 1.0, 0.95])
    with torch.no_grad():
        before = old(x, t, y, r=r)
        assert before.abs().sum() > 0
        for w in (None, torch.ones(4), torch.tensor([1.0, 1.5, 3.0, 7.0])):
            assert torch.equal(new(x, t, y, r=r, w=w), before)
        new.guidance_embed.mlp[-1].weight.normal_()  # once that layer moves, w reaches the output
        assert not torch.equal(new(x, t, y, r=r, w=torch.full((4,), 3.0)), before)
        assert torch.equal(new(x, t, y, r=r, w=None), new(x, t, y, r=r, w=torch.ones(4)))  # None is w = 1


@pytest.mark.parametrize("name", FAMILIES)
def test_an_old_checkpoint_loads_into_a_guidance_model_which_then_learns_w(name):
    import checkpoint

    old, x, y = _family(name, True)
    for p in old.parameters():  # a "trained" flow map
        p.data.add_(0.05 * torch.randn_like(p))
    weights = {k: v.clone() for k, v in old.state_dict().items()}
    new, _, _ = _family(name, True, guidance=True)
    with pytest.raises(checkpoint.CheckpointError, match="missing"):
        checkpoint.load_weights(new, weights, "old")
    kept = checkpoint.load_weights(new, weights, "old", (checkpoint.INTERVAL_PREFIX, checkpoint.GUIDANCE_PREFIX))
    assert kept and all(k.startswith("guidance_embed.") for k in kept)
    old.eval(), new.eval()
    t, r, w = torch.tensor([0.1, 0.4, 0.7, 0.9]), torch.tensor([0.5, 0.9, 1.0, 0.95]), torch.tensor([1.0, 2, 3, 4])
    with torch.no_grad():
        assert torch.equal(new(x, t, y, r=r, w=w), old(x, t, y, r=r))
    new.train()
    new(x, t, y, r=r, w=w).square().sum().backward()
    assert new.guidance_embed.mlp[-1].weight.grad.abs().sum() > 0  # training can use w
    with pytest.raises(ValueError, match="built without guidance_conditioning.*model.guidance_conditioning=true"):
        old(x, t, y, r=r, w=w)


def test_init_from_checkpoint_admits_both_zero_initialised_embeddings(tmp_path):
    """A velocity checkpoint starts a guidance-conditioned flow map: the interval and guidance embeddings
    keep their zero init, the message names both, and the model computes what the checkpoint computes."""
    import checkpoint
    from schemas import InitConfig

    old, x, y = _family("class_cond_unet", False)
    for p in old.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    from omegaconf import OmegaConf

    weights, config = old.state_dict(), OmegaConf.create()
    path = checkpoint.save_checkpoint(tmp_path, 3, model=weights, ema=None, state={}, config=config)
    new, _, _ = _family("class_cond_unet", True, guidance=True)
    optimizer = torch.optim.SGD(new.parameters(), lr=0.1)
    init = InitConfig(checkpoint=str(path), model="model", ema="none")
    _, _, message = checkpoint.init_from_checkpoint(init, new, None, optimizer, torch.device("cpu"))
    assert "guidance_embed.*, interval_embed.* (8 tensors) not in it: zero-initialised" in message
    old.eval(), new.eval()
    t = torch.tensor([0.1, 0.4, 0.7, 0.9])
    with torch.no_grad():
        assert torch.equal(new(x, t, y, r=torch.ones(4), w=torch.full((4,), 2.0)), old(x, t, y))


@pytest.mark.parametrize("name", ["dit", "jit"])
def test_the_jvp_runs_through_dit_attention_on_the_math_kernel(name):
    """Forward-mode AD through F.scaled_dot_product_attention (flow_map.math_attention). The sin-cos DiT in
    float64 matches a central difference; RoPE rotates in float32 (models_dit.apply_rope), which a
    difference at h = 1e-6 cannot resolve, so the JiT variant is checked to run and be finite."""
    import flow_map

    model, x, y = _family(name, True)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    model, x = model.double(), x.double()
    t = torch.tensor([0.1, 0.4, 0.7, 0.2], dtype=torch.float64)
    r = torch.tensor([0.5, 0.9, 1.0, 0.2], dtype=torch.float64)
    dz = torch.randn_like(x)

    def u(z, tt, rr):
        return model(z, tt, y, r=rr)

    _, dudt = flow_map.total_derivative(u, x, t, r, dz)
    assert bool(torch.isfinite(dudt).all()) and dudt.abs().sum() > 0
    if name == "dit":
        fd = flow_map.finite_difference_derivative(u, x, t, r, dz, 1e-6)
        torch.testing.assert_close(dudt, fd, rtol=1e-5, atol=1e-6)


def test_time_scale_multiplies_t_in_the_sinusoidal_features():
    t = torch.tensor([0.3, 0.9])
    torch.testing.assert_close(models.timestep_embedding(t, 8, scale=1.0), models.timestep_embedding(t / 1000, 8))
    mlp = models.MLP(hidden_dim=16, time_scale=2.0)
    assert mlp.time_embed.scale == 2.0 and models.MLP().time_embed.scale == 1000.0


def test_forward_mode_ad_needs_the_math_attention_kernel():
    """PyTorch's fused CPU attention kernel has no forward-mode AD; flow_map.total_derivative selects the
    math kernel for the JVP (float32, where the fused kernel is picked), and only there."""
    import torch.nn.functional as F

    import flow_map

    q = torch.randn(2, 2, 8, 16)

    def attention(z, t, r):
        return F.scaled_dot_product_attention(z, z, z) * (1 + t - r)[:, None, None, None]

    with pytest.raises(RuntimeError, match="forward AD"):
        torch.func.jvp(lambda z: F.scaled_dot_product_attention(z, z, z), (q,), (torch.ones_like(q),))
    t = torch.zeros(2)
    value, dudt = flow_map.total_derivative(attention, q, t, t, torch.ones_like(q))
    assert torch.isfinite(dudt).all() and value.shape == q.shape
