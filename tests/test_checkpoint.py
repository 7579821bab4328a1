import json

import pytest
import torch
from omegaconf import OmegaConf

import checkpoint as ckpt
from models import MLP


def _save(run_dir, step, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = MLP(hidden_dim=8, num_blocks=1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 2), torch.rand(4)).sum().backward()
    opt.step()
    path = ckpt.save_checkpoint(
        run_dir,
        step,
        model.state_dict(),
        model.state_dict(),
        {"optimizer": opt.state_dict()},
        OmegaConf.create({"model": {"name": "mlp"}}),
        meta={"sample_shape": [2]},
        **kwargs,
    )
    return model, path


def test_round_trip_layout_and_weights_only(tmp_path):
    model, path = _save(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "step_0000007"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "ema.safetensors", "state.pt", "config.yaml", "manifest.json"]
    )
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))
    loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 7 and loaded.meta == {"sample_shape": [2]}
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model[key], value)
    # state.pt must load under the safe unpickler
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["step"] == 7 and "optimizer" in state


def test_prefixes_are_stripped():
    cleaned = ckpt.clean_state_dict({"module._orig_mod.layer.weight": torch.ones(1), "_orig_mod.b": torch.zeros(1)})
    assert set(cleaned) == {"layer.weight", "b"}


@pytest.mark.parametrize("target", ["run_dir", "latest", "step_dir"])
def test_resolve_accepts_run_dir_latest_and_step_dir(tmp_path, target):
    _save(tmp_path, 1)
    _, newest = _save(tmp_path, 2)
    arg = {"run_dir": tmp_path, "latest": tmp_path / "checkpoints" / "latest", "step_dir": newest}[target]
    assert ckpt.resolve_checkpoint(arg) == newest


def test_keep_last_prunes_oldest(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5]


def test_truncated_file_is_detected(tmp_path):
    _, path = _save(tmp_path, 3)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.verify_checkpoint(path)


def test_bit_flip_is_detected(tmp_path):
    _, path = _save(tmp_path, 3)
    data = bytearray((path / "state.pt").read_bytes())
    data[len(data) // 2] ^= 0x01
    (path / "state.pt").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.verify_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(path)  # an explicit path never falls back


def test_missing_manifest_means_incomplete(tmp_path):
    _, path = _save(tmp_path, 3)
    (path / "manifest.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.verify_checkpoint(path)


def test_latest_valid_falls_back_and_quarantines(tmp_path):
    _, good = _save(tmp_path, 1)
    _, bad = _save(tmp_path, 2)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    messages = []
    assert ckpt.latest_valid_checkpoint(tmp_path, log=messages.append, quarantine=True) == good
    assert "sha256" in messages[0] and "step_0000002" in messages[0]
    assert (tmp_path / "checkpoints" / "step_0000002.corrupt").is_dir()  # kept, not deleted
    assert ckpt.resolve_checkpoint(tmp_path) == good


def test_run_dir_without_checkpoints_is_an_error(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="neither"):
        ckpt.resolve_checkpoint(tmp_path / "nothing_here")


def test_saving_an_existing_step_never_overwrites(tmp_path):
    _, path = _save(tmp_path, 4, seed=0)
    before = (path / "model.safetensors").read_bytes()
    _save(tmp_path, 4, seed=1)
    assert (path / "model.safetensors").read_bytes() == before


def test_stale_temp_dirs_are_cleaned(tmp_path):
    stale = tmp_path / "checkpoints" / ".tmp_step_0000009_123"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    assert ckpt.list_checkpoints(tmp_path) == []
    _save(tmp_path, 10)
    assert not stale.exists()


def test_load_weights_names_the_mismatch():
    small, big = MLP(hidden_dim=8), MLP(hidden_dim=16)
    with pytest.raises(ckpt.CheckpointError, match="shape mismatch"):
        ckpt.load_weights(small, big.state_dict(), "checkpoint X")
    weights = dict(small.state_dict())
    weights.pop("in_proj.bias")
    with pytest.raises(ckpt.CheckpointError, match="missing.*in_proj.bias"):
        ckpt.load_weights(small, weights, "checkpoint X")


def test_manifest_records_sizes_and_hashes(tmp_path):
    _, path = _save(tmp_path, 5)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 5
    assert manifest["files"]["model.safetensors"]["bytes"] == (path / "model.safetensors").stat().st_size
    assert len(manifest["files"]["state.pt"]["sha256"]) == 64
