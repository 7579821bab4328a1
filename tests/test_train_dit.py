"""The trainer with DiTs: deferred masking + expert-choice MoE resume exactly, MoE load is logged, and
the masked -> unmasked hand-off (training.init) loads exactly the parts it is asked for."""

import json

import pytest
import torch

import checkpoint as ckpt
import runtime
import train
import trainer
from config import ConfigError, load_config
from conftest import FAST, assert_same_state, final_state, run_train

# dit_smoke (mixer + 50 % masking + MoE + layerwise) on 1x16x16 digits: 64 tokens, ~0.4 M parameters.
DIT = [
    "experiment=digits_cfg",
    "model=dit_smoke",
    "model.input_size=16",
    "model.in_channels=1",
    "model.num_classes=10",
    "training.batch_size=32",
    "training.checkpoint_every=2",
    "training.num_eval_samples=10",
    "training.log_every=1",
    "solver.num_steps=2",
    "device=cpu",
]


def trainer_for(run_dir, *overrides) -> trainer.Trainer:
    cfg = load_config([f"training.run_dir={run_dir}", *FAST, *DIT, *overrides])
    return trainer.Trainer(cfg, runtime.setup_runtime("cpu"), run_dir)


def test_masked_moe_dit_resumes_bitwise_and_logs_expert_load(tmp_path):
    assert run_train(tmp_path / "full", *DIT, "training.max_steps=4") == 0
    assert run_train(tmp_path / "split", *DIT, "training.max_steps=2") == 0
    assert run_train(tmp_path / "split", *DIT, "training.max_steps=4", "training.resume=auto") == 0
    assert_same_state(final_state(tmp_path / "full"), final_state(tmp_path / "split"))
    logged = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    load = next(d for d in logged if "moe/tokens_picked_once" in d)
    # Capacity 2 with 4 experts: 2 picks per token on average, spread over 0, 1 and 2+ experts.
    shares = [load["moe/tokens_unpicked"], load["moe/tokens_picked_once"], load["moe/tokens_picked_2plus"]]
    assert sum(shares) == pytest.approx(1.0, abs=1e-6) and shares[2] > 0, shares


def test_masked_training_counts_only_kept_tokens(tmp_path, monkeypatch):
    """The loss the trainer takes equals the token-masked loss of flow.py for the kept tokens the
    model reports: dropped tokens contribute nothing."""
    import flow

    seen = {}
    original = flow.flow_matching_loss

    def spy(*args, mask=None, **kwargs):
        seen["mask"] = mask
        return original(*args, mask=mask, **kwargs)

    monkeypatch.setattr(flow, "flow_matching_loss", spy)
    trainer = trainer_for(tmp_path, "training.max_steps=1")
    trainer.train_step()
    mask = seen["mask"]  # [B, 1, 16, 16]; patch 2 -> 8x8 tokens, 50 % kept
    assert mask.shape == (32, 1, 16, 16)
    assert mask.mean().item() == pytest.approx(0.5)
    trainer_unmasked = trainer_for(tmp_path / "dense", "model.mask_ratio=0", "training.max_steps=1")
    trainer_unmasked.train_step()
    assert seen["mask"] is None


def test_unmasked_stage_starts_from_the_masked_stage_ema_only(tmp_path, capsys):
    stage1 = tmp_path / "masked"
    assert run_train(stage1, *DIT, "training.max_steps=4") == 0
    model1, ema1, optimizer1, _ = final_state(stage1)

    # The write-up's hand-off: EMA weights into both model and EMA; fresh optimizer, step 0, no masking.
    trainer = trainer_for(tmp_path / "unmasked", "model.mask_ratio=0", f"training.init.checkpoint={stage1}")
    trainer.resume()
    assert trainer.step == 0 and not trainer.optimizer.state and not trainer.masked
    for module in (trainer.model, trainer.ema.model):
        for key, value in module.state_dict().items():
            assert torch.equal(value, ema1[key]), key
    assert any(not torch.equal(model1[key], ema1[key]) for key in model1)  # the two differ, so this tells

    # Everything: the raw model, the optimizer moments and the step (a plain continuation).
    everything = trainer_for(
        tmp_path / "all",
        f"training.init.checkpoint={stage1}",
        "training.init.model=model",
        "training.init.optimizer=true",
        "training.init.step=true",
    )
    everything.resume()
    assert everything.step == 4
    for key, value in everything.model.state_dict().items():
        assert torch.equal(value, model1[key]), key
    saved = optimizer1["state"]
    for index, values in everything.optimizer.state_dict()["state"].items():
        for name, value in values.items():
            assert torch.equal(value, saved[index][name]), (index, name)

    # Once the new run has checkpoints of its own, resume=auto continues them and ignores init.
    run2 = tmp_path / "unmasked_run"
    common = [*DIT, "model.mask_ratio=0", f"training.init.checkpoint={stage1}"]
    assert run_train(run2, *common, "training.max_steps=2") == 0
    capsys.readouterr()
    assert run_train(run2, *common, "training.max_steps=4", "training.resume=auto") == 0
    assert ckpt.resolve_checkpoint(run2).name == "step_0000004"
    out = capsys.readouterr().out
    assert f"resumed from {run2 / 'checkpoints' / 'step_0000002'}" in out and "initialised from" not in out, out


