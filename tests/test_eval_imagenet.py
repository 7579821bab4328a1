"""eval_imagenet.py: sharded sampling that is independent of the rank count and the batch, resumable
after a SIGKILL, refusing a directory made with other settings; ADM-format samples.npz."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import eval_imagenet
import runtime
from conftest import ROOT, run_train, torchrun

TINY_UNET = ["experiment=digits_cfg", "model.base_ch=8", "model.emb_dim=16", "model.time_freq_dim=16"]
FAST = ["num_steps=3", "device=cpu", "metrics=false"]


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pixel") / "digits"
    assert (
        run_train(
            run_dir, *TINY_UNET, "training.max_steps=20", "training.checkpoint_every=20", "training.num_eval_samples=20"
        )
        == 0
    )
    return run_dir


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """The masked-MoE smoke DiT (expert-choice routing in eval) on the tiny smoke cache."""
    import smoke_data

    smoke = smoke_data.make_smoke_cache(tmp_path_factory.mktemp("smoke"))
    run_dir = tmp_path_factory.mktemp("latent") / "dit"
    data = [f"dataset.path={smoke['path']}", f"dataset.vae={smoke['vae']}"]
    assert (
        run_train(
            run_dir,
            "experiment=imagenet256_latent_dit_smoke",
            *data,
            "training.max_steps=3",
            "training.checkpoint_every=3",
            "training.num_eval_samples=2",
        )
        == 0
    )
    return run_dir


def evaluate(run_dir, out, *extra):
    return eval_imagenet.main([f"checkpoint={run_dir}", f"out={out}", *FAST, *extra])


def evaluate_on_two_ranks(run_dir, out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun("eval_imagenet.py", f"checkpoint={run_dir}", f"out={out}", *FAST, *extra, env=env)


# the latent case adds the VAE decode to the same sharding, in two more torchrun launches
@pytest.mark.parametrize("which", ["pixel", pytest.param("latent", marks=pytest.mark.slow)])
def test_one_and_two_ranks_write_identical_samples(which, pixel_run, latent_run, tmp_path):
    run_dir = pixel_run if which == "pixel" else latent_run
    n = 23 if which == "pixel" else 9
    args = [f"num_samples={n}", "chunk_size=4", "batch_size=3"]
    assert evaluate(run_dir, tmp_path / "one", *args) == 0
    evaluate_on_two_ranks(run_dir, tmp_path / "two", *args)
    one, two = (tmp_path / "one" / "samples.npz").read_bytes(), (tmp_path / "two" / "samples.npz").read_bytes()
    assert one == two
    with np.load(tmp_path / "one" / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    size = 16 if which == "pixel" else 64
    assert images.shape == (n, size, size, 3) and images.dtype == np.uint8
    classes = 10 if which == "pixel" else 2  # the smoke cache has 2 classes (the preset sets model.num_classes)
    assert labels.tolist() == [i % classes for i in range(n)]  # class-balanced, from the index alone
    assert len(np.unique(images.reshape(n, -1), axis=0)) == n  # every sample its own noise


@pytest.mark.parametrize("which", ["pixel", "latent"])
def test_another_batch_size_gives_the_same_images_up_to_rounding(which, pixel_run, latent_run, tmp_path):
    run_dir = pixel_run if which == "pixel" else latent_run
    assert evaluate(run_dir, tmp_path / "b3", "num_samples=16", "chunk_size=8", "batch_size=3") == 0
    assert evaluate(run_dir, tmp_path / "b8", "num_samples=16", "chunk_size=8", "batch_size=8") == 0
    a = np.load(tmp_path / "b3" / "samples.npz")["arr_0"].astype(int)
    b = np.load(tmp_path / "b8" / "samples.npz")["arr_0"].astype(int)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


KILL_AFTER_TWO_CHUNKS = """
import os, signal, sys
import eval_imagenet, runtime
done = []
original = eval_imagenet.Evaluation.sample_chunk
def dying(self, chunk):
    original(self, chunk)
    done.append(chunk)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
