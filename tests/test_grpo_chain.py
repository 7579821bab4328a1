"""README.md's "Post-training" chain runs as written: its commands, in order, in an empty directory.

Each documented line is run through its script's `main` with the line's own arguments, then a few
appended overrides that only shrink it (tiny data, model and iteration counts, CPU). No path is passed
between the steps: each one must find the previous step's output at its default path.
"""

import shlex
from pathlib import Path

import checkpoint
import config
import train
import train_grpo
from conftest import ROOT, load_script

# Appended to each documented command: sizes only, never a path.
SHRINK = {
    "scripts/make_standin_idx.py": ["n_train=200", "n_test=100"],
    "scripts/train_classifier.py": ["epochs=1", "batch_size=100", "device=cpu"],
    "train.py": [
        "training.epochs=1",
        "model.base_ch=8",
        "model.emb_dim=16",
        "model.time_freq_dim=16",
        "training.num_eval_samples=10",
        "solver.num_steps=2",
        "training.progress=false",
        "training.tensorboard=false",
        "device=cpu",
    ],
    "train_grpo.py": [
        "grpo.epochs=1",
        "grpo.batch_size=2",
        "grpo.group_size=2",
        "grpo.num_inner=1",
        "grpo.rollout_steps=3",
        "training.num_eval_samples=10",
        "solver.num_steps=2",
        "training.progress=false",
        "training.tensorboard=false",
        "device=cpu",
    ],
}


def post_training_commands() -> list[list[str]]:
    """The commands of the first code block of README.md's "Post-training" section, as token lists."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Post-training\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [shlex.split(line, comments=True) for line in lines]


def test_the_chain_is_data_classifiers_seed_grpo():
    scripts = [tokens[3] for tokens in post_training_commands()]
    assert scripts == [
        "scripts/make_standin_idx.py",
        "scripts/train_classifier.py",
        "scripts/train_classifier.py",
        "train.py",
        "train_grpo.py",
    ]
    grpo = post_training_commands()[-1]
    assert not any("=" in arg and ("/" in arg or "checkpoint" in arg) for arg in grpo[4:]), grpo


def run(tokens: list[str]) -> int:
    assert tokens[:3] == ["uv", "run", "python"], tokens
    script, args = tokens[3], tokens[4:] + SHRINK[tokens[3]]
    if script == "train.py":
        return train.main(args)
    if script == "train_grpo.py":
        return train_grpo.main(args)
    return load_script(Path(script).stem).main(args)


def test_the_documented_chain_runs_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = post_training_commands()
    grpo_args = commands[-1][4:]
    grpo_cfg = config.load_grpo_config(grpo_args)
    evaluation = Path(grpo_cfg.training.classifier)
    anchors = [Path(t.reward.classifier) for t in grpo_cfg.reward.terms if "classifier" in t.reward]
    assert len(anchors) == 1 and anchors[0] != evaluation

    for tokens in commands:
        assert run(tokens) == 0, tokens
        script = tokens[3]
        if script.endswith("make_standin_idx.py"):
            # the default dataset.root is where the stand-in went
            assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
        elif script == "train.py":
            # the seed is where the GRPO preset looks for it
            assert (checkpoint.resolve_checkpoint(Path(grpo_cfg.seed_checkpoint)) / "model.safetensors").is_file()

    assert evaluation.is_file() and anchors[0].is_file()
    runs = sorted((tmp_path / "runs").glob(f"{grpo_cfg.experiment}_*"))
    assert len(runs) == 1 and (runs[0] / "finished.json").is_file() and (runs[0] / "eval.json").is_file()