def test_init_errors_name_the_key(tmp_path):
    stage1 = tmp_path / "masked"
    assert run_train(stage1, *DIT, "training.max_steps=2") == 0
    with pytest.raises(ConfigError, match="training.init.model"):
        load_config([*DIT, f"training.init.checkpoint={stage1}", "training.init.model=best"])
    with pytest.raises(ConfigError, match="training.init.checkpoint"):
        load_config([*DIT, "training.init.step=true"])
    wider = trainer_for(tmp_path / "wider", f"training.init.checkpoint={stage1}", "model.hidden_size=128")
    with pytest.raises(ckpt.CheckpointError, match="training.init.checkpoint"):
        wider.resume()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """make_smoke_cache: 2 classes x 4 random PNGs, a tiny AutoencoderKL, the built + converted cache."""

    import smoke_data

    return smoke_data.make_smoke_cache(tmp_path_factory.mktemp("smoke"))


def test_latent_smoke_presets_train_hand_off_and_decode(tmp_path, smoke):
    """The ImageNet path in miniature: masked MoE DiT 3 steps on the cache, the unmasked stage from its EMA,
    then inference.py samples the checkpoint and decodes the latents with the cache's VAE."""
    import numpy as np

    import inference

    data = [
        f"dataset.path={smoke['path']}",
        f"dataset.vae={smoke['vae']}",
        "training.tensorboard=false",
        "training.progress=false",
    ]
    masked, unmasked = tmp_path / "masked", tmp_path / "unmasked"
    assert (
        train.main(
            ["experiment=imagenet256_latent_dit_smoke", f"training.run_dir={masked}", *data, "training.max_steps=3"]
        )
        == 0
    )
    run = np.load(masked / "samples.npz")
    assert run["images"].shape == (4, 64, 64, 3) and run["latents"].shape == (4, 4, 8, 8)
    assert (
        train.main(
            [
                "experiment=imagenet256_latent_dit_smoke_unmasked",
                f"training.run_dir={unmasked}",
                *data,
                f"training.init.checkpoint={masked}",
                "training.max_steps=2",
            ]
        )
        == 0
    )
    out = tmp_path / "samples"
    assert (
        inference.main(
            [f"checkpoint={unmasked}", f"out={out}", "n_per_class=1", "num_steps=2", "device=cpu", "guidance_scale=1.5"]
        )
        == 0
    )
    samples = np.load(out / "samples.npz")
    # one image per class of the 2-class smoke cache, decoded to 64x64 RGB
    assert samples["images"].shape == (2, 64, 64, 3) and samples["latents"].shape == (2, 4, 8, 8)
    assert samples["images"].dtype == np.uint8 and samples["images"].std() > 0


def test_unet_and_pixel_jit_smoke_presets_train(tmp_path, smoke):
    common = ["training.tensorboard=false", "training.progress=false", "training.max_steps=2"]
    assert (
        train.main(
            [
                "experiment=imagenet256_latent_unet_smoke",
                f"training.run_dir={tmp_path / 'unet'}",
                f"dataset.path={smoke['path']}",
                f"dataset.vae={smoke['vae']}",
                *common,
            ]
        )
        == 0
    )
    assert (
        train.main(
            [
                "experiment=celeba256_jit_smoke",
                f"training.run_dir={tmp_path / 'jit'}",
                f"dataset.root={smoke['images']}",
                *common,
            ]
        )
        == 0
    )
    import numpy as np

    assert np.load(tmp_path / "jit" / "samples.npz")["images"].shape == (4, 32, 32, 3)
