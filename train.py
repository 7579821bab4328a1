"""Train a flow-matching model: `python train.py [experiment=NAME] [key=value ...]`.

    python train.py                                      # moons_cfg on CPU, seconds
    python train.py experiment=cifar10_cfg training.run_dir=runs/c10 training.resume=auto
    torchrun --nproc_per_node=8 train.py experiment=imagenet256_latent_dit_xl2

The loop is trainer.Trainer; configs are validated in config.py and built in build.py.
Exit codes: 0 done (or already finished), 75 stopped by SIGTERM after saving a checkpoint (requeue
the same command), 1 error (runtime.py).
"""

import sys

from cli import exit_on_help
from config import entry_point_help, load_config, require_tracking_packages
from run_dir import resolve_run_dir
from runtime import run_main, setup_runtime, teardown_runtime
from trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    exit_on_help(argv, __doc__, *entry_point_help("train"))
    cfg = load_config(argv)
    require_tracking_packages(cfg.training)
    runtime = setup_runtime(cfg.device)
    try:
        return Trainer(cfg, runtime, resolve_run_dir(cfg, runtime)).fit()
    finally:
        teardown_runtime(runtime)


if __name__ == "__main__":
    run_main(main)