eval_imagenet.Evaluation.sample_chunk = dying
runtime.run_main(eval_imagenet.main, sys.argv[1:])
"""


def test_a_killed_job_rerun_gives_the_same_file(pixel_run, tmp_path):
    args = [f"checkpoint={pixel_run}", *FAST, "num_samples=20", "chunk_size=4", "batch_size=4"]
    assert eval_imagenet.main([*args, f"out={tmp_path / 'straight'}"]) == 0
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_TWO_CHUNKS, *args, f"out={tmp_path / 'killed'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(list((tmp_path / "killed" / "shards").glob("chunk_*.npz"))) == 2
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed" / "shards").glob("chunk_*.npz")}
    time.sleep(0.01)
    assert eval_imagenet.main([*args, f"out={tmp_path / 'killed'}"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "killed" / "shards").glob("chunk_*.npz")}
    assert all(after[name] == stamp for name, stamp in before.items())  # finished chunks were not redone
    assert (tmp_path / "killed" / "samples.npz").read_bytes() == (tmp_path / "straight" / "samples.npz").read_bytes()


def test_a_truncated_chunk_is_moved_aside_and_redone(pixel_run, tmp_path, capsys):
    """A finished chunk was skipped on resume by its name alone, and a truncated one then failed the
    samples.npz concatenation with a BadZipFile traceback."""
    args = [f"checkpoint={pixel_run}", *FAST, "num_samples=12", "chunk_size=4", "batch_size=4"]
    assert eval_imagenet.main([*args, f"out={tmp_path / 'straight'}"]) == 0
    assert eval_imagenet.main([*args, f"out={tmp_path / 'damaged'}"]) == 0
    chunk = tmp_path / "damaged" / "shards" / "chunk_000001.npz"
    chunk.write_bytes(chunk.read_bytes()[:100])
    (tmp_path / "damaged" / "samples.npz").unlink()
    capsys.readouterr()
    assert eval_imagenet.main([*args, f"out={tmp_path / 'damaged'}"]) == 0
    assert "chunk_000001.npz: " in capsys.readouterr().err and (chunk.parent / "chunk_000001.npz.corrupt").is_file()
    assert (tmp_path / "damaged" / "samples.npz").read_bytes() == (tmp_path / "straight" / "samples.npz").read_bytes()


TERM_AFTER_TWO_CHUNKS = KILL_AFTER_TWO_CHUNKS.replace("signal.SIGKILL", "signal.SIGTERM")


def test_sigterm_between_chunks_exits_75_keeping_the_finished_chunks(pixel_run, tmp_path):
    """A preemption notice: the chunk in hand is finished and written, the job exits 75 (recovered without
    counting an error), and the same command completes the samples."""
    args = [f"checkpoint={pixel_run}", *FAST, "num_samples=20", "chunk_size=4", "batch_size=4"]
    stopped = subprocess.run(
        [sys.executable, "-c", TERM_AFTER_TWO_CHUNKS, *args, f"out={tmp_path / 'out'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert stopped.returncode == runtime.EXIT_PREEMPTED, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert len(list((tmp_path / "out" / "shards").glob("chunk_*.npz"))) == 2
    assert not (tmp_path / "out" / "samples.npz").exists()
    assert eval_imagenet.main([*args, f"out={tmp_path / 'out'}"]) == 0
    assert (tmp_path / "out" / "samples.npz").is_file()


def test_a_second_evaluation_of_the_same_out_is_refused_while_the_first_runs(pixel_run, tmp_path):
    """Two evaluations with different settings on one out could interleave (the settings check, then the
    write) and leave eval.json describing chunks sampled with other settings: the owner lock refuses."""
    from run_dir import RunDirLock

    held = RunDirLock(tmp_path / "out", key="out").acquire()  # the first evaluation, still running
    try:
        with pytest.raises(runtime.RunError, match=r"is in use by another process .*choose another out"):
            evaluate(pixel_run, tmp_path / "out", "num_samples=4", "chunk_size=4", "guidance_scale=2")
        assert not (tmp_path / "out" / "eval.json").exists()
    finally:
        held.release()
    assert evaluate(pixel_run, tmp_path / "out", "num_samples=4", "chunk_size=4") == 0


def test_a_directory_made_with_other_settings_is_refused(pixel_run, tmp_path):
    assert evaluate(pixel_run, tmp_path / "out", "num_samples=4", "chunk_size=4") == 0
    with pytest.raises(runtime.RunError, match=r"other settings \(differing: solver\)"):
        evaluate(pixel_run, tmp_path / "out", "num_samples=4", "chunk_size=4", "guidance_scale=2")
    with pytest.raises(runtime.RunError, match="differing: seed"):
        evaluate(pixel_run, tmp_path / "out", "num_samples=4", "chunk_size=4", "seed=1")


@pytest.fixture(scope="module")
def digits_reference(tmp_path_factory, inception_weights):
    """Inception statistics of 40 held-out digits, built by scripts/build_reference_stats.py."""
    from conftest import load_script

    reference = tmp_path_factory.mktemp("reference") / "digits_test.npz"
    assert (
        load_script("build_reference_stats").main(
            [
                "dataset=digits",
                "dataset.split=test",
                "limit=40",
                f"out={reference}",
                f"weights={inception_weights}",
                "progress=false",
            ]
        )
        == 0
    )
    return reference


@pytest.mark.slow  # Inception at 299 px on the CPU: CI runs it (`uv run pytest -m slow`)
def test_metrics_json_has_every_metric_and_the_protocol(pixel_run, tmp_path, inception_weights, digits_reference):
    """FID / IS / KID / precision-recall / sFID against reference statistics of the held-out digits."""
    import json

    reference = digits_reference
    assert (
        eval_imagenet.main(
            [
                f"checkpoint={pixel_run}",
                f"out={tmp_path / 'out'}",
                "num_steps=3",
                "device=cpu",
                "num_samples=20",
                "chunk_size=10",
                f"reference={reference}",
                f"inception_weights={inception_weights}",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"fid", "sfid", "is_mean", "is_std", "kid_mean", "precision", "recall"} <= set(result["metrics"])
    assert result["metrics"]["fid"] > 0 and 0 <= result["metrics"]["precision"] <= 1
    protocol = result["protocol"]
    assert protocol["use_ema"] and protocol["solver"]["num_steps"] == 3 and protocol["num_samples"] == 20
    assert protocol["reference_count"] == 40 and protocol["extractor_sha256"]
    assert protocol["labels"].startswith("class-balanced") and protocol["checkpoint_manifest_sha256"]


@pytest.mark.slow
def test_inference_scores_fid_against_a_reference(pixel_run, tmp_path, inception_weights, digits_reference):
    import json

    import inference

    reference = digits_reference
    assert (
        inference.main(
            [
                f"checkpoint={pixel_run}",
                f"out={tmp_path / 's'}",
                "n_per_class=2",
                "num_steps=2",
                "device=cpu",
                f"fid_reference={reference}",
                f"inception_weights={inception_weights}",
            ]
        )
        == 0
    )
    scores = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert scores["inception/fid"] > 0 and scores["inception/num_samples"] == 20


def test_a_2d_checkpoint_is_refused_before_anything_is_written(tmp_path):
    """eval on a moons checkpoint failed in the first chunk with a traceback, leaving eval.json behind."""
    from config import ConfigError

    assert run_train(tmp_path / "moons", "training.max_steps=10", "training.num_eval_samples=20") == 0
    with pytest.raises(ConfigError, match=r"samples of shape \[2\]; eval_imagenet.py scores images"):
        evaluate(tmp_path / "moons", tmp_path / "out", "num_samples=4")
    assert not (tmp_path / "out").exists()


FILE_SIZE_LIMIT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
limit = int(sys.argv.pop(1))
import eval_imagenet, runtime
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
runtime.run_main(eval_imagenet.main, sys.argv[1:])
"""


def test_a_full_disk_names_the_chunk_and_leaves_no_temporary_file(pixel_run, tmp_path):
    """A full disk while writing a chunk gave an OSError naming no path and left .chunk_*.tmp* behind."""
    out = tmp_path / "out"
    args = [f"checkpoint={pixel_run}", *FAST, "num_samples=64", "chunk_size=64", "batch_size=64", f"out={out}"]
    result = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, "8000", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1, result.stderr[-2000:]
    chunk = out / "shards" / "chunk_000000.npz"
    assert result.stderr == f"error: {chunk}: File too large (OSError)\n", result.stderr
    assert not [p.name for p in (out / "shards").iterdir() if ".tmp" in p.name]


def test_missing_inception_weights_or_reference_fail_before_any_sampling(pixel_run, tmp_path):
    """Both were found missing only after every sample was drawn."""
    from config import ConfigError

    base = [f"checkpoint={pixel_run}", "num_steps=3", "device=cpu", "num_samples=4", f"out={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match="none.pth does not exist"):
        eval_imagenet.main([*base, f"reference={tmp_path / 'ref.npz'}", f"inception_weights={tmp_path / 'none.pth'}"])
    assert not (tmp_path / "out").exists()
