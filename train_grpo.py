"""Flow-GRPO post-training: `python train_grpo.py experiment=fashion_grpo_jpeg seed_checkpoint=RUN`.

The trainer is rl/trainer.py's GRPOTrainer; configs are validated in config.py. Exit codes: 0 done (or
already finished), 75 stopped by SIGTERM after saving a checkpoint (requeue the same command), 1 error.
"""

from config import load_grpo_config
from rl.trainer import GRPOTrainer
from run_dir import fit_from_command_line
from runtime import run_main


def main(argv: list[str] | None = None) -> int:
    return fit_from_command_line(argv, __doc__, "grpo", load_grpo_config, GRPOTrainer)


if __name__ == "__main__":
    run_main(main)
