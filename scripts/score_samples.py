"""Score saved samples (inference.py's samples.npz) with one or more classifiers, without re-sampling.

    python scripts/score_samples.py run=RUN_DIR classifiers=[A.safetensors,B.safetensors] \\
        samples=[DIR1,DIR2] [out=FILE.jsonl]

The dataset (and so the held-out split the classifier-FD is taken against, and the train split behind
the real-vs-real floor) is the run's own, read from RUN_DIR/config.yaml, exactly as `inference.py
classifier=...` does; the scores are the same `classifier.EvalClassifier.score` on the same 8-bit images
(uint8 -> [-1, 1]). One JSON line per (samples dir, classifier). Used by the 28x28 recipe study
(experiments/fashion_mnist.md) to score one sample set with a tuning classifier and a separate judge.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from build import load_eval_classifier
from cli import parse_keys
from config import check
from datasets import uint8_to_model_space
from runtime import run_main


@dataclass
class ScoreConfig:
    run: str | None = None  # required: the run whose dataset (RUN/config.yaml) the scores are taken against
    classifiers: Any = None  # required: a classifier file, or a list: classifiers=[A.safetensors,B.safetensors]
    samples: Any = None  # required: a directory holding samples.npz, or a list: samples=[DIR1,DIR2]
    out: str | None = None  # also append the JSON lines to this file


def main(argv: list[str] | None = None) -> int:
    args = parse_keys(sys.argv[1:] if argv is None else argv, ScoreConfig, __doc__)
    check(bool(args.run), "run", args.run, "is required: the run directory the samples came from")
    for key in ("classifiers", "samples"):
        value = getattr(args, key)
        value = [value] if isinstance(value, str) else value
        check(
            bool(value) and all(isinstance(v, str) and "," not in v for v in value),
            key,
            getattr(args, key),
            "is required: a path, or a list of paths in brackets, e.g. [A,B]",
        )
        setattr(args, key, value)
    run, out = Path(args.run), args.out
    dataset_cfg = OmegaConf.load(run / "config.yaml").dataset
    dirs = [Path(d) for d in args.samples]
    loaded = {}
    for d in dirs:
        npz = np.load(d / "samples.npz")
        loaded[d] = (
            uint8_to_model_space(torch.from_numpy(npz["images"]).permute(0, 3, 1, 2)),
            torch.from_numpy(npz["labels"]),
        )
    for path in args.classifiers:
        scorers = {}
        for d, (x, y) in loaded.items():
            if len(x) not in scorers:
                scorers[len(x)] = load_eval_classifier(path, dataset_cfg, torch.device("cpu"), len(x), 0)
            row = {"samples": str(d), "classifier": path, "n": len(x), **scorers[len(x)].score(x, y)}
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                with open(out, "a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
