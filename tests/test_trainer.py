"""trainer.py's parts, in-process on a tiny moons set: the step meter, the data order and the seeded
micro-batch draws that make resume exact, label dropout, the step arithmetic and one optimizer step."""

import pytest
import torch

import datasets
import runtime
import trainer
from config import ConfigError, load_config
from trainer import StepMeter, Trainer

CPU = runtime.Runtime(device=torch.device("cpu"))


def make_trainer(tmp_path, *overrides, num_samples=40):
    cfg = load_config(
        [
            "experiment=moons_cfg",
            "training.batch_size=8",
            "training.grad_accum=2",
            "training.epochs=3",
            "training.tensorboard=false",
            "training.progress=false",
            *overrides,
        ]
    )
    return Trainer(cfg, CPU, tmp_path / "run", dataset=datasets.load_moons(num_samples=num_samples))


# --- the step meter ------------------------------------------------------------------------------


def test_step_meter_means_ignore_non_finite_steps_and_reset():
    meter = StepMeter("cpu")
    meter.add(torch.tensor(1.0), torch.tensor(2.0), torch.tensor([1.0, 3.0]), torch.tensor([0.05, 0.95]))
    meter.add(
        torch.tensor(float("nan")),
        torch.tensor(float("inf")),
        torch.tensor([float("nan")] * 2),
        torch.tensor([0.05, 0.55]),
    )
    meter.add(torch.tensor(3.0), torch.tensor(4.0), torch.tensor([5.0, 7.0]), torch.tensor([0.0, 0.999]))
    values = meter.values(batch_size=2)
    assert values["train/loss"] == 2.0 and values["train/grad_norm"] == 3.0 and values["train/skipped_steps"] == 1.0
    assert values["loss_by_t/0.0-0.1"] == 3.0  # (1 + 5) / 2: the skipped step's sample in this bin is left out
    assert values["loss_by_t/0.9-1.0"] == 5.0  # (3 + 7) / 2
    assert values["loss_by_t/0.5-0.6"] == 0.0  # only a skipped sample: empty, not NaN
    assert len([k for k in values if k.startswith("loss_by_t/")]) == trainer.T_BINS
    assert values["train/images_per_s"] > 0
    after = meter.values(batch_size=2)  # reset
    assert after["train/loss"] == 0.0 and after["train/skipped_steps"] == 0.0 and after["train/images_per_s"] == 0.0
    assert all(after[f"loss_by_t/{i / 10:.1f}-{(i + 1) / 10:.1f}"] == 0.0 for i in range(10))


def test_t_equal_to_one_lands_in_the_last_bin():
    meter = StepMeter("cpu")
    meter.add(torch.tensor(1.0), torch.tensor(1.0), torch.tensor([4.0]), torch.tensor([1.0]))
    assert meter.values(1)["loss_by_t/0.9-1.0"] == 4.0


# --- the data order and the draws -------------------------------------------------------------------


def test_micro_batch_seed_is_derive_seed_of_the_position():
    assert trainer.micro_batch_seed(3, 10, 1) == runtime.derive_seed(3, 10, 1)
    assert len({trainer.micro_batch_seed(0, s, j) for s in range(50) for j in range(4)}) == 200


def test_constructing_a_trainer_writes_nothing_and_sets_the_step_arithmetic(tmp_path):
    tr = make_trainer(tmp_path, "training.max_steps=7")
    assert not (tmp_path / "run").exists()
    assert (tr.batches.steps_per_epoch, tr.batches.micro_batches, tr.batches.micro_batch_size) == (
        5,
        2,
        4,
    )  # 40 // 8; 8 / (1 * 2)
    assert (tr.total_steps, tr.target_steps) == (15, 7)
    assert make_trainer(tmp_path, "training.max_steps=100").target_steps == 15  # capped by the schedule


