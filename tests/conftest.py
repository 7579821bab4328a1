import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

# The suite runs tiny models on a 2-core machine, often beside other processes: one intra-op
# thread avoids OpenMP oversubscription, which made small ops 10-50x slower here.
torch.set_num_threads(1)

# Small, fast moons settings shared by the trainer tests.
FAST = [
    "training.progress=false",
    "training.tensorboard=false",
    "training.num_eval_samples=200",
    "training.log_every=10",
    "solver.num_steps=4",
]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def run_train(run_dir, *overrides):
    """train.main in-process; returns its exit code."""
    import train

    return train.main([f"training.run_dir={run_dir}", *FAST, *overrides])


def train_subprocess(run_dir, *overrides, wrapper: str | None = None, **popen):
    """`python train.py ...` (or a wrapper script that patches then calls train.main) as a real process."""
    args = [f"training.run_dir={run_dir}", *FAST, *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if wrapper is None:
        command = [sys.executable, str(ROOT / "train.py"), *args]
    else:
        command = [sys.executable, "-c", wrapper, *args]
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def torchrun(script: str, *args, env: dict | None = None) -> None:
    """`torchrun --standalone --nproc_per_node=2 SCRIPT ARGS` from the repo root (gloo on CPU, one thread per
    rank; a bare environment unless `env` is given); asserts that it exits 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *args]
    env = env or {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def final_state(run_dir):
    """(model, ema, optimizer state) of the newest checkpoint of a run."""
    import checkpoint

    path = checkpoint.resolve_checkpoint(run_dir)
    state = torch.load(path / "state.pt", weights_only=True)
    return (
        load_file(str(path / "model.safetensors")),
        load_file(str(path / "ema.safetensors")),
        state["optimizer"],
        path,
    )


def assert_same_state(a, b):
    model_a, ema_a, opt_a, _ = a
    model_b, ema_b, opt_b, _ = b
    for one, two in ((model_a, model_b), (ema_a, ema_b)):
        assert one.keys() == two.keys()
        for key in one:
            assert torch.equal(one[key], two[key]), key
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index in opt_a["state"]:
        for name, value in opt_a["state"][index].items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)


def states_equal(a, b) -> bool:
    try:
        assert_same_state(a, b)
        return True
    except AssertionError:
        return False


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """An Inception weights file in torch-fidelity's format, under the file name it downloads, made
    offline from its own FeatureExtractorInceptionV3 with a fixed random initialisation (the real
    weights cannot be downloaded here). Convolutions are He-initialised so activations keep an O(1)
    scale through the 90-odd layers (PyTorch's default init shrinks them to ~1e-8). Load it with
    inception.load_inception(path): the real loading code."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception

    import inception

    class FreshlyInitialised(fidelity_inception.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the initialisation
            return None

    with (
        torch.random.fork_rng(devices=[]),
        mock.patch.object(fidelity_inception, "load_state_dict_from_url", lambda *args, **kwargs: {}),
    ):
        torch.manual_seed(0)
        network = FreshlyInitialised(inception.INCEPTION_EXTRACTOR, list(inception.INCEPTION_FEATURES))
        for module in network.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / inception.inception_weights_filename()
    torch.save(network.state_dict(), path)
    return path


def assert_same_files(a, b):
    """Every file of two directories (a checkpoint, a run's finished.json) byte for byte."""
    a, b = Path(a), Path(b)
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    assert names == sorted(p.name for p in b.iterdir() if p.is_file())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def write_pngs(root, layout: dict, seed: int = 0):
    """layout {class folder: [(W, H), ...]} -> random RGB PNGs root/<class>/<k>.png."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, sizes in layout.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{k}.png")
    return root


QUIET = {"log": lambda *_: None}  # keyword arguments that silence the latent-cache writer


@pytest.fixture(scope="session")
def pngs_and_vae(tmp_path_factory):
    """A 2-class x 3-image folder of PNGs (root/images, odd sizes, one stray text file), a tiny VAE
    directory (root/vae), and the VAE loaded from it: -> (root, SDVAE)."""
    import smoke_data
    import vae

    root = tmp_path_factory.mktemp("latent_cache")
    layout = {"cat": [(45, 37), (80, 70), (33, 50)], "dog": [(64, 64), (40, 90), (37, 33)]}  # (W, H), odd on purpose
    write_pngs(root / "images", layout)
    (root / "images" / "dog" / "notes.txt").write_text("not an image")
    smoke_data.save_tiny_vae(root / "vae")
    return root, vae.SDVAE(str(root / "vae"), chunk_size=4, vae_id="org/tiny-vae")


def preflight(path, *args):
    """The preflight CLI in-process (a subprocess per call would re-import torch: ~2 s each)."""
    import contextlib
    import io
    import types

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = load_script("preflight_latent_cache").main([f"cache={path}", *args])
    return types.SimpleNamespace(returncode=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())
