"""inference.py: the checkpoint -> samples CLI (the sampler itself: tests/test_sampling.py)."""

import pytest

import inference


def test_cli_writes_png_and_npz_from_the_checkpoint_alone(tmp_path):
    import numpy as np

    from conftest import run_train

    run_dir = tmp_path / "run"
    assert run_train(run_dir, "training.max_steps=30", "training.batch_size=64") == 0
    out = tmp_path / "samples"
    assert (
        inference.main(
            [
                f"checkpoint={run_dir}/checkpoints/latest",
                f"out={out}",
                "n_per_class=5",
                "guidance_scale=3",
                "solver=rk4",
                "num_steps=8",
                "seed=4",
            ]
        )
        == 0
    )
    saved = np.load(out / "samples.npz")
    assert saved["points"].shape == (10, 2) and saved["points"].dtype == np.float32
    assert saved["labels"].tolist() == [0] * 5 + [1] * 5 and saved["labels"].dtype == np.int64
    assert (out / "samples.png").stat().st_size > 1000
    # same seed -> same samples; another seed -> others
    assert (
        inference.main(
            [
                f"checkpoint={run_dir}",
                f"out={tmp_path / 'again'}",
                "n_per_class=5",
                "guidance_scale=3",
                "solver=rk4",
                "num_steps=8",
                "seed=4",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(np.load(tmp_path / "again" / "samples.npz")["points"], saved["points"])

    # A reader never writes into a run directory: out=RUN used to replace the run's own samples.npz.
    import eval_imagenet
    from config import ConfigError

    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    for out in (run_dir, run_dir / "samples"):
        with pytest.raises(ConfigError, match=rf"out = '{out}' is inside the run directory {run_dir},"):
            inference.main([f"checkpoint={run_dir}", f"out={out}", "n_per_class=2"])
        with pytest.raises(ConfigError, match="is inside the run directory"):
            eval_imagenet.main([f"checkpoint={run_dir}", f"out={out}", "num_samples=2", "device=cpu"])
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == before
    # a folder that only holds a checkpoints/ folder (a volume mounted at /checkpoints) is not a run
    volume = tmp_path / "volume"
    (volume / "checkpoints").mkdir(parents=True)
    assert inference.main([f"checkpoint={run_dir}", f"out={volume / 'eval'}", "n_per_class=2"]) == 0


def test_cli_errors_are_clear(tmp_path):
    from checkpoint import CheckpointError
    from config import ConfigError

    with pytest.raises(ConfigError, match="checkpoint is required"):
        inference.main([f"out={tmp_path}"])
    with pytest.raises(CheckpointError, match="neither a checkpoint dir"):
        inference.main([f"checkpoint={tmp_path / 'missing'}", f"out={tmp_path}"])
    with pytest.raises(ConfigError, match="solver.method"):
        from conftest import run_train

        assert run_train(tmp_path / "run", "training.max_steps=5", "training.batch_size=64") == 0
        inference.main([f"checkpoint={tmp_path / 'run'}", f"out={tmp_path}", "solver=leapfrog"])


def test_likelihood_true_reports_held_out_bits_per_dim(tmp_path):
    import json

    from conftest import run_train

    run_dir = tmp_path / "digits"
    assert (
        run_train(
            run_dir,
            "experiment=digits_cfg",
            "model.base_ch=8",
            "model.emb_dim=16",
            "model.time_freq_dim=16",
            "training.max_steps=5",
            "training.num_eval_samples=20",
        )
        == 0
    )
    out = tmp_path / "out"
    assert (
        inference.main(
            [
                f"checkpoint={run_dir}",
                f"out={out}",
                "n_per_class=1",
                "num_steps=2",
                "device=cpu",
                "likelihood=true",
                "likelihood_images=6",
                "likelihood_steps=4",
            ]
        )
        == 0
    )
    scores = json.loads((out / "metrics.json").read_text())
    assert scores["bits_per_dim_images"] == 6 and scores["bits_per_dim_estimator"] == "hutchinson x1"
    assert 0 < scores["bits_per_dim"] < 64 and scores["bits_per_dim_sem"] > 0  # an untrained model: many bits