def test_global_batch_indices_cover_each_epoch_without_repeats(tmp_path):
    tr = make_trainer(tmp_path, num_samples=43)  # 5 batches of 8; 3 samples left over per epoch
    for epoch in range(2):
        seen = torch.cat([tr.batches.global_batch_indices(epoch * 5 + k) for k in range(5)])
        assert len(seen) == 40 and len(set(seen.tolist())) == 40 and int(seen.max()) < 43
        assert torch.equal(seen, runtime.epoch_permutation(43, tr.cfg.seed, epoch, "cpu")[:40])
    assert not torch.equal(
        tr.batches.global_batch_indices(0), tr.batches.global_batch_indices(5)
    )  # a new order per epoch


def test_micro_batch_draws_are_a_function_of_seed_step_and_index_only(tmp_path):
    a, b = make_trainer(tmp_path), make_trainer(tmp_path)
    torch.manual_seed(123)  # the global RNG plays no part
    b.batches.micro_batch(9, 0), b.batches.micro_batch(2, 1)  # nor does what was drawn before
    for step, j in [(2, 1), (7, 0), (7, 1)]:
        for x, y in zip(a.batches.micro_batch(step, j), b.batches.micro_batch(step, j)):
            assert torch.equal(x, y)
    t_7_0, t_7_1, t_8_0 = (a.batches.micro_batch(s, j)[2] for s, j in [(7, 0), (7, 1), (8, 0)])
    assert not torch.equal(t_7_0, t_7_1) and not torch.equal(t_7_0, t_8_0)
    other_seed = make_trainer(tmp_path, "seed=1")
    assert not torch.equal(other_seed.batches.micro_batch(7, 0)[3], a.batches.micro_batch(7, 0)[3])


def test_the_micro_batches_split_the_global_batch(tmp_path):
    tr = make_trainer(tmp_path, "training.p_uncond=0.0")
    indices = tr.batches.global_batch_indices(6)
    x0, y0, t0, eps0 = tr.batches.micro_batch(6, 0)
    x1, y1, _, _ = tr.batches.micro_batch(6, 1)
    assert torch.equal(torch.cat([x0, x1]), tr.dataset.x[indices])
    assert torch.equal(torch.cat([y0, y1]), tr.dataset.y[indices])  # no dropout at p_uncond = 0
    assert t0.shape == (4,) and ((t0 >= 0) & (t0 <= 1)).all() and eps0.shape == x0.shape


def test_label_dropout_to_the_null_label(tmp_path):
    tr = make_trainer(tmp_path, "training.p_uncond=0.5")
    dropped = []
    for step in range(5):
        for j in range(2):
            indices = tr.batches.global_batch_indices(step).view(2, 4)[j]
            y = tr.batches.micro_batch(step, j)[1]
            null = y == tr.model.num_classes
            assert torch.equal(y[~null], tr.dataset.y[indices][~null])  # each label kept or dropped to the null
            dropped += null.tolist()
    assert 0 < sum(dropped) < len(dropped)
    unconditional = make_trainer(tmp_path, "experiment=moons")
    assert unconditional.batches.micro_batch(0, 0)[1] is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.batch_size=9"], "must be divisible by world_size \\* grad_accum = 2"),
        (["training.batch_size=64"], "exceeds the dataset size 40"),
        (["model.num_classes=1"], "model.num_classes = 1 but dataset 'moons' has 2 classes"),
    ],
)
def test_bad_settings_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_trainer(tmp_path, *overrides)


# --- one step and the state ---------------------------------------------------------------------------


def test_train_step_updates_the_model_the_ema_and_the_step(tmp_path):
    tr = make_trainer(tmp_path, "training.warmup_steps=2")
    tr.resume()  # outside fit: a fresh start reads nothing and writes nothing
    assert tr.step == 0 and not (tmp_path / "run").exists()
    before = [p.detach().clone() for p in tr.model.parameters()]
    loss, grad_norm, per_sample, t = tr.train_step()
    assert tr.step == 1 and tr.ema.num_updates == 1
    assert per_sample.shape == (8,) and t.shape == (8,) and torch.isfinite(loss) and float(grad_norm) > 0
    torch.testing.assert_close(loss, per_sample.view(2, 4).mean(1).mean())  # mean of the micro-batch means
    assert tr.optimizer.param_groups[0]["lr"] == pytest.approx(tr.cfg.training.lr / 2)  # warmup step 0 of 2
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    state = tr.state_dict()
    assert (state["epoch"], state["batch_in_epoch"], state["world_size"], state["ema_num_updates"]) == (0, 1, 1, 1)


