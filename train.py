"""Train a flow-matching model: `python train.py [experiment=NAME] [key=value ...]`.

    python train.py                                      # moons_cfg on CPU, seconds
    python train.py experiment=cifar10_cfg training.run_dir=runs/c10 training.resume=auto
    torchrun --nproc_per_node=8 train.py experiment=imagenet256_latent_dit_xl2

The loop is trainer.Trainer; configs are validated in config.py and built in build.py.
Exit codes: 0 done (or already finished), 75 stopped by SIGTERM after saving a checkpoint (requeue
the same command), 1 error (runtime.py).
"""

from config import load_config
from run_dir import fit_from_command_line
from runtime import run_main
from trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    return fit_from_command_line(argv, __doc__, "train", load_config, Trainer)


if __name__ == "__main__":
    run_main(main)
