"""Score saved samples (inference.py's samples.npz) with one or more classifiers, without re-sampling.

    python scripts/score_samples.py run=RUN_DIR classifiers=A.safetensors,B.safetensors samples=DIR1,DIR2 [out=FILE.jsonl]

The dataset (and so the held-out split the classifier-FD is taken against, and the train split behind
the real-vs-real floor) is the run's own, read from RUN_DIR/config.yaml, exactly as `inference.py
classifier=...` does; the scores are the same `metrics.EvalClassifier.score` on the same 8-bit images
(uint8 -> [-1, 1]). One JSON line per (samples dir, classifier). Used by the issue-13 recipe study
(experiments/fashion_mnist.md) to score one sample set with a tuning classifier and a separate judge.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from build import load_eval_classifier
from datasets import uint8_to_model_space


def main(argv: list[str]) -> None:
    args = dict(arg.partition("=")[::2] for arg in argv)
    run, out = Path(args["run"]), args.get("out")
    dataset_cfg = OmegaConf.load(run / "config.yaml").dataset
    dirs = [Path(d) for d in args["samples"].split(",")]
    loaded = {}
    for d in dirs:
        npz = np.load(d / "samples.npz")
        loaded[d] = (uint8_to_model_space(torch.from_numpy(npz["images"]).permute(0, 3, 1, 2)),
                     torch.from_numpy(npz["labels"]))
    for path in args["classifiers"].split(","):
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


if __name__ == "__main__":
    main(sys.argv[1:])