# --- progress -------------------------------------------------------------------------------------


def test_the_final_evaluation_and_the_first_steps_show_progress(tmp_path, monkeypatch, capsys):
    """The final evaluation draws its samples in several batches with a line per interval in the log, and the
    training bar shows a loss from the first step, long before the first log_every."""
    monkeypatch.setattr(runtime, "PROGRESS_LINE_EVERY_S", 0.0)
    postfixes = []
    real = runtime.Progress.set_postfix

    def record(self, **values):
        postfixes.append((self.desc, self.n, values))
        real(self, **values)

    monkeypatch.setattr(runtime.Progress, "set_postfix", record)
    run = make_trainer(tmp_path, "training.max_steps=3", "training.log_every=100", "training.num_eval_samples=300")
    assert run.fit() == 0
    out = capsys.readouterr().out
    evaluation = [line.split(" img")[0] for line in out.splitlines() if line.startswith("final evaluation: ")]
    assert evaluation == ["final evaluation: 128/300", "final evaluation: 256/300", "final evaluation: 300/300"]
    training = [(n, values) for desc, n, values in postfixes if desc == "moons_cfg"]
    assert [n for n, _ in training] == [1, 2, 3] and all("loss" in values for _, values in training)


# --- experiment tracking --------------------------------------------------------------------------


def read_tensorboard(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    return events


def test_tensorboard_gets_the_resolved_config_as_text_and_hparams(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    run = make_trainer(tmp_path, "training.max_steps=2", "training.num_eval_samples=8", "training.tensorboard=true")
    assert run.fit() == 0
    events = read_tensorboard(tmp_path / "run" / "tb")
    text = tensor_util.make_ndarray(events.Tensors("config/text_summary")[0].tensor_proto).item().decode()
    assert "experiment: moons_cfg" in text and "batch_size: 8" in text and "grad_accum: 2" in text
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["training.batch_size"].number_value == 8 and hparams["experiment"].string_value == "moons_cfg"
    assert "train/loss" in events.Tags()["scalars"]  # the scalars stay in the same log directory


def test_wandb_offline_writes_the_run_with_its_config_and_metrics_without_network(tmp_path):
    wandb = pytest.importorskip("wandb", reason="the optional wandb group: uv sync --group wandb")
    run = make_trainer(tmp_path, "training.max_steps=2", "training.num_eval_samples=8", "training.wandb=offline")
    assert run.fit() == 0
    # the W&B service writes the file on its own; a process's exit waits for it (wandb's atexit teardown),
    # this test process has to do the same before reading
    wandb.teardown()
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    data = files[0].read_bytes()  # the records are protobufs: keys and values appear as they were logged
    for key in (b"train/loss", b"eval/sliced_w2", b"moons_cfg", b"batch_size"):
        assert key in data, key


def test_wandb_selected_without_the_package_is_one_error_naming_the_key(tmp_path, monkeypatch):
    """Both entry points check right after the config loads: no run directory, no work."""
    import importlib.util

    import train
    import train_grpo

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    message = r"training.wandb = 'offline' needs the optional wandb package.*uv sync --group wandb"
    with pytest.raises(ConfigError, match=message):
        train.main(["training.wandb=offline", f"training.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=message):
        train_grpo.main(["training.wandb=offline", "seed_checkpoint=x", f"training.run_dir={tmp_path / 'grpo'}"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match=r"training.wandb.*'cloud'.*off, offline, online"):
        load_config(["training.wandb=cloud"])
